"""Signed command results from the device: ``<prefix>/<device>/up/result``.

Every command the gate takes or refuses for this device is answered with a result signed
by the device's current key (``cityedge_core.command.encode_result``: the format the
fleet's ingest verifies, as the Pi gateway's ``cityedge_host.command_responder`` sends
it): ``ok``, ``refused`` with the reason, or ``failed`` with the error. Forged commands
and other devices' are not answered (only an authentic command for this device is worth
an answer); the retained ``desired`` state is not a queued command and is not answered.

The fleet sends a command again until it has an answer, so the last ``_KEPT`` answers are
kept on flash (``<state file>.ans``, one atomic write per answer: ``[seq 8 bytes, length
2 bytes, signed result]...``, oldest first) and a repeat of a seq answered before gets
the same bytes again; a repeat of one with no answer kept (a power cut between taking and
answering it, or too old) is refused as a replay, with the gate's reason, as the fast
device does (``cityedge.fastdevice``). Results go out at QoS 1 when the agent's in-flight
window has room (the broker then holds the result for the fleet's persistent session),
else at QoS 0: the window is the forwarder's, and nothing here waits for room in it (an
answer is sent from the link's own task, which reads the PUBACKs). The PUBACK is not
waited for either: a lost result is answered again, from flash, when the fleet re-sends.

The result is encoded here as ``command.encode_result`` encodes it (the same bytes:
``tests/firmware/test_answers.py``), with the map keys as constants the compiler folds:
the core's module would bring two dozen names onto the device's heap for good. Loaded
for the answer only (``Agent.handle_command``), then unloaded; its names are interned at
boot (``main.build``), where the tests' device had 8 free entries in its last pool of
names (``docs/ARCHITECTURE.md``, "Memory on the device"): the functions and arguments
reuse names the agent interns anyway. The commands that need more than the running
agent has room for are kept on flash here and the board resets (``_for_boot``): a
``trust-update``'s statement is checked at the next boot (``trust_check``), a rotation's
command carried out there (``rotation_device``), before the agent is built; that boot
keeps the signed answer (and a CSR) for the agent (``keep_unsent``), which publishes
them once connected (``publish_unsent``), and with the answers for the fleet's resend.
``mqtt`` is not imported here (its ``CONNECTED`` is looked up where a result is sent):
the boot signs and keeps answers with this module before MQTT is loaded.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from cityedge_core import cbor, cose

from .files import write_atomic

_KEPT = const(4)  # answers kept on flash for repeats
_DETAIL_MAX = const(256)  # limits.RESULT_DETAIL_MAX_CHARS (held equal by the test)
_STATEMENT_MAX = const(1024)  # trust_statement.STATEMENT_MAX_BYTES (held equal by a test)
_ROTATION_NEW = const(".rotation.new")  # <state> + this: a rotation command for the boot
_UNSENT = const(".unpublished")  # <state> + this: messages signed at boot, to publish


async def send(agent, name, seq, args):
    """Answer command ``name`` (seq ``seq``, arguments ``args``), which the gate took; or
    ``name`` is the gate's ``CommandRefused`` for this device: the kept answer of a seq
    answered before, or ``refused`` with the gate's reason."""
    if not isinstance(name, str):
        if name.replay:
            for s, data in _kept(agent):
                if s == name.seq:
                    await _send(agent, data)
                    return
        await _signed(agent, name.name, name.seq, "refused", str(name))
    elif name == "status":  # the status itself went out already (``publish_status``)
        await _signed(agent, name, seq, "ok", "")
    elif name == "trust-update":  # kept, checked at the next boot (``trust_check``)
        raw = args.get(1) if isinstance(args, dict) else None  # (names interned anyway)
        _for_boot(agent, ".trust.new", seq, raw if isinstance(raw, bytes) and
                  len(raw) <= _STATEMENT_MAX else b"")
    else:  # the rotation's commands: carried out at the next boot (``rotation_device``)
        try:
            raw = cbor.dumps(args)
        except (TypeError, ValueError):  # none the fleet sends: refused at boot
            raw = b""
        d = name.encode()
        _for_boot(agent, _ROTATION_NEW, seq, (bytes([len(d)]) + d, raw))


def _for_boot(agent, sfx, seq, data):
    """Keep command ``seq`` for the next boot (``<state>`` + ``sfx``: ``[len, device, seq
    8, now 8]`` and ``data``, bytes or a tuple of parts), seal the readings collected so
    far (none is lost to the reset) and reset the board."""
    d = agent.device.encode()
    write_atomic(agent.state.path + sfx, (
        bytes([len(d)]) + d + seq.to_bytes(8, "big") +
        (agent.board.unix_time() or 0).to_bytes(8, "big"),) +
        (data if isinstance(data, tuple) else (data,)))
    agent.seal()
    agent.board.reset()


def keep_unsent(state_path, parts):
    """Keep messages signed at boot for the agent to publish once connected
    (``publish_unsent``): ``parts`` is ``[(leaf, payload)]``, ``leaf`` 0 for
    ``up/result``, 1 for ``up/csr``; one atomic write of ``[leaf 1, length 2, payload]``
    each (``<state>.unpublished``)."""
    out = []
    for leaf, data in parts:
        out.append(bytes([leaf]) + len(data).to_bytes(2, "big"))
        out.append(data)
    write_atomic(state_path + _UNSENT, tuple(out))


def publish_unsent(agent):
    """At boot (``main.build``), when messages signed at boot wait (``keep_unsent``): the
    link's ``on_connect`` subscribes as the agent's does, then publishes them (QoS 1 when
    the window has room, else 0, as the answers go) and removes the file, then gives the
    link the agent's own ``on_connect`` back. A connection lost before the file is
    removed publishes them all again at the next connect (the fleet takes a repeated
    result or CSR as a repeat); one lost after it is answered from ``<state>.ans`` when
    the fleet sends the command again."""

    async def on_connect():
        await agent._on_connect()
        path = agent.state.path + _UNSENT
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            raw = b""
        i = 0
        while i + 3 <= len(raw):
            n = int.from_bytes(raw[i + 1:i + 3], "big")
            # beside up/readings: the scheme's and the configured prefix's (``topics``)
            await agent.link.publish(agent.topics[0][:-8] + ("csr" if raw[i] else "result"),
                                     raw[i + 3:i + 3 + n],
                                     1 if agent.link.client.can_publish() else 0)
            i += 3 + n
        raw = None
        try:
            import os

            os.remove(path)
        except OSError:
            pass
        agent.link.on_connect = agent._on_connect

    agent.link.on_connect = on_connect


def _encode(agent, name, seq, kind, msg, data=None):
    """``command.encode_result`` (outcome ``kind``, detail ``msg``, ``data`` if not None)
    with the device's current key."""
    out = {1: name, 2: agent.device, 3: seq, 4: kind, 5: msg[:_DETAIL_MAX]}  # names
    if data is not None:  # the agent interns anyway (a new one is a heap at boot)
        out[6] = data
    return cose.encode_sign1(cbor.dumps(out), agent.writer.signer, agent.writer.kid)


def _path(agent):
    return agent.state.path + ".ans"


def _kept(agent):
    """``[(seq, signed result)]`` kept on flash, oldest first (a torn tail is ignored)."""
    try:
        with open(_path(agent), "rb") as f:
            raw = f.read()
    except OSError:
        return []
    out = []
    i = 0
    while i + 10 <= len(raw):
        n = int.from_bytes(raw[i + 8:i + 10], "big")
        if i + 10 + n > len(raw):
            break
        out.append((int.from_bytes(raw[i:i + 8], "big"), raw[i + 10:i + 10 + n]))
        i += 10 + n
    return out


async def _send(agent, data):
    """Publish a signed result if the link is up (else the fleet sends the command again)."""
    from .mqtt import CONNECTED  # resident in the agent; a boot signs, never sends

    if agent.link.client.state == CONNECTED:
        # beside up/readings: the scheme's and the configured prefix's (``topics``)
        await agent.link.publish(agent.topics[0][:-8] + "result", data,
                                 1 if agent.link.client.can_publish() else 0)


async def _signed(agent, name, seq, kind, msg, data=None):
    """Sign the result of command ``seq`` (with ``data``, if not None), keep it on flash,
    publish it."""
    data = _encode(agent, name, seq, kind, msg, data)
    _keep(agent, seq, data)
    await _send(agent, data)


def _keep(agent, seq, data):
    """Keep signed result ``data`` of command ``seq`` with the last answers on flash."""
    parts = []
    for s, d in _kept(agent)[-(_KEPT - 1):]:
        if s != seq:
            parts.append(s.to_bytes(8, "big") + len(d).to_bytes(2, "big"))
            parts.append(d)
    parts.append(seq.to_bytes(8, "big") + len(data).to_bytes(2, "big"))
    parts.append(data)
    try:
        write_atomic(_path(agent), tuple(parts))
    except OSError:  # not kept: a repeat is refused as a replay; the answer still goes out
        pass
