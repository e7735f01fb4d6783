"""Power cuts under the device's key rotation, on the real MicroPython unix port with LittleFS.

This file is both the pytest module (CPython side, bottom) and the MicroPython script those
tests run (top), as ``test_store_powercut.py`` is: ``micropython test_rotation_powercut.py
sweep SEED``. The script formats ``vfs.VfsLfs2`` on ``simbus.CutFlash``, lays out a
provisioned identity (slot 0: ``key.der``, ``cert.der``), and runs a whole rotation with
the firmware's own code (``cityedge_fw.answers.send``, as the agent calls it for a
command the gate took: ``rotation_device`` for ``rotate``, ``install-cert`` and
``erase-key``, each answered, then ``key_slots.after`` for the switch; the state file
``store.State``) against a stand-in fleet that issues a certificate for the CSR's key. The
power is cut at one flash operation (program or erase), failing it, tearing it or
(``flaky``) failing one write and going on; then a fresh file system is mounted on the
image left behind and the device boots as ``main.build`` does (``key_slots.current``,
``key_slots.paths``, ``keys.private_key_from_der``) and checks:

- the current slot's key loads and its certificate holds it (a TLS identity that works),
  and it is the old key or the new one the fleet issued a certificate for;
- the rotation then completes (the fleet's next rotation, as the fleet does after a step
  that was cut: ``cityedge_core.rotation``, "Power cuts"): the device ends on a new key
  with its certificate, and the key before it is gone from the flash.

``micropython test_rotation_powercut.py qos`` (no cuts): ``rotate`` publishes its CSR at
QoS 1 while the stand-in link's send window has room, at QoS 0 when it is full.

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


# ---------------------------------------------------------------- MicroPython side


def fake_cert(point):
    """A stand-in certificate for ``point`` (what ``cert_holds_key`` checks)."""
    return b"\x30\x82CERT" + DEVICE.encode() + b"\x03\x42\x00" + bytes(point)


class Link:
    """The agent's link as the rotation uses it: connected; keeps what was published."""

    def __init__(self):
        from cityedge_fw import mqtt

        link = self
        self.room = True  # room in its send window: ``answers`` then publishes at QoS 1
        self.client = type("C", (), {"state": mqtt.CONNECTED,
                                     "can_publish": lambda self: link.room})()
        self.sent = []
        self.sent_qos = []  # the QoS of each publish, in the order of ``sent``
        self.ssl_ctx = None
        self._read_error = None

    async def publish(self, topic, payload, qos=0):
        self.sent.append((topic, bytes(payload)))
        self.sent_qos.append(qos)


class Writer:
    def __init__(self, key, kid):
        self.signer = key
        self.kid = kid


class Agent:
    """The parts of ``Agent`` the rotation commands use."""

    def __init__(self, key, kid):
        from cityedge_fw.store import State

        self.device = DEVICE
        self.topics = ("ce/v1/%s/up/readings" % DEVICE,)  # ``Agent.topics``' first
        self.cfg = {"tls": TLS}
        self.state = State(ROOT + "/state.cbor")
        self.writer = Writer(key, kid)
        self.link = Link()
        self.mem_errors = 0
        self.last_error = None


def boot():
    """What ``main.build`` loads: the current slot's key, and its certificate; checked."""
    from cityedge_core import cose, rotation
    from cityedge_fw import key_slots
    from cityedge_fw.keys import private_key_from_der, read_file

    key_path, cert_path = key_slots.paths(TLS, key_slots.current(TLS))
    key = private_key_from_der(read_file(key_path))
    point = key.public_key().to_sec1()
    assert rotation.cert_holds_key(read_file(cert_path), point), "boot: cert not for key"
    return Agent(key, cose.kid_for_public_key(point))


def results(agent):
    from cityedge_core import cbor, cose

    out = []
    for topic, data in agent.link.sent:
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


def rotate_once(agent, rid, seq):
    """One rotation as the fleet drives it; returns the new key's kid (or raises)."""
    import asyncio

    from cityedge_core import cbor, cose, rotation
    from cityedge_fw import answers

    def run(agent, name, seq, args):  # as the agent runs a command the gate took
        return answers.send(agent, name, seq, args)

    asyncio.run(run(agent, "rotate", seq, {1: rid}))
    assert results(agent)[-1][:2] == (seq, "ok"), results(agent)
    csr_msg = [d for t, d in agent.link.sent if t.endswith("/up/csr")][-1]
    csr_der = cbor.loads(csr_msg)[rotation.M_CSR]
    i = csr_der.find(b"\x03\x42\x00\x04")
    point = csr_der[i + 3:i + 68]
    NEW.append(cose.kid_for_public_key(point))
    old_kid = agent.writer.kid
    asyncio.run(run(agent, "install-cert", seq + 1, {1: rid, 2: fake_cert(point)}))
    assert results(agent)[-1][:2] == (seq + 1, "ok"), results(agent)
    new_kid = cose.kid_for_public_key(point)
    assert agent.writer.kid == new_kid and agent.link._read_error is not None
    asyncio.run(run(agent, "erase-key", seq + 2, {1: rid, 2: old_kid}))
    assert results(agent)[-1][:2] == (seq + 2, "ok"), results(agent)
    assert "erased" in results(agent)[-1][2], results(agent)
    return old_kid, new_kid


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
        old, newer = rotate_once(agent, 8, 10)
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
        assert [f for f in files if f.endswith(".tmp")] == [], files
    finally:
        vfs.umount(ROOT)
    return flash.ops, flash.dead, stage


def csr_qos():
    """``rotate`` with room in the link's send window, then with the window full: the
    QoS of each CSR published on ``up/csr`` (and of each answer on ``up/result``)."""
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
            agent.link.room = room
            asyncio.run(answers.send(agent, "rotate", rid, {1: rid}))
            assert results(agent)[-1][:2] == (rid, "ok"), results(agent)
            for i, (topic, _) in enumerate(agent.link.sent):  # (no zip(strict=) there)
                got.append("%s:%s:%d" % (rid, topic.rsplit("/", 1)[1],
                                         agent.link.sent_qos[i]))
            del agent.link.sent[:]
            del agent.link.sent_qos[:]
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
        """``rotate`` publishes its CSR at QoS 1 while the link's in-flight window has
        room (the broker then acknowledges it), at QoS 0 when the window is full (a CSR
        lost then is sent again by the fleet's resend of ``rotate``), as the answers go."""
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
