"""cityedge_fleet package."""
