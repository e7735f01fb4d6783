"""cityedge_hardware package."""
