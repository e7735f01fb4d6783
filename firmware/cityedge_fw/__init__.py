"""cityedge device agent (MicroPython): sensors, durable batch buffer, MQTT uplink, board HAL.

Runs on ESP32, Raspberry Pi Pico W and the MicroPython unix port; imports the shared sans-IO
core ``cityedge_core`` for every wire format.
"""

import sys

# The firmware version: the status reports it, provisioning tells the laptop, the build
# checks the package manifest against it (``manifest.py``). Spelled here only.
VERSION = "0.1.0"

# Modules a device loads only for a moment: the CBOR decoder (a state file read at boot,
# a command's payload once its signature holds, a batch about to be dropped) and the
# command gate. ``unload`` takes them off the heap again after use.
ON_DEMAND = ("cityedge_core.command_gate", "cityedge_core.cbor_decode", "cityedge_core.cbor_types")


def state_path(cfg):
    """The state file's path: ``config.json`` ``store.state`` (``config.load`` fills the
    default in; a test's bare map may leave it out). Here because every boot loads this
    package: the boot's dispatch (``main``, ``update_check``) and the boot steps share it."""
    return cfg.get("store", {}).get("state", "/state.cbor")


def unload(*names):
    """Take modules off the heap: out of ``sys.modules`` and out of their package, their
    last references (function and class objects, constants). Their interned names stay.
    For boot-only modules after boot and ``ON_DEMAND`` ones after use; the next import
    loads a module again (from flash: milliseconds). On CPython (tests, tools) nothing is
    unloaded: there is no heap to save, and a reloaded module's classes would not be the
    ones other modules already hold."""
    if sys.implementation.name != "micropython":
        return
    for name in names:
        sys.modules.pop(name, None)
        pkg, _, leaf = name.rpartition(".")
        if pkg in sys.modules:
            sys.modules[pkg].__dict__.pop(leaf, None)
