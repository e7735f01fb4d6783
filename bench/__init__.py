"""cityedge benchmarks: ``make bench`` (python -m bench)."""
