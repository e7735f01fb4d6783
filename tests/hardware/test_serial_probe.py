"""The serial console check (CE-DBG-03): the rule on transcripts, and the probe on
pseudo-terminals: a simulated stock MicroPython board and the real unix port's REPL fail,
garbage and silence cannot be decided, and the real cityedge firmware, locked, on the
MicroPython unix port passes."""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from cityedge.cli import app
from cityedge_core import cbor, csr, frame, p256
from cityedge_hardware.serial_probe import HELLO, PROBE_STEPS, probe
from cityedge_hardware.serial_rules import REQ_NO_CONSOLE, ProbeStep, check_transcript, escape
from cityedge_hardware.verdict import Outcome
from cityedge_provision import simdevice
from cityedge_provision.simdevice import SimulatedDevice, compile_firmware

from support import mpy_cache

BANNER = (b"MicroPython v1.24.1 on 2024-11-29; Generic ESP32 module with ESP32\r\n"
          b'Type "help()" for more information.\r\n>>> ')


def _hello_reply(state: str = "locked") -> bytes:
    return frame.encode_frame({frame.F_TYPE: frame.T_HELLO, frame.F_STATE: state,
                               frame.F_FIRMWARE: "1.0.0", frame.F_ID: 1})


def _refusal() -> bytes:
    return frame.encode_frame(frame.error_message(frame.E_GARBAGE, "5 bytes of noise skipped"))


def _steps(*answers: bytes) -> list[ProbeStep]:
    return [ProbeStep(name, sent, ans) for (name, sent), ans in zip(PROBE_STEPS, answers,
                                                                    strict=False)]


# --- the rule ---------------------------------------------------------------------------

@pytest.mark.parametrize(("answers", "outcome"), [
    ((b"\r\nKeyboardInterrupt: \r\n>>> ",), Outcome.FAIL),
    ((b"", b"", b"raw REPL; CTRL-B to exit\r\n>"), Outcome.FAIL),
    ((b"", b"", b"", BANNER), Outcome.FAIL),
    ((b"", b"", b"", b"", _hello_reply() + b"MicroPython v1.22"), Outcome.FAIL),
    ((b"", b"", b"", b"", b""), Outcome.UNDECIDED),
    ((b"\x00\xff garbage",), Outcome.UNDECIDED),
    ((b"login: ",), Outcome.UNDECIDED),
    ((b"", b"", b"", b"", _hello_reply() + b"log line\r\n"), Outcome.UNDECIDED),
    ((b"", b"", b"", b"", _hello_reply()[:-1]), Outcome.UNDECIDED),  # a frame cut short
    ((b"", b"", b"", b"", _refusal()), Outcome.UNDECIDED),  # frames but no hello reply
    ((b"", b"", b"", b"", _refusal() + _hello_reply()), Outcome.PASS),
    ((b"", b"", b"", b"", _hello_reply()), Outcome.PASS),
    ((b"", b"", b"", b"", _hello_reply("tested")), Outcome.PASS),
])
def test_rule_table(answers: tuple[bytes, ...], outcome: Outcome) -> None:
    v = check_transcript(_steps(*answers))
    assert v.requirement == REQ_NO_CONSOLE
    assert v.outcome is outcome, v.reason
    assert v.evidence
    assert (v.fix == "") is (outcome is Outcome.PASS)


def test_rule_notes_a_device_that_is_not_locked() -> None:
    v = check_transcript(_steps(b"", b"", b"", b"", _hello_reply("tested")))
    assert v.evidence[0].raw == "tested"
    assert "not locked" in v.evidence[0].note


def test_evidence_is_escaped_and_bounded() -> None:
    v = check_transcript(_steps(b"\x1b[0m" * 100 + b">>> "))
    assert v.outcome is Outcome.FAIL
    raw = v.evidence[0].raw
    assert "\x1b" not in raw and len(raw) < 300
    assert escape(b"a\\b\x00") == "a\\x5cb\\x00"


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=5))
def test_rule_never_passes_without_a_hello_reply(answers: list[bytes]) -> None:
    v = check_transcript(_steps(*answers))
    assert v.outcome is not Outcome.PASS


@given(st.binary(max_size=64), st.sampled_from([b">>> ", b"raw REPL; CTRL-B to exit",
                                                b"MicroPython v", b'Type "help()"']),
       st.binary(max_size=64))
def test_rule_fails_on_any_console_marker(before: bytes, marker: bytes, after: bytes) -> None:
    v = check_transcript(_steps(b"", before + marker + after, _hello_reply()))
    assert v.outcome is Outcome.FAIL


# --- the probe on pseudo-terminals ---------------------------------------------------------

Responder = Callable[[bytes], bytes]


def _stock_repl(data: bytes) -> bytes:
    """What a stock MicroPython board answers to each probe byte."""
    out = bytearray()
    for b in data:
        if b == 0x03:
            out += b"\r\nKeyboardInterrupt: \r\n>>> "
        elif b == 0x0D:
            out += b"\r\n>>> "
        elif b == 0x01:
            out += b"\r\nraw REPL; CTRL-B to exit\r\n>"
        elif b == 0x02:
            out += b"\r\n" + BANNER
        else:
            out.append(b)  # the friendly REPL echoes what it is typed
    return bytes(out)


class PtyBoard:
    """A board on a pty: a thread answers on the master side; the probe opens the slave."""

    def __init__(self, respond: Responder) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.respond = respond
        self.received = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.master, 1024)
            except OSError:
                return
            self.received += data
            out = self.respond(data)
            if out:
                os.write(self.master, out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_board() -> Iterator[Callable[[Responder], PtyBoard]]:
    boards: list[PtyBoard] = []

    def make(respond: Responder) -> PtyBoard:
        boards.append(PtyBoard(respond))
        return boards[-1]

    yield make
    for b in boards:
        b.close()


def _sent_bytes() -> bytes:
    return b"".join(data for _, data in PROBE_STEPS)


def test_stock_micropython_repl_fails(pty_board: Callable[[Responder], PtyBoard]) -> None:
    board = pty_board(_stock_repl)
    result = probe(board.port)
    assert result.verdict.outcome is Outcome.FAIL
    assert "MicroPython console" in result.verdict.reason
    assert result.steps[0].name == "ctrl-c ctrl-c"
    assert bytes(board.received) == _sent_bytes()  # the probe writes nothing else


def test_garbage_cannot_be_decided(pty_board: Callable[[Responder], PtyBoard]) -> None:
    board = pty_board(lambda data: b"\xa5\x5a" * len(data))
    result = probe(board.port)
    assert result.verdict.outcome is Outcome.UNDECIDED
    assert "neither a console prompt nor cityedge frames" in result.verdict.reason
    assert "\\xa5Z" in result.verdict.evidence[0].raw


def test_silence_cannot_be_decided(pty_board: Callable[[Responder], PtyBoard]) -> None:
    board = pty_board(lambda data: b"")
    result = probe(board.port)
    assert result.verdict.outcome is Outcome.UNDECIDED
    assert "silent" in result.verdict.reason
    assert bytes(board.received) == _sent_bytes()


class ReplOnPty:
    """The real MicroPython unix port's REPL (a stock image's console) behind a pty: the
    interpreter's stdio is one pty, a thread copies bytes to and from the pty the probe
    opens."""

    def __init__(self, micropython: str) -> None:
        self.repl_master, repl_slave = os.openpty()
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.proc = subprocess.Popen([micropython], stdin=repl_slave, stdout=repl_slave,
                                     stderr=repl_slave, start_new_session=True)
        os.close(repl_slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        peer = {self.master: self.repl_master, self.repl_master: self.master}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(peer), [], [], 0.05)
            for fd in ready:
                try:
                    data = os.read(fd, 1024)
                except OSError:
                    return
                os.write(peer[fd], data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.proc.kill()
        self.proc.wait(5)
        os.close(self.master)
        os.close(self.slave)
        os.close(self.repl_master)


def test_real_micropython_repl_fails(micropython: str) -> None:
    repl = ReplOnPty(micropython)
    try:
        result = probe(repl.port)
    finally:
        repl.close()
    assert result.verdict.outcome is Outcome.FAIL, result.steps
    answers = b"".join(s.received for s in result.steps)
    assert b"raw REPL; CTRL-B to exit" in answers  # Ctrl-A really reached the raw REPL


# --- the real firmware, locked, on the MicroPython unix port -------------------------------

@pytest.fixture(scope="module")
def fw_mpy(tmp_path_factory: pytest.TempPathFactory, mpy_cross: str, micropython: str) -> Path:
    return mpy_cache.cached_tree(  # the run's one build (``support.mpy_cache``)
        tmp_path_factory, "simdevice", mpy_cache.firmware_inputs(Path(simdevice.__file__)),
        mpy_cross, compile_firmware, tmp_path_factory.mktemp("fw-mpy"))


def _locked_flash(root: Path) -> Path:
    """A device's flash as provisioning leaves it: a device key and the state ``locked``
    (the files and formats of ``cityedge_fw.provision``)."""
    root.mkdir(parents=True)
    key = p256.PrivateKey.generate(os.urandom)
    (root / "key.der").write_bytes(csr.ec_private_key_der(key))
    (root / "provision.cbor").write_bytes(cbor.dumps({"state": "locked"}))
    return root


@pytest.fixture
def locked_device(fw_mpy: Path, tmp_path: Path) -> Iterator[SimulatedDevice]:
    dev = SimulatedDevice(_locked_flash(tmp_path / "dev"), fw_mpy, "SN-LOCK1",
                          "urn:dev:mac:0024befffe80aa01").start()
    yield dev
    dev.stop()


def test_locked_cityedge_device_passes(locked_device: SimulatedDevice) -> None:
    result = probe(locked_device.port)
    v = result.verdict
    assert v.outcome is Outcome.PASS, (v, result.steps, locked_device.read_log())
    assert v.evidence[0].raw == "locked"
    assert locked_device.alive()
    assert "state=locked" in locked_device.read_log()


def test_cli_serial_json(locked_device: SimulatedDevice,
                         pty_board: Callable[[Responder], PtyBoard]) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["hw", "serial", "--port", locked_device.port, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["verdicts"][0]["outcome"] == "pass"
    bad = runner.invoke(app, ["hw", "serial", "--port", pty_board(_stock_repl).port])
    assert bad.exit_code == 1
    assert "FAIL" in bad.output and "CE-DBG-03" in bad.output
    assert "cityedge: the serial console requirement is not met" in bad.output
    gone = runner.invoke(app, ["hw", "serial", "--port", "/dev/does-not-exist"])
    assert gone.exit_code == 1
    assert "cannot open /dev/does-not-exist" in gone.output


def test_hello_is_the_only_frame_the_probe_sends() -> None:
    dec = frame.FrameDecoder()
    msgs = [m for m in dec.feed(_sent_bytes()) if not isinstance(m, frame.FrameError)]
    assert msgs == [{frame.F_TYPE: frame.T_HELLO, frame.F_ID: 1}]
    assert HELLO in _sent_bytes()
