"""cityedge host-side package: the ``cityedge`` command and the CPython helpers that the
gateway, fleet and tools share."""
