"""cityedge's CPython host library: what the CPython parts share below them.

Layer 2 of 4 (``docs/ARCHITECTURE.md``): it imports the MicroPython core
(``cityedge_core``) and well-kept libraries, never a part (gateway, fleet, provisioning,
hardware) or the application (``cityedge``).
"""
