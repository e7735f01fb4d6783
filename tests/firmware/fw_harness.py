"""Helpers for the device-agent tests: import paths, .mpy compilation, running MicroPython.

The firmware runs from .mpy files compiled by ``cityedge_host.mpy`` into a temp dir:
compiling source inside a 64 KiB heap does not fit next to the agent.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from cityedge import romfs
from cityedge.build_firmware import compile_tree
from cityedge_core import chain
from cityedge_host import mpy
from cityedge_host.crypto import EcVerifier

from support.device_result import AT_STOP_KEYS, RESULT_KEYS, qstr_pools, result
from support.mosquitto import OBSERVER, Credentials, Mosquitto, TestPKI

__all__ = ["AT_STOP_KEYS", "RESULT_KEYS", "qstr_pools", "result"]  # for the tests, the bench

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
MICROPYTHON = ROOT / ".venv" / "bin" / "micropython"

# Heap for the agent end-to-end tests (``CE_TEST_HEAP`` overrides it, to measure), every
# one of them (the commands test too): what the board's boot path needs with the tests'
# stand-in board. The device boots as a board boots (``mp_device``: ``config.json`` on the
# flash root, ``cityedge_fw.main.main``, the same order and code as ``main.boot()``).
# Measured there (issue 13, after the heap cuts): 53.0 KiB in use after boot, 612 interned
# names in five pools (the sixth would cost 7.5 KiB: ``finish`` checks that none is added
# while the agent runs), at most 58.9 KiB in use while streaming; 12 batches with no
# MemoryError at 72k (12.2 KiB the least free) and at 68k (8.1); at 64k they stream but
# the agent survives MemoryErrors (statuses skipped), which these tests refuse. The tests
# stay at 72k: at 68k the commands test once missed its replay verdict in a whole-suite
# run on both cores (a command's decoders found no room twice and the run ended before the
# retry), so 68k is not a heap every test keeps to under load. The firmware runs from a
# ROMFS image mapped outside the heap (``cityedge.romfs``), as it runs from a flash
# partition on an ESP32 or Pico W, so its bytecode is not on the heap; module, function
# and class objects, string constants and interned names are (this 64-bit port allocates
# in 32-byte blocks, every object twice its size on a 32-bit board). Figures per stage:
# docs/ARCHITECTURE.md, "Memory on the device". Every test but the commands test requires
# the agent's ``mem_errors`` to be 0.
HEAP = os.environ.get("CE_TEST_HEAP", "72k")
DEVICE = "urn:dev:mac:0024befffe804ff1"

if str(FIRMWARE) not in sys.path:
    sys.path.insert(0, str(FIRMWARE))


def compile_firmware(out: Path, packages: tuple[str, ...] = ("cityedge_core", "cityedge_fw")
                     ) -> Path:
    """Compile every module of ``packages`` to ``out/<package>/...mpy`` as ``make
    firmware`` does (``build_firmware.compile_tree``); returns ``out``."""
    compile_tree(out, packages)
    return out


def run_micropython(script: str, path: Path, heap: str = "64k", timeout: float = 60,
                    cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (source text) on the unix port with ``path`` first on sys.path."""
    code = "import sys\nsys.path.insert(0, %r)\n%s" % (str(path), script)
    return subprocess.run([str(MICROPYTHON), "-X", "heapsize=%s" % heap, "-c", code],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def compile_device(out: Path) -> Path:
    """The firmware plus the test device script ``mp_device`` as .mpy under ``out``."""
    compile_firmware(out)
    mpy.compile_file(Path(__file__).with_name("mp_device.py"), out / "mp_device.mpy")
    return out


_IMAGES = threading.Lock()  # devices started on threads of one test build it once


def romfs_image(mpy_dir: Path) -> Path:
    """The ROMFS image of a compiled tree (built once, next to the tree)."""
    image = mpy_dir.with_name(mpy_dir.name + ".romfs")
    with _IMAGES:
        if not image.exists():
            romfs.write_image(mpy_dir, image)
    return image


def device_argv(mpy_dir: Path, program: str, heap: str = HEAP) -> list[str]:
    """Run ``program`` on the unix port with ``mpy_dir``'s ROMFS image mounted at /rom."""
    return [sys.executable, "-m", "cityedge.romfs", "--image", str(romfs_image(mpy_dir)),
            "-X", "heapsize=%s" % heap, "-c", program]


# Keys of a test's device file that are the test's, not the device configuration's:
# ``mp_device`` reads them (stop condition, the stand-in board's sensors and faults).
TEST_KEYS = ("stop", "clock", "fail_every", "sensors")


def device_env(mpy_dir: Path, config: Path) -> dict[str, str]:
    """The device's environment, booting as a board boots: the test's file ``config`` is
    split into the device's ``config.json`` on its flash root (``CITYEDGE_FLASH``, a
    ``flash`` directory beside ``config``) and the test's own keys (``CE_CONFIG``). The
    compiled tree is not on MICROPYPATH: every module comes from the ROMFS image
    (``device_argv``), so a failed mount cannot go unnoticed."""
    cfg = json.loads(config.read_text())
    flash = config.parent / "flash"
    flash.mkdir(exist_ok=True)
    (flash / "config.json").write_text(json.dumps(
        {k: v for k, v in cfg.items() if k not in TEST_KEYS}))
    return {"MICROPYPATH": ".frozen", "CE_CONFIG": str(config), "CITYEDGE_FLASH": str(flash),
            "PATH": os.environ.get("PATH", "")}


def device_config(tmp: Path, broker: Mosquitto, pki: TestPKI, creds: Credentials,
                  stop: dict[str, Any], device: str = DEVICE, *, clock: bool = False,
                  fleet_keys: tuple[str, ...] = (), **agent: Any) -> Path:
    fail_every = agent.pop("fail_every", 0)
    settings = {"sample_interval_s": 1, "batch_readings": 10, "time_scale": 20,
                "status_interval_s": 5}
    settings.update(agent)
    cfg = {"device": device, "stop": stop, "clock": clock, "fail_every": fail_every,
           "fleet_keys": list(fleet_keys),
           "broker": {"host": "127.0.0.1", "port": broker.port,
                      "server_hostname": "localhost"},
           "tls": {"cert": str(creds.cert_der), "key": str(creds.key_der),
                   "ca": str(pki.ca_der)},
           "store": {"dir": str(tmp / "buffer"), "state": str(tmp / "state.cbor")},
           "agent": settings}
    path = tmp / "device.json"
    path.write_text(json.dumps(cfg))
    return path


def start_device(mpy_dir: Path, config: Path, heap: str = HEAP) -> subprocess.Popen[str]:
    return subprocess.Popen(device_argv(mpy_dir, "import mp_device", heap),
                            env=device_env(mpy_dir, config),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 90, *,
           mem_errors_ok: bool = False, names_grow: int = 0) -> dict[str, Any]:
    """The device's RESULT once it stopped. Unless ``mem_errors_ok``, the agent must not
    have caught a single MemoryError (it counts those it survives). ``names_grow``: pools
    of interned names the run may add (a key rotation's module: its names come with it)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("device did not finish:\n%s\n%s" % (out, err)) from None
    assert proc.returncode == 0, out + err
    found = result(out)
    assert found is not None, out + err
    found["qstr"] = qstr_pools(out)
    assert mem_errors_ok or found["mem_errors"] == 0, found
    # every name the agent uses is interned at boot (``main.build``): no pool of
    # interned names is added while it runs (one block of kilobytes it may not find)
    assert found["qstr"][-1][0] - found["qstr"][0][0] <= names_grow, found["qstr"]
    return found


class Via:
    """The broker as the device sees it: through a link proxy (``support.linkproxy``)."""

    def __init__(self, broker: Mosquitto, proxy: Any) -> None:
        self.port = proxy.port
        self.pki = broker.pki


class Subscriber:
    """The fleet side: a persistent paho session on ce/v1/+/up/# (the broker's test
    observer: the fleet's own ingest may read only through its shared subscription), or
    on ``topic_filter``."""

    def __init__(self, broker: Mosquitto, pki: TestPKI, topic_filter: str = "ce/v1/+/up/#"
                 ) -> None:
        creds = pki.service(OBSERVER)
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="ingest-test",
                        clean_session=False, protocol=paho.MQTTv311)
        c.tls_set(ca_certs=str(pki.ca_pem), certfile=str(creds.cert_pem),
                  keyfile=str(creds.key_pem), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.reconnect_delay_set(min_delay=1, max_delay=1)
        c.on_message = self._on_message
        c.on_connect = lambda cl, *_a: cl.subscribe(topic_filter, qos=1)
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        self.client = c
        assert self.subscribed.wait(10), "subscriber could not subscribe"

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def readings(self, device: str = DEVICE) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == "ce/v1/%s/up/readings" % device]

    def status(self, device: str = DEVICE) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == "ce/v1/%s/up/status" % device]

    def results(self, device: str = DEVICE) -> list[bytes]:
        """The device's signed command results (``up/result``), in arrival order."""
        with self.lock:
            return [p for t, p in self.messages if t == "ce/v1/%s/up/result" % device]

    def close(self) -> None:
        # disconnect first: it wakes the network thread, which then ends at once; stopped
        # first, the thread ends only at its next 1 s select timeout
        self.client.disconnect()
        self.client.loop_stop()


def verifier_for(creds: Credentials, device: str = DEVICE) -> chain.BatchVerifier:
    v = EcVerifier(creds.key.public_key())
    return chain.BatchVerifier({v.kid: chain.KeyEntry(device, v)})


def check_chain(messages: list[bytes], creds: Credentials) -> list[int]:
    """Every message verifies; first arrivals are 1, 2, 3, ... (redeliveries are duplicates)."""
    verifier = verifier_for(creds)
    firsts = []
    for data in messages:
        verdict = verifier.check(data)
        assert verdict.status in (chain.OK, chain.DUPLICATE), verdict
        if verdict.status == chain.OK:
            firsts.append(verdict.batch.seq)
    assert firsts == list(range(1, len(firsts) + 1))
    return firsts


def wait_for(pred: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


class RebootingDevice:
    """``start_device`` again each time the device resets (its process ends without the
    test's stop file: a board's reset), until ``stop``: the unix port's stand-in for a
    board that reboots. ``outputs``: each boot's stdout and stderr."""

    def __init__(self, mpy_dir: Path, config: Path, stop_file: Path, heap: str = HEAP,
                 max_boots: int = 30) -> None:
        self.mpy_dir = mpy_dir
        self.config = config
        self.stop_file = stop_file
        self.heap = heap
        self.max_boots = max_boots
        self.outputs: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while len(self.outputs) < self.max_boots:
            self.proc = start_device(self.mpy_dir, self.config, self.heap)
            out, err = self.proc.communicate()
            self.outputs.append(out + err)
            if self.stop_file.exists():
                return

    def start(self) -> RebootingDevice:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self.stop_file.write_text("stop")
        self._thread.join(timeout)
        if self._thread.is_alive() and self.proc is not None:
            self.proc.kill()
            self._thread.join(10)

    def log(self) -> str:
        return "\n----- boot -----\n".join(self.outputs)
