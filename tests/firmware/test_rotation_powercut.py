"""Power cuts under the device's key rotation, on the real MicroPython unix port with LittleFS.

This file is both the pytest module (CPython side, bottom) and the MicroPython script those
tests run (top), as ``test_store_powercut.py`` is: ``micropython test_rotation_powercut.py
sweep SEED``. The script formats ``vfs.VfsLfs2`` on ``simbus.CutFlash``, lays out a
provisioned identity (slot 0: ``key.der``, ``cert.der``), and runs a whole rotation with
the firmware's own code, as the device runs it: the agent takes each command
(``cityedge_fw.answers.send``, as it calls it for a command the gate took: the command
kept on flash, then the board's reset), the next boot carries it out
(``update_check.run``, as ``main.main`` calls it: ``rotation_device.at_boot``, the answer
signed and kept, the CSR and the answer kept for the agent; the state file
``store.State``), and the agent after it publishes them once connected
(``answers.publish_unsent``), against a stand-in fleet that issues a certificate for the
CSR's key. The power is cut at one flash operation (program or erase), failing it,
tearing it or (``flaky``) failing one write and going on; then a fresh file system is
mounted on the image left behind and the device boots as ``main.main`` does (a command
left on flash is carried out first; then ``key_slots.current``, ``key_slots.paths``,
``keys.private_key_from_der``) and checks:

- the current slot's key loads and its certificate holds it (a TLS identity that works),
  and it is the old key or the new one the fleet issued a certificate for;
- the rotation then completes (the fleet's next rotation, as the fleet does after a step
  that was cut: ``cityedge_core.rotation``, "Power cuts"): the device ends on a new key
  with its certificate, and the key before it is gone from the flash; no command file
  is left behind (no boot loop).

``micropython test_rotation_powercut.py qos`` (no cuts): the agent publishes the CSR and
the answer a boot kept at QoS 1 while the link's send window has room, at QoS 0 when it
is full.

The "certificates" are stand-ins (the key's SEC1 point in a BIT STRING, as
``rotation.cert_holds_key`` looks for it): the fleet's real certificates are in the
end-to-end test, ``test_agent_rotation.py``.
"""

import sys

try:  # CPython (pytest) side; MicroPython has none of these and runs ``mp_main`` instead
    import subprocess
    from pathlib import Path

    import pytest

    CPYTHON = True
except ImportError:
    CPYTHON = False

BLOCK_SIZE = 512  # bytes per flash block
BLOCKS = 48  # 24 KiB file system
DEVICE = "urn:dev:mac:0024befffe804ff1"
ROOT = "/flash"
TLS = {"key": ROOT + "/key.der", "cert": ROOT + "/cert.der", "ca": ROOT + "/ca.der"}
STATE = ROOT + "/state.cbor"
CFG = {"tls": TLS, "store": {"state": STATE}}
SENT = []  # (topic, payload, qos) of every publish, across the device's boots


# ---------------------------------------------------------------- MicroPython side


def fake_cert(point):
    """A stand-in certificate for ``point`` (what ``cert_holds_key`` checks)."""
    return b"\x30\x82CERT" + DEVICE.encode() + b"\x03\x42\x00" + bytes(point)


class Reset(Exception):
    """The board's reset (the unix port's process would end)."""


class Link:
    """The agent's link as the rotation uses it: connected; keeps what was published."""

    room = True  # room in its send window: then published at QoS 1

    def __init__(self):
        from cityedge_fw import mqtt

        link = self
        self.client = type("C", (), {"state": mqtt.CONNECTED,
                                     "can_publish": lambda self: link.room})()
        self.on_connect = None

    async def publish(self, topic, payload, qos=0):
        SENT.append((topic, bytes(payload), qos))


class Writer:
    def __init__(self, key, kid):
        self.signer = key
        self.kid = kid


class Board:
    @staticmethod
    def unix_time():
        return 1700000000

    @staticmethod
    def reset():
        raise Reset()


class Agent:
    """The parts of ``Agent`` the rotation's commands use."""

    def __init__(self, key, kid):
        from cityedge_fw.store import State

        self.device = DEVICE
        self.topics = ("ce/v1/%s/up/readings" % DEVICE,)  # ``Agent.topics``' first
        self.cfg = {"tls": TLS}
        self.state = State(STATE)
        self.writer = Writer(key, kid)
        self.link = Link()
        self.board = Board()
        self.mem_errors = 0
        self.last_error = None

    async def _on_connect(self):
        pass

    def seal(self):
        pass


def boot():
    """What ``main.main`` does: a command a running agent kept is carried out first
    (``update_check.run``; the board resets after it, and boots again), then
    ``main.build``'s identity: the current slot's key and its certificate, checked; the
    agent publishes what a boot kept for it once connected (``answers``)."""
    import asyncio
    import os

    from cityedge_core import cose, rotation
    from cityedge_fw import answers, key_slots, update_check
    from cityedge_fw.keys import private_key_from_der, read_file

    for f in (".trust.new", ".rotation.new"):
        try:
            os.stat(STATE + f)
        except OSError:
            continue
        assert update_check.run(CFG), "boot: the kept command not run"
    key_path, cert_path = key_slots.paths(TLS, key_slots.current(TLS))
    key = private_key_from_der(read_file(key_path))
    point = key.public_key().to_sec1()
    assert rotation.cert_holds_key(read_file(cert_path), point), "boot: cert not for key"
    agent = Agent(key, cose.kid_for_public_key(point))
    try:
        os.stat(STATE + ".unpublished")
    except OSError:
        return agent
    answers.publish_unsent(agent)
    asyncio.run(agent.link.on_connect())
    assert agent.link.on_connect == agent._on_connect
    return agent


def results():
    from cityedge_core import cbor, cose

    out = []
    for topic, data, _ in SENT:
        if topic.endswith("/up/result"):
            body = cbor.loads(cose.decode_sign1(data).payload)
            out.append((body[3], body[4], body[5]))
    return out


NEW = []  # the kid of every key a rotation asked a certificate for (from its CSR)


class _Tls:
    """``mqtt_async`` as the switch uses it: the TLS context from the new files (mbedTLS
    would refuse the stand-in certificates; the end-to-end test uses real ones)."""

    @staticmethod
    def tls_context(cert, key, ca):
        return ("ctx", bytes(cert), bytes(ca))


sys.modules["cityedge_fw.mqtt_async"] = _Tls


def command(agent, name, seq, args):
    """The agent takes a command the gate took (``answers.send``): kept, then the reset;
    the next boot carries it out and the agent after it publishes the answer."""
    import asyncio

    from cityedge_fw import answers

    try:
        asyncio.run(answers.send(agent, name, seq, args))
    except Reset:
        pass
    else:
        raise AssertionError("%s: the agent did not reset" % name)
    agent = boot()
    if not [r for r in results() if r[0] == seq]:  # nothing kept to publish (a flash
        # error): the fleet sends the command again, the gate finds it a replay
        asyncio.run(answers.send(agent, Replay(name, seq), None, None))
    assert results()[-1][:2] == (seq, "ok"), results()
    return agent


class Replay:
    """The gate's ``CommandRefused`` for a seq taken before (the fleet's resend)."""

    replay = True

    def __init__(self, name, seq):
        self.name = name
        self.seq = seq

    def __str__(self):
        return "replay"


def rotate_once(agent, rid, seq):
    """One rotation as the fleet drives it; returns (the old kid, the new one), the
    agent after it."""
    from cityedge_core import cbor, cose, rotation

    agent = command(agent, "rotate", seq, {1: rid})
    csrs = [d for t, d, _ in SENT if t.endswith("/up/csr")]
    assert csrs, "no CSR published (a flash error): the fleet's rotation expires"
    csr_msg = csrs[-1]
    csr_der = cbor.loads(csr_msg)[rotation.M_CSR]
    i = csr_der.find(b"\x03\x42\x00\x04")
    point = csr_der[i + 3:i + 68]
    NEW.append(cose.kid_for_public_key(point))
    old_kid = agent.writer.kid
    agent = command(agent, "install-cert", seq + 1, {1: rid, 2: fake_cert(point)})
    new_kid = cose.kid_for_public_key(point)
    assert agent.writer.kid == new_kid  # the boot after the switch: the new slot
    agent = command(agent, "erase-key", seq + 2, {1: rid, 2: old_kid})
    assert "erased" in results()[-1][2], results()
    return old_kid, new_kid, agent


def provision():
    from cityedge_core import cose, csr, p256
    from cityedge_fw.files import write_atomic

    key = p256.PrivateKey(0xC0FFEE)
    point = key.public_key().to_sec1()
    write_atomic(TLS["key"], csr.ec_private_key_der(key))
    write_atomic(TLS["cert"], fake_cert(point))
    write_atomic(TLS["ca"], b"CA")
    return cose.kid_for_public_key(point)


def run_once(base, cut_at, mode, tear):
    """A rotation on a copy of ``base`` with a cut at flash op ``cut_at``; boot and finish
    on the image left behind. Returns (flash ops, whether the cut came, where it came)."""
    import vfs

    from cityedge_core.errors import CityedgeError

    from simbus import CutFlash, PowerCut

    flash = CutFlash(BLOCK_SIZE, BLOCKS, base, cut_at, mode, tear)
    vfs.mount(vfs.VfsLfs2(flash), ROOT)
    first = boot().writer.kid
    del NEW[:]
    del SENT[:]
    stage = "done"
    try:
        agent = boot()
        rotate_once(agent, 7, 1)
    except PowerCut:
        stage = "cut"
    except (AssertionError, CityedgeError, OSError) as e:  # flaky: one write failed
        if not flash.dead and mode != "flaky":
            raise
        stage = "failed: %s" % e
    try:  # noqa: SIM105 (no contextlib on MicroPython)
        vfs.umount(ROOT)
    except Exception:  # the dead file system may not unmount cleanly: it is discarded
        pass
    fresh = CutFlash(BLOCK_SIZE, BLOCKS, flash.image())
    vfs.mount(vfs.VfsLfs2(fresh), ROOT)
    try:
        agent = boot()  # a working identity after the cut
        held = agent.writer.kid
        assert held == first or held in NEW, "boot: a key no certificate was asked for"
        if stage == "done":
            assert held == NEW[0], "the rotation returned but the old key is current"
        # the fleet's next rotation completes from whatever the cut left
        old, newer, agent = rotate_once(agent, 8, 10)
        assert old == held and newer != first and newer not in NEW[:-1]
        import os

        files = sorted(os.listdir(ROOT))
        agent = boot()
        assert agent.writer.kid == newer
        from cityedge_fw import key_slots

        slot = key_slots.current(TLS)
        key_path, cert_path = key_slots.paths(TLS, 1 - slot)
        for path in (key_path, cert_path):
            assert path.rsplit("/", 1)[1] not in files, "old %s still on flash: %r" % (
                path, files)
        assert [f for f in files if f.endswith(".tmp") or f.endswith(".new")
                or f.endswith(".unpublished")] == [], files
    finally:
        vfs.umount(ROOT)
    return flash.ops, flash.dead, stage


def csr_qos():
    """A rotate carried out at boot, then the agent's publish with room in the link's
    send window, and again with the window full: the QoS of the CSR (``up/csr``) and of
    the answer (``up/result``) each time."""
    import asyncio

    import vfs

    from cityedge_fw import answers

    from simbus import CutFlash

    flash = CutFlash(BLOCK_SIZE, BLOCKS)
    vfs.VfsLfs2.mkfs(flash)
    vfs.mount(vfs.VfsLfs2(flash), ROOT)
    try:
        provision()
        agent = boot()
        got = []
        for rid, room in ((7, True), (8, False)):
            try:  # noqa: SIM105 (no contextlib on MicroPython)
                asyncio.run(answers.send(agent, "rotate", rid, {1: rid}))
            except Reset:
                pass
            del SENT[:]
            Link.room = room  # the next agent's link
            agent = boot()
            assert results()[-1][:2] == (rid, "ok"), results()
            for topic, _, qos in SENT:
                got.append("%s:%s:%d" % (rid, topic.rsplit("/", 1)[1], qos))
    finally:
        vfs.umount(ROOT)
    print("QOS " + " ".join(got))


def mp_main(argv):
    import vfs

    here = argv[0].rsplit("/", 1)[0] if "/" in argv[0] else "."
    sys.path.insert(0, here)
    sys.path.insert(0, here + "/../../firmware")
    import os

    from simbus import CutFlash

    _ = os
    if argv[1] == "qos":
        csr_qos()
        return
    blank = CutFlash(BLOCK_SIZE, BLOCKS)
    vfs.VfsLfs2.mkfs(blank)
    vfs.mount(vfs.VfsLfs2(blank), ROOT)
    provision()
    vfs.umount(ROOT)
    base = blank.image()
    total = run_once(base, -1, "fail", 0)[0]  # dry run: how many flash ops a rotation takes
    modes = ("fail", "tear", "flaky")
    seed = int(argv[2])
    cuts = 0
    for cut_at in range(total):
        mode = modes[(cut_at + seed) % 3]
        tear = cut_at * 7 + seed
        try:
            _, dead, stage = run_once(base, cut_at, mode, tear)
        except Exception:
            print("FAILED at cut=%d/%d mode=%s tear=%d" % (cut_at, total, mode, tear))
            raise
        cuts += 1 if dead or stage != "done" else 0
    print("OK sweep seed=%d ops=%d cuts=%d" % (seed, total, cuts))


if not CPYTHON and __name__ == "__main__":
    mp_main(sys.argv)


# ---------------------------------------------------------------- CPython (pytest) side

if CPYTHON:
    HERE = Path(__file__).resolve().parent
    MICROPYTHON = HERE.parents[1] / ".venv" / "bin" / "micropython"

    def _sweep(seed: int) -> str:
        if not MICROPYTHON.exists():
            pytest.fail("micropython not found: run `make setup`")
        proc = subprocess.run(
            [str(MICROPYTHON), str(HERE / "test_rotation_powercut.py"), "sweep", str(seed)],
            capture_output=True, text=True, timeout=600, cwd=HERE)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("OK"), proc.stdout
        return proc.stdout

    def test_the_csr_goes_at_qos_1_when_the_send_window_has_room() -> None:
        """The agent publishes the CSR and the answer a boot kept at QoS 1 while the
        link's in-flight window has room (the broker then acknowledges them), at QoS 0
        when the window is full, as the answers go."""
        if not MICROPYTHON.exists():
            pytest.fail("micropython not found: run `make setup`")
        proc = subprocess.run(
            [str(MICROPYTHON), str(HERE / "test_rotation_powercut.py"), "qos"],
            capture_output=True, text=True, timeout=120, cwd=HERE)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        line = proc.stdout.strip().splitlines()[-1]
        assert line == "QOS 7:csr:1 7:result:1 8:csr:0 8:result:0", proc.stdout

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_a_power_cut_at_every_write_of_a_rotation_leaves_a_working_identity(
            seed: int) -> None:
        """Every flash operation of a rotation cut, in each of the three ways (the seed
        turns which way each cut point gets): the device boots with a key whose
        certificate holds it, and the next rotation completes with the old key erased."""
        out = _sweep(seed)
        ops = int(out.split("ops=")[1].split()[0])
        cuts = int(out.split("cuts=")[1])
        assert ops > 20  # a rotation really writes the flash many times
        assert cuts >= ops * 2 // 3  # "flaky" cuts fail one write and may go on
