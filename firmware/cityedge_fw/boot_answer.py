"""A command kept for the boot, carried out before the agent is built, and its signed
answer kept for the agent to publish: a trust-update's statement (``trust_check``; the
rotation's command shares the helpers here, ``rotation_device.boot_step``).

Called by ``update_check.run`` (the boot's dispatcher); its own module so that the
update's boot steps, whose heap is tight (the manifest's check), do not carry this code
or intern its names.
"""

import gc
import os

from cityedge_core.errors import PeerError

from . import state_path, unload


class _Signer:
    """What ``answers`` needs of an agent to sign and keep a result (no link: nothing is
    published here; the agent publishes it once connected, ``answers.publish_unsent``)."""

    def __init__(self, device, key, kid, state_path):
        self.device = device
        self.writer = self  # ``writer.signer``, ``writer.kid``
        self.signer = key
        self.kid = kid
        self.state = self  # ``state.path``
        self.path = state_path


def _key(tls):
    """The device's current key (``key_slots``' pointer: the slot's suffix)."""
    from .keys import private_key_from_der, read_file

    try:
        with open(tls["key"] + ".slot") as f:
            sfx = f.read()
    except OSError:
        sfx = ""
    return private_key_from_der(read_file(tls["key"] + sfx))


_OUTCOMES = ("ok", "refused", "failed")


def run(cfg):
    """Check the statement that waits (``S.trust.new``), install it if it holds, keep the
    signed answer (``trust_check``'s rules); True (``main`` then resets: the names the
    check interned would stay on the agent's heap).

    The check and the answer's signature may not fit in one boot's heap (the check leaves
    it cut up): then the verdict replaces the statement in ``S.trust.new`` (``0``, the
    header, the outcome's index, the detail) and the next boot, with nothing else loaded,
    signs and keeps the answer. A boot that cannot sign even that drops it (no boot loop:
    the fleet's resend is then refused as a replay). The answer kept is also kept for the
agent to publish once connected (``answers.keep_unsent``): the fleet has it without
sending the command again."""
    state = state_path(cfg)
    pending = state + ".trust.new"
    got = _pending(pending)
    if got is None:
        return True
    owed, head, device, seq, now, data = got
    if owed:
        outcome, detail = _OUTCOMES[min(data[0], 2)], data[1:].decode()
    else:
        outcome, detail = _check(cfg, state, seq, data, now)
    data = None
    try:
        from cityedge_core import cose

        key = _key(cfg["tls"])
        agent = _Signer(device, key, cose.kid_for_public_key(key.public_key().to_sec1()),
                        state)
        _sign(agent, "trust-update", seq, outcome, detail)
    except MemoryError:
        agent = key = None
        gc.collect()
        if not owed:  # the verdict waits for the next boot's clean heap
            from .files import write_atomic

            write_atomic(pending, (b"\x00", head, bytes([_OUTCOMES.index(outcome)]),
                                   detail.encode()))
            print("trust-update %d: the answer is signed at the next boot (heap)" % seq)
            return True
        print("trust-update %d: no heap to sign the answer: dropped" % seq)
    else:
        if owed:
            print("trust-update %d: answer kept" % seq)
    os.remove(pending)
    return True


def _pending(pending):
    """``(owed, head, device, seq, now, data)`` of a command kept for the boot
    (``answers._for_boot``: ``[len, device, seq 8, now 8, data]``; ``owed``: a verdict an
    earlier boot could not sign, ``0`` before it), or None after removing a file that is
    not one (torn cannot be: an atomic write)."""
    with open(pending, "rb") as f:
        raw = f.read()
    owed = raw[:1] == b"\x00"
    if owed:
        raw = raw[1:]
    n = raw[0] if raw else 0
    if not n or len(raw) < 17 + n + (1 if owed else 0):
        os.remove(pending)
        return None
    return (owed, bytes(raw[:17 + n]), bytes(raw[1:1 + n]).decode(),
            int.from_bytes(raw[1 + n:9 + n], "big"),
            int.from_bytes(raw[9 + n:17 + n], "big") or None, bytes(raw[17 + n:]))


def _sign(agent, name, seq, outcome, detail, csr=None):
    """Sign and keep the answer to ``seq`` (``answers``: with the last answers, for the
    fleet's resend), then keep it, after the CSR ``csr`` if there is one, for the agent
    to publish once connected."""
    from . import answers

    data = answers._encode(agent, name, seq, outcome, detail)
    answers._keep(agent, seq, data)  # (an OSError there: not kept, published all the same)
    parts = [(1, csr), (0, data)] if csr else [(0, data)]
    data = None
    try:
        answers.keep_unsent(agent.path, parts)
    except OSError as e:  # the answer is kept: the fleet's resend gets it
        print("%s %d: not kept to publish: %s" % (name, seq, e))


def _check(cfg, state, seq, data, now):
    """``(outcome, detail)`` of statement ``data`` (installed if it holds)."""
    from .trust_check import install_checked

    outcome = "ok"
    try:
        if not data:  # the agent keeps none that cannot be one (``answers``)
            raise PeerError("trust-update: the statement (1) must be 1..1024 bytes")
        with open(cfg["tls"]["ca"], "rb") as f:
            root = f.read()
        v = install_checked(state + ".trust", root, data, now)
        detail = ("trust statement v%d installed" % v) if v else \
            "trust statement already installed"
    except PeerError as e:
        outcome, detail = "refused", str(e)
    except (OSError, ValueError, KeyError) as e:
        outcome, detail = "failed", "trust store: %s" % e
    print("trust-update %d: %s: %s" % (seq, outcome, detail))
    # the checker and the statement's decoder off the heap before the answer is signed
    install_checked = data = root = None
    unload("cityedge_fw.trust_check", "cityedge_core.trust_statement")
    gc.collect()
    return outcome, detail
