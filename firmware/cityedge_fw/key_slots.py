"""The device's identity in two key slots and a pointer: rotation that survives a power cut.

The configuration's ``tls`` paths name slot 0; slot 1 is the same paths with ``.1``
appended; the pointer is the key's path with ``.slot`` appended (absent: slot 0) and
holds the current slot's suffix, which the boot (``main.build``) appends to the ``tls``
paths without loading this module::

    /key.der    /cert.der      slot 0: the provisioned key (SEC1 DER) and certificate (DER)
    /key.der.1  /cert.der.1    slot 1
    /key.der.slot              ".1": slot 1 is current ("" or absent: slot 0)

The pending rotation ``[rotation_id, slot]`` is in the agent's state file (key ``rot``).
Every write is ``files.write_atomic`` (LittleFS: the old bytes or the new, never a mix)
and each step's pointer-like write comes last (the protocol: ``cityedge_core.rotation``):

===============  =========================================================================
step             writes, in order
===============  =========================================================================
``rotate``       remove the other slot's certificate (a stale one never pairs with a new
                 key), key<other> (a new key), ``rot`` in the state file
``install-cert`` cert<other>, the pointer (the switch), ``rot`` cleared
``erase-key``    remove key<other>, then cert<other> (only the slot that is *not*
                 current, and only when its key has the kid named)
===============  =========================================================================

So at every cut the pointer names a slot whose key and certificate the fleet issued as a
pair: before it moves, the old slot (``rotate`` and ``install-cert`` do not touch it);
after, the new one, whose certificate was on flash before the pointer was written. A
half-made pending slot is ignored and made again at the next ``rotate``.

Loaded by ``rotation_device`` at boot (``rotation_device.boot_step``), never by the running
agent; the boot after a switch builds the TLS context and the signing key from the slot
the pointer names (``main.build``).
"""

import os

from .files import write_atomic


def paths(tls, slot):
    """``(key_path, cert_path)`` of ``slot`` (0 or 1) for the configuration's ``tls``."""
    if slot:
        return tls["key"] + ".1", tls["cert"] + ".1"
    return tls["key"], tls["cert"]


def current(tls):
    """The slot in use: what the pointer file says (absent: 0), as the boot reads it."""
    try:
        with open(tls["key"] + ".slot") as f:
            return 1 if f.read() == ".1" else 0
    except OSError:
        return 0


def point_to(tls, slot):
    """Make ``slot`` current: one atomic write (the switch)."""
    write_atomic(tls["key"] + ".slot", b".1" if slot else b"")


def remove(path):
    """Remove ``path`` (absent is fine; a removal that fails raises OSError)."""
    try:
        os.remove(path)
    except OSError as e:
        if e.args and e.args[0] != 2:  # ENOENT
            raise
