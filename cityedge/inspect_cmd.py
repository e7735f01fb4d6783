"""``cityedge inspect``: decode a signed batch file and, given a key, verify it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cityedge_core import batch as batchmod
from cityedge_core import cose, limits, senml
from cityedge_core.cose_decode import Sign1
from cityedge_core.errors import CityedgeError, MalformedError
from cityedge_host.crypto import EcVerifier, KeyFileError, load_verifier

_TIMEBASE = {batchmod.TIME_UNIX: "unix", batchmod.TIME_SINCE_BOOT: "since-boot"}
_KIND = {batchmod.KIND_READINGS: "readings", batchmod.KIND_DROP: "drop-record"}


def _describe(msg: Sign1, b: batchmod.Batch, verified: bool | None) -> dict[str, Any]:
    readings = []
    for rec in senml.resolve(b.records):
        out = senml.to_json_names(rec)
        for k, v in list(out.items()):
            if isinstance(v, bytes):
                out[k] = v.hex()
            elif not isinstance(k, str):
                out[str(k)] = out.pop(k)
        readings.append(out)
    return {
        "kind": _KIND.get(b.kind, str(b.kind)),
        "device": b.device,
        "seq": b.seq,
        "prev": b.prev.hex(),
        "hash": "",
        "boot": b.boot,
        "timebase": _TIMEBASE.get(b.timebase, str(b.timebase)),
        "kid": msg.kid.hex() if isinstance(msg.kid, bytes) else None,
        "signature": {None: "not checked", True: "valid", False: "INVALID"}[verified],
        "dropped": b.dropped,
        "readings": readings,
    }


def _fail(reason: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"valid": False, "error": reason}))
    else:
        print("cityedge: invalid batch: %s" % reason, file=sys.stderr)
    raise typer.Exit(1)


def inspect_command(
    file: Annotated[Path, typer.Argument(help="A signed batch: raw COSE_Sign1 bytes.")],
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Device certificate (PEM) to verify with.")
    ] = None,
    pubkey: Annotated[
        Path | None, typer.Option("--pubkey", help="Device public key (PEM) to verify with.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Decode a signed reading batch; verify its signature when a key is given.

    Exit 0 when the batch is valid (well-formed, and signed by the key if one is given),
    1 when it is invalid or malformed, 2 for usage errors.
    """
    if cert is not None and pubkey is not None:
        raise typer.BadParameter("give --cert or --pubkey, not both")
    verifier: EcVerifier | None = None
    keyfile = cert or pubkey
    if keyfile is not None:
        try:
            verifier = load_verifier(keyfile)
        except KeyFileError as e:
            print("cityedge: %s" % e, file=sys.stderr)
            raise typer.Exit(2) from e
    try:
        data = file.read_bytes()
    except OSError as e:
        print("cityedge: cannot read %s: %s" % (file, e.strerror), file=sys.stderr)
        raise typer.Exit(2) from e
    if len(data) > limits.BATCH_MAX_BYTES:
        _fail("file is %d bytes, a batch is at most %d" % (len(data), limits.BATCH_MAX_BYTES),
              as_json)
    try:
        msg = cose.decode_sign1(data)
    except (CityedgeError, MalformedError) as e:
        _fail(str(e), as_json)
        return
    verified: bool | None = None
    if verifier is not None:
        # the signature covers the payload's bytes: check it before decoding them, so a
        # changed byte is reported as what it is even where it also breaks the CBOR
        verified = verifier.verify(msg.to_be_signed(), msg.signature)
        if not verified:
            _fail("signature does not verify with %s: changed after signing, or signed by "
                  "another key" % keyfile, as_json)
    try:
        b = batchmod.Batch.decode(msg.payload)
        info = _describe(msg, b, verified)
    except (CityedgeError, MalformedError) as e:
        _fail(str(e), as_json)
        return
    info["hash"] = batchmod.batch_hash(data).hex()
    info["valid"] = True
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _print_text(info)


def _print_text(info: dict[str, Any]) -> None:
    print("%s batch from %s" % (info["kind"], info["device"]))
    print("  seq        %d   (boot %d, times %s)" % (info["seq"], info["boot"], info["timebase"]))
    print("  prev       %s" % info["prev"])
    print("  hash       %s" % info["hash"])
    print("  kid        %s" % info["kid"])
    print("  signature  %s" % info["signature"])
    if info["dropped"]:
        first, last, batches, readings = info["dropped"]
        print("  dropped    seq %d..%d: %d batches, %d readings" % (first, last, batches, readings))
    print("  readings   %d" % len(info["readings"]))
    for r in info["readings"]:
        value = next((r[k] for k in ("v", "vs", "vb", "vd", "s") if k in r), None)
        print("    %-40s %-12s %s %s" % (r.get("n"), value, r.get("u", ""), r.get("t")))
