"""The device's half of key rotation on MicroPython: ``rotate``, ``install-cert``,
``erase-key`` (the protocol and its reasons: ``cityedge_core.rotation``; the files:
``key_slots``). The Pi gateway (``cityedge_gateway.rotation_device``) and the fast device
(``cityedge.fastdevice``) do the same; the command gate has checked signature, target,
expiry and seq before ``run`` is called. Each command is answered (``answers``):

=================  ===========================================================================
command            does, or refuses
=================  ===========================================================================
``rotate``         a new P-256 key (the board's RNG, ``os.urandom``) in the slot that is not
                   current, a CSR for it (CN and SAN = the device), the proof signed by the
                   *current* key, published on ``up/csr`` (QoS 1 when the link's send
                   window has room, else QoS 0); ``ok``. Refused: bad args.
                   Failed: not connected, no heap, a flash error.
``install-cert``   the certificate must hold the pending key of this rotation; stored, the
                   pointer moved; ``ok`` (signed with the old key); *after* the answer: the
                   batch writer, status and results sign with the new key (same seq, same
                   previous hash: the chain goes on) and the link reconnects with a TLS
                   context rebuilt from the new key and certificate. Refused: no pending
                   key, another rotation's, a certificate for another key.
``erase-key``      the key named by kid is removed if it is in the slot that is not
                   current, then that slot's certificate; ``ok`` (also when it is not here:
                   the goal holds). Refused: it is the current key.
=================  ===========================================================================

LittleFS removes a file by freeing its blocks: the old key's bytes stay on the flash
until the blocks are reused (the fleet revoked its certificate before asking).

Loaded for the command only (by ``answers``, for any command but ``status``), with
``key_slots``, ``keys``, ``csr`` and ``rotation``, and unloaded after it. The key generation, the
CSR and the proof are transient (measured: ``docs/ARCHITECTURE.md``, "Memory on the
device").
"""

import gc
import os

from cityedge_core import cose, p256, rotation
from cityedge_core.errors import LocalError, PeerError, TransportError

from . import key_slots, mqtt, unload
from .files import write_atomic
from .keys import private_key_from_der, read_file

MODULES = ("cityedge_fw.rotation_device", "cityedge_fw.key_slots", "cityedge_fw.keys",
           "cityedge_core.rotation", "cityedge_core.csr")


def _hex(b):
    import binascii

    return binascii.hexlify(b).decode()


async def run(agent, name, seq, args):
    """Carry out command ``name`` (seq ``seq``) and answer it (``refused``: not supported,
    for a name that is not the rotation's); unloads this module and those it loaded.
    Returns None, or after an installed certificate ``(key_path, cert_path, kid)`` for
    ``key_slots.after`` (the switch), which the caller makes once these modules are off
    the heap (the new TLS context needs the room)."""
    try:
        return await _run(agent, name, seq, args)
    finally:
        unload(*MODULES)


async def _run(agent, name, seq, args):
    from . import answers

    switch = None
    outcome = "ok"
    try:
        if name == rotation.ROTATE:
            detail = await _rotate(agent, rotation.rotate_args(args))
        elif name == rotation.INSTALL_CERT:
            rid, cert = rotation.install_cert_args(args)
            detail, switch = _install(agent, rid, cert)
        elif name == rotation.ERASE_KEY:
            rid, kid = rotation.erase_key_args(args)
            detail = _erase(agent, kid)
        else:
            raise PeerError("%s: not supported by this firmware" % name)
    except PeerError as e:
        outcome, detail = "refused", str(e)
    except MemoryError:
        agent.mem_errors += 1
        outcome, detail = "failed", "no heap for it on the device"
    except (OSError, LocalError, ValueError) as e:
        outcome, detail = "failed", "%s: %s" % (type(e).__name__, e)
    args = None
    if outcome != "ok":
        agent.last_error = "%s: %s" % (name, detail)
    gc.collect()
    try:
        await answers._signed(agent, name, seq, outcome, detail)
    except MemoryError:  # not answered: the fleet sends it again (then: a replay)
        agent.mem_errors += 1
    return switch  # the pointer moved: the new key from now on (``key_slots.after``)


async def _rotate(agent, rid):
    tls = agent.cfg["tls"]
    other = 1 - key_slots.current(tls)
    key_path, cert_path = key_slots.paths(tls, other)
    key_slots.remove(cert_path)  # a stale certificate never pairs with the new key
    key = p256.PrivateKey.generate(os.urandom)
    from cityedge_core import csr

    write_atomic(key_path, csr.ec_private_key_der(key))  # computes the public point
    agent.state.set(rot=[rid, other])
    der = csr.build_csr(key, agent.device)
    kid = cose.kid_for_public_key(key.public_key().to_sec1())
    key = csr = None
    gc.collect()
    msg = rotation.csr_message(agent.writer.signer, agent.writer.kid, agent.device, rid, der)
    der = None
    if agent.link.client.state != mqtt.CONNECTED:
        raise TransportError("not connected: the CSR was not sent")
    # beside up/readings: the scheme's and the configured prefix's (``topics``); QoS 1
    # when the link's send window has room (as ``answers._send`` does for results), else
    # QoS 0: a CSR lost then is sent again by the fleet's resend of ``rotate``
    await agent.link.publish(agent.topics[0][:-8] + "csr", msg,
                             1 if agent.link.client.can_publish() else 0)
    return "csr sent for key %s" % _hex(kid)


def _install(agent, rid, cert):
    tls = agent.cfg["tls"]
    rot = agent.state.get("rot")
    if not isinstance(rot, list) or len(rot) != 2 or rot[0] != rid or rot[1] not in (0, 1) \
            or rot[1] == key_slots.current(tls):
        raise PeerError("install-cert: rotation %d is not pending here" % rid)
    slot = rot[1]
    key_path, cert_path = key_slots.paths(tls, slot)
    point = private_key_from_der(read_file(key_path)).public_key().to_sec1()
    if not rotation.cert_holds_key(cert, point):
        raise PeerError("install-cert: the certificate is not for the pending key")
    write_atomic(cert_path, cert)
    # the switch is on flash before the ok goes out: a device that said ok and was cut
    # would otherwise come back on the old key, and the fleet wait for the new one
    key_slots.point_to(tls, slot)
    agent.state.set(rot=None)
    kid = cose.kid_for_public_key(point)
    return "installed for key %s" % _hex(kid), (key_path, cert_path, kid)


def _erase(agent, kid):
    if kid == agent.writer.kid:
        raise PeerError("erase-key: %s is the current key" % _hex(kid))
    tls = agent.cfg["tls"]
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
