"""``make demo``: the foundation end to end, on the real MicroPython unix port.

1. A device key is made on the "device" (MicroPython, pure-Python P-256, os.urandom).
2. The device signs simulated readings into a chain of batches (COSE_Sign1, ES256).
3. CPython verifies them with OpenSSL through the shared core's BatchVerifier.
4. A tampered batch and a replayed batch are caught.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cityedge_core import chain, senml
from cityedge_host.crypto import EcVerifier
from cityedge_host.mpy import compile_core
from cityedge_host.verify import make_batch_verifier

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "urn:dev:mac:02c17e0de770"
BATCHES = 6
READINGS = 50

DEVICE_SCRIPT = """
import sys, os, binascii, math, gc
sys.path.insert(0, %(core)r)
from cityedge_core import batch, p256, cose
key = p256.PrivateKey.generate(os.urandom)   # made on the device; never leaves it
pub = key.public_key().to_sec1()
kid = cose.kid_for_public_key(pub)
print('PUB', binascii.hexlify(pub).decode())
w = batch.BatchWriter(%(device)r, key, kid)
t0 = 1764200000
for b in range(%(batches)d):
    recs = batch.RecordBuffer()   # each reading encoded as it is sampled
    recs.add({-2: %(device)r + ':', -3: t0 + b * 50, 0: 'temp', 1: 'Cel', 2: 21.0})
    for i in range(1, %(readings)d):
        name = ('temp', 'rh', 'pm25')[i %% 3]
        recs.add({0: name, 6: i, 2: round(20 + 5 * math.sin((b * 50 + i) / 9), 2)})
    signed = w.sign_buffer(recs, 1)
    recs = None
    gc.collect()
    print('BATCH', end=' ')
    for i in range(0, len(signed), 256):  # small pieces: the heap is small
        print(binascii.hexlify(signed[i:i + 256]).decode(), end='')
    print()
    signed = None
    gc.collect()
"""


def main() -> None:
    con = Console()
    con.rule("[bold]cityedge demo, part 1: sign on MicroPython, verify on CPython")
    mp = ROOT / ".venv" / "bin" / "micropython"
    with tempfile.TemporaryDirectory() as d:
        core = compile_core(Path(d))
        con.print("1. device: MicroPython %s, heap capped at 64 KiB, core compiled with mpy-cross"
                  % subprocess.run([str(mp), "-c", "import sys; print(sys.version)"],
                                   capture_output=True, text=True).stdout.split(";")[-1].strip())
        script = DEVICE_SCRIPT % {"core": str(core), "device": DEVICE, "batches": BATCHES,
                                  "readings": READINGS}
        res = subprocess.run([str(mp), "-X", "heapsize=64k", "-c", script], capture_output=True,
                             text=True, timeout=300)
    if res.returncode != 0:
        con.print("[red]cityedge: the device run failed:[/red]\n" + res.stderr + res.stdout[-400:])
        raise SystemExit(1)
    lines = res.stdout.split()
    pub = bytes.fromhex(lines[lines.index("PUB") + 1])
    batches = [bytes.fromhex(lines[i + 1]) for i, w in enumerate(lines) if w == "BATCH"]
    con.print("   made a P-256 key on the device (public %s...), signed %d batches of %d readings"
              % (pub[:9].hex(), len(batches), READINGS))

    verifier = EcVerifier.from_sec1(pub)
    ring = {verifier.kid: chain.KeyEntry(DEVICE, verifier)}
    check = make_batch_verifier(ring)
    table = Table(title="2. fleet side: CPython + OpenSSL verify every batch")
    for col in ("#", "input", "bytes", "verdict", "first reading"):
        table.add_column(col)

    def show(label: str, data: bytes) -> str:
        v = check.check(data)
        first = ""
        if v.batch is not None:
            r = senml.to_json_names(senml.resolve(v.batch.records)[0])
            first = "%s = %s %s" % (r["n"].rsplit(":", 1)[-1], r.get("v"), r.get("u", ""))
        colour = "green" if v.accepted else "red"
        table.add_row(str(table.row_count + 1), label, str(len(data)),
                      "[%s]%s[/%s] %s" % (colour, v.status, colour, v.reason[:40]), first)
        return v.status

    results = [show("batch seq %d" % (i + 1), b) for i, b in enumerate(batches[:3])]
    tampered = bytearray(batches[3])
    tampered[len(tampered) // 2] ^= 0x04  # one bit of one reading changed in transit
    results.append(show("seq 4, one bit flipped", bytes(tampered)))
    results.append(show("seq 4 (genuine)", batches[3]))
    results.append(show("seq 2 sent again (replay)", batches[1]))
    results.append(show("seq 6 (seq 5 lost)", batches[5]))
    results.append(show("seq 5 arrives late", batches[4]))
    con.print(table)
    expected = ["ok", "ok", "ok", "bad_signature", "ok", "duplicate", "gap", "reordered"]
    if results != expected:
        con.print("[red]cityedge: demo verdicts %s differ from %s[/red]" % (results, expected))
        raise SystemExit(1)
    con.print("3. tampering is caught by the signature; the replay (a duplicate: never\n"
              "   stored twice)"
              " and the lost and late batches by the hash chain.")
    con.print("   Inspect any batch yourself: cityedge inspect FILE --pubkey KEY.pem")
    from cityedge import demo_hardware, demo_system

    demo_system.main(con, then=demo_hardware.main)  # the console and open data come last


if __name__ == "__main__":
    main()
