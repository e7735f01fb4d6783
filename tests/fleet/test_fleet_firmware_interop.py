"""Batches signed by the real firmware core on the MicroPython unix port (compiled to .mpy,
64 KiB heap, pure-Python P-256 with RFC 6979 nonces) are verified and classified by the
fleet ingest, on SQLite and PostgreSQL. The device's key is registered through enrollment
(a CSR made in CPython from the same private scalar: the unix port has no CSR code here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_core import chain
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import Role
from cityedge_host.crypto import EcSigner, public_sec1
from cityedge_host.mpy import compile_core

from support.fleet import Api, device_body, enroll_device

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".venv" / "bin" / "micropython"
PRIVATE_D = 0x6B1A_55C3_09E2_7D44_A1B0_3C2F_9E8D_7A6B_5C4D_3E2F_1A0B_9C8D_7E6F_5A4B_3C2D_1E0F
BATCHES = 5
READINGS = 10
DEVICE = str(device_body(1)["id"])

FIRMWARE_SCRIPT = """
import sys
sys.path.insert(0, %(core)r)
from cityedge_core import batch, cose, p256
key = p256.PrivateKey(%(d)d)
pub = key.public_key().to_sec1()
print(pub.hex())
w = batch.BatchWriter(%(device)r, key, cose.kid_for_public_key(pub))
for b in range(%(batches)d):
    recs = batch.RecordBuffer()
    recs.add({-2: 'pm25-', -3: 1790000000 + 60 * b, -4: 'ug/m3', 0: '0', 2: b + 0.5})
    for i in range(1, %(readings)d):
        recs.add({0: str(i), 6: i, 2: b + i / 4})
    print(w.sign_buffer(recs, 7).hex())
"""


@pytest.fixture(scope="module")
def firmware_batches(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[bytes]]:
    """(SEC1 public key, signed batches) printed by the firmware core on MicroPython."""
    if not MICROPYTHON.exists():
        pytest.fail("MicroPython unix port missing at %s: run `make setup`" % MICROPYTHON)
    core = compile_core(tmp_path_factory.mktemp("mpy"))
    script = FIRMWARE_SCRIPT % {"core": str(core), "d": PRIVATE_D, "device": DEVICE,
                                "batches": BATCHES, "readings": READINGS}
    out = subprocess.run([str(MICROPYTHON), "-X", "heapsize=64k", "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert len(lines) == 1 + BATCHES, out.stdout
    return bytes.fromhex(lines[0]), [bytes.fromhex(h) for h in lines[1:]]


def test_firmware_signed_batches_are_ingested_and_classified(
        api: Api, firmware_batches: tuple[bytes, list[bytes]]) -> None:
    pub, batches = firmware_batches
    signer = EcSigner(ec.derive_private_key(PRIVATE_D, ec.SECP256R1()))
    assert public_sec1(signer.public_key) == pub  # the firmware derived the same key
    dev = enroll_device(api, 1, signer=signer)
    assert dev.id == DEVICE
    ing = Ingestor(api.engine, api.settings)
    b1, b2, b3, b4, b5 = batches
    statuses = [ing.handle(dev.topic, b).status for b in (b1, b2, b2, b4, b3, b5, b1)]
    assert statuses == [chain.OK, chain.OK, chain.DUPLICATE, chain.GAP, chain.REORDERED,
                        chain.OK, chain.DUPLICATE]
    viewer = api.headers(Role.viewer)
    rows = api.client.get("/devices/%s/readings" % dev.id, params={"limit": 500},
                          headers=viewer).json()
    assert len(rows) == BATCHES * READINGS
    by_seq = {(r["batch_seq"], r["name"]): r for r in rows}
    assert by_seq[(1, "pm25-0")]["t"] == 1_790_000_000.0
    assert by_seq[(1, "pm25-0")]["unit"] == "ug/m3"
    assert by_seq[(3, "pm25-4")] == {
        "t": 1_790_000_124.0, "name": "pm25-4", "unit": "ug/m3", "value": 3.0, "vs": None,
        "vb": None, "vd": None, "sum": None, "batch_seq": 3, "status": "reordered",
        "timebase": 0, "via": None}
    got = api.client.get("/devices/%s" % dev.id, headers=viewer).json()
    assert got["chain"] == {"last_seq": 5, "missing": 0, "forgotten": 0}
