"""The device's signed results (``cityedge_fw.answers``) on CPython: the same bytes as the
core's ``command.encode_result`` (the device encodes them itself to keep the core's names
off its heap), the fleet's decoder reads them, and the answers kept on flash survive a
write torn at any byte (only whole records are read back)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_core import command, cose, limits, p256
from cityedge_core.command_decode import decode_result
from cityedge_fw import answers
from cityedge_host.crypto import EcVerifier

KEY = p256.PrivateKey(0xA11CE)
KID = cose.kid_for_public_key(KEY.public_key().to_sec1())
DEVICE = "urn:dev:mac:0024befffe804ff1"


def agent(tmp: Path) -> SimpleNamespace:
    link = SimpleNamespace(client=SimpleNamespace(state=0))  # not connected: nothing sent
    return SimpleNamespace(device=DEVICE, writer=SimpleNamespace(signer=KEY, kid=KID),
                           state=SimpleNamespace(path=str(tmp / "state.cbor")), link=link)


def test_the_detail_limit_is_the_cores() -> None:
    assert answers._DETAIL_MAX == limits.RESULT_DETAIL_MAX_CHARS


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["status", "rotate", "install-cert", "erase-key", "x-y_z.1"]),
       seq=st.integers(0, 2**48 - 1), outcome=st.sampled_from(command.OUTCOMES),
       detail=st.text(max_size=400))
def test_a_result_is_the_cores_encoding_byte_for_byte(name: str, seq: int, outcome: str,
                                                      detail: str) -> None:
    a = agent(Path("/nonexistent"))
    data = answers._encode(a, name, seq, outcome, detail)
    assert data == command.encode_result(KEY, KID, name, DEVICE, seq, outcome, detail)
    res = decode_result(data, EcVerifier.from_sec1(KEY.public_key().to_sec1()))
    assert (res.name, res.seq, res.outcome, res.detail) == (name, seq, outcome,
                                                            detail[:256])


def test_the_last_answers_are_kept_and_a_torn_file_gives_whole_records(tmp_path: Path
                                                                        ) -> None:
    a = agent(tmp_path)
    for seq in range(1, 7):
        asyncio.run(answers._signed(a, "status", seq, "ok", "n%d" % seq))
    kept = answers._kept(a)
    assert [s for s, _ in kept] == [3, 4, 5, 6]  # the last four
    assert kept[-1][1] == command.encode_result(KEY, KID, "status", DEVICE, 6, "ok", "n6")
    raw = (tmp_path / "state.cbor.ans").read_bytes()
    for cut in range(len(raw)):
        (tmp_path / "state.cbor.ans").write_bytes(raw[:cut])
        got = answers._kept(a)
        assert got == kept[:len(got)]
