"""The core on the real MicroPython unix port: the shared suite, and the heap budgets.

On the unix port imported bytecode lives in the heap (on a board it is frozen into flash),
so these budgets include the code: about 31 KB for the signing path. The P-256 primitive
alone (10 KB of code) signs within 32 KB; a whole batch needs about 50 KB on this port.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import DEVICE, ROOT, run_micropython

SIGN_50 = """
import gc
from cityedge_core import batch, p256, cose
k = p256.PrivateKey(0x1D2C3B4A)
pub = k.public_key()
kid = cose.kid_for_public_key(pub.to_sec1())
w = batch.BatchWriter(%r, k, kid)
recs = batch.RecordBuffer()
recs.add({-2: %r, -3: 1700000000, 0: 'temp', 1: 'Cel', 2: 21.5})
for i in range(1, 50):
    recs.add({0: 'temp', 6: i, 2: 20 + i / 8})
gc.collect()
signed = w.sign_buffer(recs, 1)
print('signed', len(signed))
recs = None
gc.collect()
print('peak-free', gc.mem_free())
%s
""" % (DEVICE, DEVICE + ":", "%s")

VERIFY_ENVELOPE = """
cose.decode_sign1(signed).verify(pub)
bad = bytearray(signed)
bad[-1] ^= 1
try:
    cose.decode_sign1(bytes(bad)).verify(pub)
    print('forgery accepted')
except Exception as e:
    print('forgery refused', type(e).__name__)
"""


def test_shared_suite_on_micropython(micropython: str) -> None:
    res = subprocess.run([micropython, "-X", "heapsize=4m", "tests/mp/run.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    passed, failed = (int(x.split()[0]) for x in last.split(", "))
    assert failed == 0 and passed >= 13, last


def test_sign_50_readings_and_verify_envelope_in_64k_heap(core_mpy: Path) -> None:
    out = run_micropython(SIGN_50 % VERIFY_ENVELOPE, heap="64k", core_dir=core_mpy)
    assert "signed" in out and "forgery refused SignatureError" in out, out


def test_es256_primitive_in_32k_heap(core_mpy: Path) -> None:
    out = run_micropython(
        "import hashlib\nfrom cityedge_core import p256\n"
        "k = p256.PrivateKey(0x1D2C3B4A)\n"
        "sig = k.sign(b'x' * 1500)\n"
        "print(k.public_key().verify(b'x' * 1500, sig))\n",
        heap="32k", core_dir=core_mpy)
    assert out.strip() == "True"
