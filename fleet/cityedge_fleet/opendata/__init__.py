"""Open data: verified readings of the sites and sensor kinds the city marks public, as
an OGC SensorThings API v1.1 endpoint (``/sta/v1.1``) and bulk downloads per site and day
(``/opendata/v1``); public ids instead of device ids, rounded locations, provenance with
every observation (docs/OPEN_DATA.md)."""
