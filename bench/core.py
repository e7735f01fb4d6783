"""Core benchmark: CPython batch verify path vs raw OpenSSL ES256 verify; MicroPython signing.

The baseline is measured in the same run on the same bytes: OpenSSL verifying each batch's
Sig_structure with a precomputed DER signature (the least work any verifier must do). Our
path does everything ingest does: COSE decode, key lookup, signature, payload decode
(cbor2, checked), batch validation, chain classification.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from bench.machine import median_of
from cityedge import romfs
from cityedge_core import batch as batchmod
from cityedge_core import chain, cose, senml
from cityedge_host import fastcbor
from cityedge_host.crypto import EcSigner
from cityedge_host.mpy import compile_core
from cityedge_host.verify import make_batch_verifier

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "urn:dev:mac:0024befffe804ff1"
N_BATCHES = 2000
READINGS = 50
RUNS = 5


def make_records(n: int, t0: int) -> list[dict[int, Any]]:
    recs: list[dict[int, Any]] = [{senml.BN: DEVICE + ":", senml.BT: t0, senml.N: "temp",
                                   senml.U: "Cel", senml.V: 21.5}]
    for i in range(1, n):
        recs.append({senml.N: ("temp", "rh", "pm25")[i % 3], senml.T: i, senml.V: 20 + i / 8})
    return recs


def cpython_verify() -> dict[str, float]:
    signer = EcSigner.generate()
    w = batchmod.BatchWriter(DEVICE, signer, signer.kid)
    batches = [w.sign(make_records(READINGS, 1_700_000_000 + i), boot=1)
               for i in range(N_BATCHES)]
    ring = {signer.kid: chain.KeyEntry(DEVICE, signer.verifier())}
    pub = signer.public_key
    raw = []
    for b in batches:
        msg = cose.decode_sign1(b)
        sig = encode_dss_signature(int.from_bytes(msg.signature[:32], "big"),
                                   int.from_bytes(msg.signature[32:], "big"))
        raw.append((sig, msg.to_be_signed()))
    algo = ec.ECDSA(hashes.SHA256())

    def run_raw() -> float:
        t = time.perf_counter()
        for sig, tbs in raw:
            pub.verify(sig, tbs, algo)
        return N_BATCHES / (time.perf_counter() - t)

    def run_ours(fast: bool) -> Any:
        def go() -> float:
            v = make_batch_verifier(ring) if fast else chain.BatchVerifier(ring)
            t = time.perf_counter()
            for b in batches:
                if v.check(b).status != chain.OK:
                    raise SystemExit("bench: unexpected verdict")
            return N_BATCHES / (time.perf_counter() - t)
        return go

    # Interleave baseline and ours so load from other processes hits both alike; the ratio
    # is taken per pair, then the median.
    ours = run_ours(True)
    pairs = [(run_raw(), ours()) for _ in range(RUNS)]
    raw_rate = statistics.median(p[0] for p in pairs)
    fast_rate = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[1] / p[0] for p in pairs)
    core_rate = median_of(3, run_ours(False))
    return {"raw_openssl_verify_per_s": raw_rate, "ours_batches_per_s": fast_rate,
            "ours_readings_per_s": fast_rate * READINGS, "ratio": ratio,
            "pure_core_decoder_batches_per_s": core_rate, "batch_bytes": len(batches[0])}


def cpython_verify_stages(passes: int = RUNS) -> dict[str, float]:
    """Where one batch's time goes on the fast path: microseconds per stage, the median of
    ``passes`` passes over ``N_BATCHES`` batches (perf_counter around each stage, the same
    calls ``BatchVerifier.open``/``check`` make, in the same order)."""
    signer = EcSigner.generate()
    w = batchmod.BatchWriter(DEVICE, signer, signer.kid)
    batches = [w.sign(make_records(READINGS, 1_700_000_000 + i), boot=1)
               for i in range(N_BATCHES)]
    verifier = signer.verifier()
    names = ("envelope", "signature", "payload_decode", "batch_and_senml_checks", "sha256",
             "chain_classify")
    clock = time.perf_counter

    def one_pass() -> list[float]:
        acc = [0.0] * len(names)
        states: dict[str, chain.ChainState] = {}
        for b in batches:
            t0 = clock()
            msg = fastcbor.decode_sign1(b)
            t1 = clock()
            msg.verify(verifier)
            t2 = clock()
            obj = fastcbor.loads_batch_payload(msg.payload)
            t3 = clock()
            batch = batchmod.Batch.from_map(obj)
            t4 = clock()
            digest = batchmod.batch_hash(b)
            t5 = clock()
            state = states.get(batch.device) or chain.ChainState()
            status, missing = state.classify(batch.seq, batch.prev, digest)
            states[batch.device] = state
            chain.Verdict(status, "", batch, digest, missing, msg.kid)
            t6 = clock()
            for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                acc[i] += dt
        return [a / N_BATCHES * 1e6 for a in acc]

    runs = [one_pass() for _ in range(passes)]
    out = {name: statistics.median(r[i] for r in runs) for i, name in enumerate(names)}
    out["total"] = statistics.median(sum(r) for r in runs)
    return out


MP_SIGN = """
import gc, time
from cityedge_core import batch, p256, cose
k = p256.PrivateKey(0x1D2C3B4A)
kid = cose.kid_for_public_key(k.public_key().to_sec1())
w = batch.BatchWriter(%r, k, kid)
recs = batch.RecordBuffer()
recs.add({-2: %r, -3: 1700000000, 0: 'temp', 1: 'Cel', 2: 21.5})
for i in range(1, 50):
    recs.add({0: 'temp', 6: i, 2: 20 + i / 8})
times = []
for _ in range(%d):
    gc.collect()
    t = time.ticks_us()
    w.sign_buffer(recs, 1)
    times.append(time.ticks_diff(time.ticks_us(), t))
times.sort()
print(times[len(times) // 2])
"""


def micropython_sign() -> dict[str, float]:
    """Sign time, and the smallest heap that signs with the core's bytecode in a mapped
    ROMFS image (as on a board) and loaded from files into the heap (the plain unix port)."""
    mp = str(ROOT / ".venv" / "bin" / "micropython")
    with tempfile.TemporaryDirectory() as d:
        core = compile_core(Path(d) / "tree")
        image = Path(d) / "core.romfs"
        romfs.write_image(core, image)

        def run(heap: str, n: int, rom: bool) -> subprocess.CompletedProcess[str]:
            prog = MP_SIGN % (DEVICE, DEVICE + ":", n)
            if rom:
                argv = [sys.executable, "-m", "cityedge.romfs", "--image", str(image)]
            else:
                argv = [mp]
                prog = "import sys\nsys.path.insert(0, %r)\n" % str(core) + prog
            return subprocess.run([*argv, "-X", "heapsize=" + heap, "-c", prog],
                                  capture_output=True, text=True, timeout=300)

        def smallest(rom: bool) -> int:
            lo, hi = 16, 96  # KiB
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if run("%dk" % mid, 1, rom).returncode == 0:
                    hi = mid
                else:
                    lo = mid
            return hi

        res = run("256k", 21, True)
        sign_us = float(res.stdout.strip())
        return {"mp_sign_ms": sign_us / 1000, "mp_min_heap_kib": smallest(True),
                "mp_min_heap_files_kib": smallest(False)}
