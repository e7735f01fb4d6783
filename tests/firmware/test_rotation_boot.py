"""The rotation's boot step (``rotation_device.boot_step``, ``at_boot``) on a
command file someone tampered with on the flash (the file is the agent's own write after
the gate took the command; an attacker who writes the flash has the device key already,
but the boot must still neither run what the gate did not take nor loop): each is
answered (``refused``) or dropped, removed, and nothing is written to the key slots.
Also: a ``rotate`` kept by the agent leaves, after the boot, the CSR and the signed answer
to publish, in that order (``answers.keep_unsent``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fw_harness import DEVICE

from cityedge_core import cbor, rotation
from cityedge_core.command_decode import decode_result
from cityedge_fw import answers, boot_answer, update_check
from cityedge_host.crypto import EcSigner, EcVerifier


@pytest.fixture
def flash(tmp_path: Path) -> dict[str, Any]:
    private = ec.generate_private_key(ec.SECP256R1())
    key = tmp_path / "key.der"
    key.write_bytes(private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (tmp_path / "cert.der").write_bytes(b"the provisioned certificate")
    (tmp_path / "ca.der").write_bytes(b"ca")
    state = tmp_path / "state.cbor"
    return {"cfg": {"tls": {"key": str(key), "cert": str(tmp_path / "cert.der"),
                            "ca": str(tmp_path / "ca.der")},
                    "store": {"state": str(state)}},
            "state": state, "dir": tmp_path,
            "verifier": EcVerifier(EcSigner(private).public_key)}


def kept(device: str, seq: int, name: bytes, args: bytes) -> bytes:
    """A command file as ``answers._for_boot`` writes it."""
    d = device.encode()
    return (bytes([len(d)]) + d + seq.to_bytes(8, "big") + int(time.time()).to_bytes(8, "big")
            + bytes([len(name)]) + name + args)


def unsent(state: Path) -> list[tuple[int, bytes]]:
    raw = Path(str(state) + ".unpublished").read_bytes()
    out, i = [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i + 1:i + 3], "big")
        out.append((raw[i], raw[i + 3:i + 3 + n]))
        i += 3 + n
    return out


TAMPERED = [
    ("not_cbor", kept(DEVICE, 9, b"rotate", b"\xff\xff garbage"), "refused"),
    ("args_not_a_map", kept(DEVICE, 9, b"rotate", cbor.dumps([1, 2])), "refused"),
    ("rotation_id_out_of_range", kept(DEVICE, 9, b"rotate", cbor.dumps({1: -1})), "refused"),
    ("unknown_name", kept(DEVICE, 9, b"format-flash", cbor.dumps({1: 7})), "refused"),
    ("name_not_utf8", kept(DEVICE, 9, b"\xff\xfe", cbor.dumps({1: 7})), "refused"),
    ("install_nothing_pending", kept(DEVICE, 9, b"install-cert",
                                     cbor.dumps({1: 7, 2: b"\x30cert"})), "refused"),
    ("name_longer_than_the_file", kept(DEVICE, 9, b"", b"")[:-1] + b"\xf0rot", "refused"),
    ("truncated_header", b"\x1curn:dev", None),
    ("empty", b"", None),
]


# named by the case alone: the bytes hold the time they were made at, which differs
# between the workers that collect them (pytest-xdist needs the same ids in each)
@pytest.mark.parametrize("case,raw,outcome", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_a_tampered_command_file_is_refused_or_dropped_and_never_run_twice(
        flash: dict[str, Any], case: str, raw: bytes, outcome: str | None) -> None:
    pending = Path(str(flash["state"]) + ".rotation.new")
    pending.write_bytes(raw)
    before = sorted(p.name for p in flash["dir"].iterdir())
    assert update_check.run(flash["cfg"]) is True
    assert not pending.exists(), case  # removed: the next boot does not run it again
    assert update_check.run(flash["cfg"]) is False  # nothing waits any more
    after = sorted(p.name for p in flash["dir"].iterdir())
    # no key made, no certificate, no pointer: only the answer files may be new
    assert set(after) - set(before) <= {"state.cbor.ans", "state.cbor.unpublished"}, case
    if outcome is None:
        assert "state.cbor.unpublished" not in after, case
        return
    parts = unsent(flash["state"])
    assert [leaf for leaf, _ in parts] == [0], case  # the answer only, no CSR
    res = decode_result(parts[0][1], flash["verifier"])
    assert (res.seq, res.outcome) == (9, outcome), (case, res)


def test_a_kept_rotate_leaves_its_csr_and_answer_for_the_agent(flash: dict[str, Any]
                                                                ) -> None:
    pending = Path(str(flash["state"]) + ".rotation.new")
    pending.write_bytes(kept(DEVICE, 4, b"rotate", cbor.dumps({1: 77})))
    assert update_check.run(flash["cfg"]) is True
    assert not pending.exists()
    parts = unsent(flash["state"])
    assert [leaf for leaf, _ in parts] == [1, 0]  # the CSR first, then the answer
    msg = cbor.loads(parts[0][1])
    assert set(msg) == {rotation.M_CSR, rotation.M_PROOF}
    res = decode_result(parts[1][1], flash["verifier"])
    assert (res.seq, res.name, res.outcome) == (4, "rotate", "ok"), res
    assert (flash["dir"] / "key.der.1").exists()
    assert not (flash["dir"] / "key.der.slot").exists()  # the switch waits for its cert
    # the answer is kept with the others too: the fleet's resend gets the same bytes
    got = answers._kept(boot_answer._Signer(DEVICE, None, b"", str(flash["state"])))
    assert got == [(4, parts[1][1])]
