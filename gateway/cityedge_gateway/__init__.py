"""cityedge_gateway package."""
