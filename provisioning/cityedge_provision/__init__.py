"""cityedge_provision package."""
