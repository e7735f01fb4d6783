"""The fleet's HTTP API, one router per concern; ``cityedge_fleet.app`` mounts them."""
