"""What the device update tests share: firmware releases built from this tree with their
own version, a signed release (root set, certified release key, manifest), its HTTPS
folder (``support.artifact_server``), and a device that reboots.

``UpdatingDevice`` runs a device the way a board with A/B slots boots, on the unix port:

1. the boot selector (``cityedge_fw.update_slots.select``) from the *factory* image (on
   a board: the frozen ``boot.py``, which an update never replaces), which counts a trial
   boot down or rolls back, and prints the slot to boot;
2. the application from that slot's ROMFS image (``<flash>/slot_<x>/firmware.romfs``,
   mapped at ``/rom`` by ``cityedge.romfs``, as a board mounts its application), the
   tests' device program ``mp_device`` (the real boot and agent on the stand-in board).

A process that ends is a reset: the loop starts again at 1, until the test stops it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
from fw_harness import DEVICE, FIRMWARE, device_config, device_env

from cityedge import build_firmware, romfs
from cityedge_core import cose
from cityedge_core.command import encode_command
from cityedge_host import mpy, release
from cityedge_host.crypto import EcSigner, public_sec1

from support.mosquitto import Credentials, Mosquitto, TestPKI

HW_CLASS = "unix-test"
COMPONENT = "device-firmware"
MAX_BOOTS = 20  # a device that boots more often in one test is broken: the loop ends
# The heap of the update tests' devices (``CE_UPDATE_HEAP`` overrides it, to measure):
# the agent tests' heap (``fw_harness.HEAP``). The update's boot steps complete at 64 KiB
# (``bench.ota_device --check``); the stand-in agent itself needs 72 (docs/ARCHITECTURE.md,
# "Device updates")
UPDATE_HEAP = os.environ.get("CE_UPDATE_HEAP", "72k")
_VERSION = re.compile(r'^VERSION = "[0-9.]+"$', re.M)


def build_release(out: Path, version: str, crash: bool = False) -> Path:
    """The firmware (and the tests' ``mp_device``) compiled with ``VERSION = version``,
    as its ROMFS image; returns the image. ``crash``: a release whose firmware package
    cannot be imported (it fails at every boot, before the agent starts)."""
    tree = out / ("tree-" + version)
    for rel in build_firmware.sources():
        src = FIRMWARE / rel
        if rel.as_posix() == "cityedge_fw/__init__.py":
            patched = out / ("init-" + version + ".py")
            text = _VERSION.sub('VERSION = "%s"' % version, src.read_text())
            if crash:
                text += '\nraise RuntimeError("a broken release")\n'
            patched.write_text(text)
            src = patched
        mpy.compile_file(src, tree / rel.with_suffix(".mpy"), build_firmware.module_name(rel))
    mpy.compile_file(Path(__file__).with_name("mp_device.py"), tree / "mp_device.mpy")
    image = out / ("firmware-" + version + ".romfs")
    romfs.write_image(tree, image)
    return image


class Releases:
    """An offline root set (2 of 3), a release key certified by it, and signing."""

    def __init__(self, tmp: Path, now: int | None = None) -> None:
        self.now = now or int(time.time())
        self.roots = [EcSigner.generate() for _ in range(3)]
        self.root_set = release.RootSet(2, [public_sec1(r.public_key) for r in self.roots])
        self.key = EcSigner.generate()
        self.keys = self.certify([self.key], version=1)
        self.root_file = tmp / "root-set.json"
        self.root_file.write_bytes(self.root_set.to_json())

    def certify(self, keys: list[EcSigner], version: int, signers: int = 2) -> bytes:
        return release.certify(self.root_set, self.roots[:signers], [release.CertifiedKey(
            public_sec1(k.public_key), [COMPONENT], self.now + 86400) for k in keys],
            version=version)

    def manifest(self, artifact: Path, version: str, seq: int, *, key: EcSigner | None = None,
                 hw: str = HW_CLASS, expires: int | None = None) -> bytes:
        return release.sign_release(key or self.key, artifact, COMPONENT, version, seq, [hw],
                                    expires or self.now + 3600)


def update_command(fleet: EcSigner, seq: int, url: str, manifest: bytes) -> bytes:
    return encode_command(fleet, fleet.kid, "update", DEVICE, seq, int(time.time()) + 3600,
                          {1: url, 2: hashlib.sha256(manifest).digest()})


def status_maps(messages: list[bytes]) -> list[dict[str, Any]]:
    return [cbor2.loads(cose.decode_sign1(m).payload) for m in messages]


def updates(messages: list[bytes]) -> list[tuple[str, Any]]:
    """(fw, update) of every status, in order."""
    return [(s["fw"], s.get("update")) for s in status_maps(messages)]


class UpdatingDevice:
    """A device with A/B slots that reboots (module doc). ``flash`` holds ``config.json``,
    the state, the buffer and the slots; slot ``a`` starts with ``factory``."""

    def __init__(self, tmp: Path, broker: Mosquitto | Any, pki: TestPKI, creds: Credentials,
                 factory: Path, releases: Releases, fleet_key: Path, heap: str = UPDATE_HEAP,
                 **agent: Any) -> None:
        self.tmp = tmp
        self.factory = factory
        self.heap = heap
        self.stop_file = tmp / "stop"
        settings = {"time_scale": 5, "status_interval_s": 10}
        settings.update(agent)
        self.config = device_config(tmp, broker, pki, creds, {"file": str(self.stop_file),
                                                              "drain": False},
                                    clock=True, fleet_keys=(str(fleet_key),), **settings)
        cfg = json.loads(self.config.read_text())
        self.flash = tmp / "flash"
        self.flash.mkdir(exist_ok=True)
        cfg["update"] = {"dir": str(self.flash), "root_set": str(releases.root_file),
                         "hw_class": HW_CLASS, "flash_budget": 1 << 20, "trial_s": 20,
                         "request_ms": 8000}
        self.config.write_text(json.dumps(cfg))
        slot = self.flash / "slot_a"
        slot.mkdir(exist_ok=True)
        shutil.copy(factory, slot / "firmware.romfs")
        self.boots: list[str] = []  # the slot of each boot, in order
        self.started: list[float] = []  # each boot's start (``time.monotonic``)
        self.outputs: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update_conf(self, **kv: Any) -> None:
        cfg = json.loads(self.config.read_text())
        cfg["update"].update(kv)
        self.config.write_text(json.dumps(cfg))

    def select(self) -> str:
        """The boot selector's verdict (and its pointer writes), from the factory image."""
        program = ("import cityedge_fw.update_slots as s\nprint('SLOT', s.select(%r))"
                   % str(self.flash))
        res = subprocess.run([sys.executable, "-m", "cityedge.romfs", "--image",
                              str(self.factory), "-X", "heapsize=32k", "-c", program],
                             capture_output=True, text=True, timeout=60,
                             env={"MICROPYPATH": ".frozen", "PATH": os.environ["PATH"]})
        m = re.search(r"^SLOT ([ab])$", res.stdout, re.M)
        assert m, res.stdout + res.stderr
        return m[1]

    def boot_once(self) -> subprocess.Popen[str]:
        self.started.append(time.monotonic())
        slot = self.select()
        self.boots.append(slot)
        image = self.flash / ("slot_" + slot) / "firmware.romfs"
        env = device_env(Path("."), self.config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cityedge.romfs", "--image", str(image), "-X",
             "heapsize=%s" % self.heap, "-c", "import mp_device"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self.proc

    def _loop(self) -> None:
        while not self._stop.is_set() and len(self.boots) < MAX_BOOTS:
            proc = self.boot_once()
            out, _ = proc.communicate()
            self.outputs.append(out)
            if self.stop_file.exists():
                return

    def start(self) -> UpdatingDevice:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def kill(self) -> None:
        """A power cut: the running process ends at once (the loop boots it again)."""
        if self.proc is not None:
            self.proc.kill()

    def stop(self, timeout: float = 60) -> None:
        self.stop_file.write_text("stop")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.kill()
                self._thread.join(10)

    def pointer(self) -> dict[str, Any]:
        p = self.flash / "boot.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def wait_for(self, pred: Any, timeout: float) -> None:
        """``fw_harness.wait_for`` that shows the device's output when it times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError("timed out waiting; boots %s\n%s" % (self.boots, self.log()))

    def log(self) -> str:
        return "\n----- boot -----\n".join(self.outputs)


class FleetUpdateCommands:
    """The fleet's side of a device's ``update`` commands, with the fleet's own code: the
    ingest's result rules in its order (``ingest.Ingestor._result``: envelope, the key's
    device, signature, payload, the device named, the command with that seq and name, not
    answered yet; ``acceptance.Acceptance``), then the campaign's reading of the recorded
    answer (``ota_store._result_state``, ``ota.member_status``). No database: a command
    is ``{seq: state}``; ``take`` records a taken result as ``command_queue`` does."""

    def __init__(self, creds: Credentials, device: str = DEVICE) -> None:
        from cityedge_host.crypto import EcVerifier

        self.device = device
        self.verifier = EcVerifier(creds.key.public_key())
        self.commands: dict[int, dict[str, Any]] = {}

    def sent(self, seq: int, name: str = "update") -> None:
        self.commands[seq] = {"name": name, "state": "sent", "detail": "", "data": None}

    def take(self, payload: bytes) -> str:
        """The decision's status (``acceptance.RESULT`` when taken) or the refusal."""
        from types import SimpleNamespace

        from cityedge_core import command_decode
        from cityedge_core.errors import MalformedError, SignatureError
        from cityedge_fleet import acceptance

        rules = acceptance.Acceptance(3, 3)
        publisher = SimpleNamespace(id=self.device, state="active", gateway_id=None)
        try:
            msg = command_decode.open_result(payload)
        except MalformedError:
            return "malformed"
        signer = self.device if bytes(msg.kid) == self.verifier.kid else None
        refusal = rules.signer(acceptance.RESULTS, publisher, bytes(msg.kid), signer, None)
        if refusal is not None:
            return refusal.status
        try:
            msg.verify(self.verifier)
        except SignatureError:
            return "bad_signature"
        result = command_decode.result_from_payload(msg.payload)
        refusal = rules.result_device(publisher, self.device, result)
        if refusal is not None:
            return refusal.status
        row = self.commands.get(result.seq)
        cmd = SimpleNamespace(**row) if row is not None else None
        decision = rules.answered(publisher, cmd, result)
        if decision.taken and row is not None:
            row.update(state=result.outcome, detail=result.detail, data=result.data)
        return decision.status

    def member_status(self, seq: int) -> tuple[str, str]:
        """What the OTA campaign makes of command ``seq``'s recorded answer."""
        from cityedge_core import cbor
        from cityedge_fleet import ota, ota_store

        row = self.commands[seq]
        data = cbor.dumps(row["data"]) if row["data"] is not None else None
        facts = ota.CommandFacts(row["state"], sends=1, attempts=1, detail=row["detail"],
                                 result_state=ota_store._result_state(data))
        status, reason = ota.member_status(facts)
        return str(status.value), reason
