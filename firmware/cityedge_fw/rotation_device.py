"""The device's half of key rotation on MicroPython: ``rotate``, ``install-cert``,
``erase-key`` (the protocol and its reasons: ``cityedge_core.rotation``; the files:
``key_slots``), carried out at boot. The Pi gateway (``cityedge_gateway.rotation_device``)
and the fast device (``cityedge.fastdevice``) do the same while they run.

Why at boot: this module and those it loads (``key_slots``, ``keys``, ``csr``,
``rotation``) intern about 86 names, past the five pools the running agent fits in (the
sixth is one 7.5 KiB block), and the key generation, CSR and proof need room beside them:
a streaming agent in a small heap has neither (measured: docs/ARCHITECTURE.md, "Memory on
the device"). So the running agent only keeps a command the gate took on flash
(``answers``: ``<state>.rotation.new``, ``[len, device, seq 8, now 8, name length,
name, the arguments' CBOR]``), seals its readings and resets, as for a ``trust-update``;
the next boot runs it here before the agent is built (``main.main`` ->
``update_check.run`` -> ``boot_step`` -> ``at_boot``), keeps the signed answer with the others
(``answers``) and the messages for the agent to publish once connected
(``answers.keep_unsent``: the CSR, then the answer), removes the command and resets again
(the names interned here would stay on the agent's heap). The agent that boots then
publishes them (``answers.publish_unsent``), and after an ``install-cert`` it is built on
the new slot by a normal boot: its TLS context, its signing key (same seq and previous
hash in the state file: the chain goes on).

=================  ===========================================================================
command            does, or refuses
=================  ===========================================================================
``rotate``         a new P-256 key (the board's RNG, ``os.urandom``) in the slot that is not
                   current, a CSR for it (CN and SAN = the device), the proof signed by the
                   *current* key, kept for ``up/csr``; ``ok``. Refused: bad args.
                   Failed: no heap, a flash error.
``install-cert``   the certificate must hold the pending key of this rotation; stored, the
                   pointer moved; ``ok`` (signed with the old key). The same certificate
                   again once it is current (a cut after the switch, before the command
                   was removed): ``ok``, nothing changes. Refused: no pending key, another
                   rotation's, a certificate for another key.
``erase-key``      the key named by kid is removed if it is in the slot that is not
                   current, then that slot's certificate; ``ok`` (also when it is not here:
                   the goal holds). Refused: it is the current key.
=================  ===========================================================================

The command file is the agent's own write after the gate took the command (signature,
target, expiry, seq): a tampered file on the flash is an attacker who can write the
flash, who has the device key already. Still, every field is checked again here as the
gate's command would be (the arguments by ``cityedge_core.rotation``'s readers), and a
command that fails in any way is answered and removed, never run twice by a boot loop.

LittleFS removes a file by freeing its blocks: the old key's bytes stay on the flash
until the blocks are reused (the fleet revoked its certificate before asking).
"""

import gc
import os
import sys

from cityedge_core import cose, p256, rotation
from cityedge_core.errors import LocalError, PeerError

from . import key_slots, state_path, unload
from .files import write_atomic
from .keys import private_key_from_der, read_file


def _hex(b):
    import binascii

    return binascii.hexlify(b).decode()


def boot_step(cfg):
    """Carry out the rotation command that waits (``S.rotation.new``:
    ``rotation_device``), keep its signed answer (and its CSR) for the agent to publish,
    remove the command; True (``main`` then resets: the rotation's names would stay on
    the agent's heap). Whatever fails, the command is removed (no boot loop): a power cut
    before that runs it again, which each of the rotation's steps allows."""
    state = state_path(cfg)
    pending = state + ".rotation.new"
    from .boot_answer import _key, _pending, _sign, _Signer

    got = _pending(pending)
    if got is None:
        return True
    device, seq, data = got[2], got[3], got[5]
    got = None
    # the boot's modules this needs not (``main`` resets after it): room for the
    # rotation's names, its key and CSR
    unload("cityedge_fw.config", "cityedge_core.topics", "cityedge_core.batch")
    before = set(sys.modules)
    gc.collect()
    try:
        n = data[0] if data else 0
        try:
            name = data[1:1 + n].decode()
        except ValueError:  # (UnicodeError) not a name this firmware's agent wrote
            name = "unknown"
        # the answer's module first: its names interned while the heap is whole (the
        # rotation's take the boot past five pools, the sixth one 7.5 KiB block)
        from . import answers  # noqa: F401
        from .store import State

        tls = cfg["tls"]
        key = _key(tls)
        agent = _Signer(device, key, cose.kid_for_public_key(key.public_key().to_sec1()),
                        state)
        args = None
        if len(data) > 1 + n:
            from cityedge_core import cbor_decode

            try:
                args = cbor_decode.loads(data[1 + n:])
            except (ValueError, PeerError):  # not from this firmware's agent: refused
                args = None
        data = None
        outcome, detail, csr = at_boot(tls, State(state), device, key, agent.kid, name,
                                       args)
        args = None
        for m in set(sys.modules) - before:
            if m != "cityedge_fw.answers":
                unload(m)
        gc.collect()
        _sign(agent, name, seq, outcome, detail, csr)
    except MemoryError:
        print("rotation %d: no heap to answer it: dropped" % seq)
    finally:
        os.remove(pending)
    for m in set(sys.modules) - before:
        unload(m)
    return True


def at_boot(tls, state, device, key, kid, name, args):
    """Carry out rotation command ``name`` (``args``: its arguments, decoded) for
    ``device`` whose current key is ``key`` (kid ``kid``); ``state``: the agent's
    ``store.State``. Returns ``(outcome, detail, csr message or None)``."""
    csr_msg = None
    outcome = "ok"
    try:
        if name == rotation.ROTATE:
            detail, csr_msg = _rotate(tls, state, device, key, kid, rotation.rotate_args(args))
        elif name == rotation.INSTALL_CERT:
            rid, cert = rotation.install_cert_args(args)
            detail = _install(tls, state, rid, cert)
        elif name == rotation.ERASE_KEY:
            rid, old = rotation.erase_key_args(args)
            detail = _erase(tls, kid, old)
        else:
            raise PeerError("%s: not supported by this firmware" % name)
    except PeerError as e:
        outcome, detail = "refused", str(e)
    except MemoryError:
        outcome, detail = "failed", "no heap for it on the device"
    except (OSError, LocalError, ValueError) as e:
        outcome, detail = "failed", "%s: %s" % (type(e).__name__, e)
    print("%s: %s: %s" % (name, outcome, detail))
    return outcome, detail, csr_msg


def _rotate(tls, state, device, signer, kid, rid):
    other = 1 - key_slots.current(tls)
    key_path, cert_path = key_slots.paths(tls, other)
    key_slots.remove(cert_path)  # a stale certificate never pairs with the new key
    key = p256.PrivateKey.generate(os.urandom)
    from cityedge_core import csr

    write_atomic(key_path, csr.ec_private_key_der(key))  # computes the public point
    state.set(rot=[rid, other])
    der = csr.build_csr(key, device)
    new = cose.kid_for_public_key(key.public_key().to_sec1())
    key = csr = None
    gc.collect()
    return "csr sent for key %s" % _hex(new), rotation.csr_message(signer, kid, device,
                                                                  rid, der)


def _install(tls, state, rid, cert):
    rot = state.get("rot")
    cur = key_slots.current(tls)
    if not isinstance(rot, list) or len(rot) != 2 or rot[0] != rid or rot[1] not in (0, 1) \
            or rot[1] == cur:
        # a cut after the switch and before the command was removed: the same
        # certificate, current now, is this command's own (it is answered ok again)
        try:
            here = read_file(key_slots.paths(tls, cur)[1])
        except LocalError:
            here = None
        if here != cert:
            raise PeerError("install-cert: rotation %d is not pending here" % rid)
        if rot is not None:
            state.set(rot=None)
        return "installed already"
    slot = rot[1]
    key_path, cert_path = key_slots.paths(tls, slot)
    point = private_key_from_der(read_file(key_path)).public_key().to_sec1()
    if not rotation.cert_holds_key(cert, point):
        raise PeerError("install-cert: the certificate is not for the pending key")
    write_atomic(cert_path, cert)
    # the switch is on flash before the ok is kept: a device that said ok and was cut
    # would otherwise come back on the old key, and the fleet wait for the new one
    key_slots.point_to(tls, slot)
    state.set(rot=None)
    return "installed for key %s" % _hex(cose.kid_for_public_key(point))


def _erase(tls, current, kid):
    if kid == current:
        raise PeerError("erase-key: %s is the current key" % _hex(kid))
    other = 1 - key_slots.current(tls)
    key_path, cert_path = key_slots.paths(tls, other)
    try:
        der = read_file(key_path)
    except LocalError:
        der = None  # not here (erased already)
    if der is not None:
        try:
            key = private_key_from_der(der)
        except LocalError:  # torn: not a key any more, finish the erase
            key = None
        if key is not None and cose.kid_for_public_key(key.public_key().to_sec1()) != kid:
            return "no key %s here (the other slot holds another)" % _hex(kid)
        key = der = None
        key_slots.remove(key_path)
        key_slots.remove(cert_path)
        return "erased key %s" % _hex(kid)
    key_slots.remove(cert_path)
    return "no key %s here (erased already)" % _hex(kid)
