"""Edge cases the virtual chips cannot reach, made by editing their real captures.

Read-protected fields, senses where the display value and the raw bits disagree, a revoked
secure boot digest, half an AES-256 key, a soft JTAG disable, development-mode encryption;
and the bundled research captures (esptool 5.6 output) with their expected verdicts.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_hardware.efuse_rules import check_summary
from cityedge_hardware.efuse_summary import parse_summary
from cityedge_hardware.errors import EfuseDataError
from cityedge_hardware.verdict import Outcome, Verdict

from support.efuse_virt import Captures

Doc = dict[str, Any]


def _run(doc: Doc) -> dict[str, Verdict]:
    _, verdicts = check_summary(parse_summary(json.dumps(doc)))
    return {v.check: v for v in verdicts}


def _set(doc: Doc, name: str, raw: int, **extra: Any) -> Doc:
    doc = copy.deepcopy(doc)
    entry = doc[name]
    digits = max(1, (entry["bit_len"] + 3) // 4)
    entry["raw_value"] = "0x%0*x" % (digits, raw)
    entry.update(extra)
    return doc


@pytest.fixture
def s3(captures: Captures) -> Doc:
    return captures.load("hardened", "esp32s3")


@pytest.fixture
def esp32(captures: Captures) -> Doc:
    return captures.load("hardened", "esp32")


# read protection ----------------------------------------------------------------------------
def test_a_read_protected_switch_is_undecided_never_passed(s3: Doc) -> None:
    doc = _set(s3, "DIS_PAD_JTAG", 0, readable=False, value="?")
    v = _run(doc)["jtag-off"]
    assert v.outcome is Outcome.UNDECIDED
    assert "DIS_PAD_JTAG" in v.reason


def test_a_read_protected_digest_block_is_no_usable_digest(s3: Doc) -> None:
    doc = _set(s3, "BLOCK_KEY1", 0, readable=False)
    v = _run(doc)["secure-boot-keys"]
    assert v.outcome is Outcome.FAIL
    assert "cannot be read" in v.reason


def test_a_readable_flash_key_fails_and_names_the_block(s3: Doc) -> None:
    doc = _set(s3, "RD_DIS", 0)
    doc = _set(doc, "BLOCK_KEY0", 0x1234, readable=True)
    v = _run(doc)["flash-key-hidden"]
    assert v.outcome is Outcome.FAIL
    assert "BLOCK_KEY0" in v.reason
    assert "read-protect-efuse BLOCK_KEY0" in v.fix


def test_esp32_flash_key_readable_vs_absent(esp32: Doc) -> None:
    readable = _set(_set(esp32, "RD_DIS", 0), "BLOCK1", 0xAB, readable=True)
    assert "can be read" in _run(readable)["flash-key-hidden"].reason
    absent = _set(_set(esp32, "RD_DIS", 0), "BLOCK1", 0, readable=True)
    assert "no flash encryption key" in _run(absent)["flash-key-hidden"].reason


def test_a_missing_field_is_undecided(s3: Doc) -> None:
    doc = copy.deepcopy(s3)
    del doc["KEY_PURPOSE_3"]
    _, verdicts = check_summary(parse_summary(json.dumps(doc)), chip="esp32s3")
    by_check = {v.check: v for v in verdicts}
    assert by_check["secure-boot-keys"].outcome is Outcome.UNDECIDED
    assert "KEY_PURPOSE_3" in by_check["secure-boot-keys"].reason


# senses: raw bits decide, the display value is ignored -------------------------------------
def test_the_display_value_cannot_turn_jtag_off(s3: Doc) -> None:
    doc = _set(s3, "DIS_PAD_JTAG", 0, value=True)  # display says "disabled", bits say not
    assert _run(doc)["jtag-off"].outcome is Outcome.FAIL


def test_the_display_value_cannot_turn_encryption_on(s3: Doc) -> None:
    doc = _set(s3, "SPI_BOOT_CRYPT_CNT", 0, value="Enable")
    assert _run(doc)["flash-encryption"].outcome is Outcome.FAIL


@given(raw=st.integers(min_value=0, max_value=7), locked=st.booleans())
def test_the_crypt_counter_is_on_exactly_when_an_odd_number_of_bits_is_set(
        captures: Captures, raw: int, locked: bool) -> None:
    doc = _set(captures.load("hardened", "esp32c3"), "SPI_BOOT_CRYPT_CNT", raw,
               writeable=not locked, value="Disable")
    v = _run(doc)["flash-encryption"]
    odd = bin(raw).count("1") % 2 == 1
    # 0b111: no bit left to burn, so encryption can never be switched off, locked or not
    assert (v.outcome is Outcome.PASS) == (odd and (locked or raw == 0b111))


def test_development_mode_encryption_fails_with_the_lock_as_fix(s3: Doc) -> None:
    doc = _set(s3, "SPI_BOOT_CRYPT_CNT", 1, writeable=True)
    v = _run(doc)["flash-encryption"]
    assert v.outcome is Outcome.FAIL
    assert "write-protect-efuse SPI_BOOT_CRYPT_CNT" in v.fix


def test_secure_download_or_download_off_either_passes(s3: Doc) -> None:
    off = _set(_set(s3, "ENABLE_SECURITY_DOWNLOAD", 0), "DIS_DOWNLOAD_MODE", 1)
    assert _run(off)["download-mode"].outcome is Outcome.PASS
    neither = _set(s3, "ENABLE_SECURITY_DOWNLOAD", 0)
    assert _run(neither)["download-mode"].outcome is Outcome.FAIL


def test_a_soft_jtag_disable_is_not_enough(s3: Doc) -> None:
    doc = _set(_set(s3, "DIS_PAD_JTAG", 0), "SOFT_DIS_JTAG", 1)
    v = _run(doc)["jtag-off"]
    assert v.outcome is Outcome.FAIL
    assert "SOFT_DIS_JTAG" in v.reason
    assert "burn-efuse DIS_PAD_JTAG 1" in v.fix


def test_esp32_secure_boot_v1_alone_fails_and_says_so(esp32: Doc) -> None:
    doc = _set(_set(esp32, "ABS_DONE_1", 0), "ABS_DONE_0", 1)
    v = _run(doc)["secure-boot"]
    assert v.outcome is Outcome.FAIL
    assert "v1" in v.reason


# secure boot digests -----------------------------------------------------------------------
def test_a_revoked_key_digest_leaves_no_usable_digest(s3: Doc) -> None:
    doc = _set(s3, "SECURE_BOOT_KEY_REVOKE0", 1)  # the only digest, in slot 0
    v = _run(doc)["secure-boot-keys"]
    assert v.outcome is Outcome.FAIL
    assert "digest 0 (BLOCK_KEY1) is revoked" in v.reason


def test_a_revoked_digest_with_a_live_one_beside_it_passes(s3: Doc) -> None:
    doc = _set(s3, "SECURE_BOOT_KEY_REVOKE0", 1)
    doc = _set(doc, "KEY_PURPOSE_2", 10)  # SECURE_BOOT_DIGEST1 in BLOCK_KEY2 ...
    doc = _set(doc, "BLOCK_KEY2", 0xBEEF)
    doc = _set(doc, "SECURE_BOOT_KEY_REVOKE1", 0)  # ... whose slot is not revoked
    v = _run(doc)["secure-boot-keys"]
    assert v.outcome is Outcome.PASS
    assert "digest 0 (BLOCK_KEY1) is revoked" in v.reason


def test_an_unrevoked_empty_slot_fails_with_the_revoke_as_fix(s3: Doc) -> None:
    doc = _set(s3, "SECURE_BOOT_KEY_REVOKE2", 0)
    v = _run(doc)["secure-boot-keys"]
    assert v.outcome is Outcome.FAIL
    assert v.fix == "`espefuse --port PORT burn-efuse SECURE_BOOT_KEY_REVOKE2 1`"


def test_an_empty_digest_block_is_not_a_digest(s3: Doc) -> None:
    doc = _set(s3, "BLOCK_KEY1", 0)
    v = _run(doc)["secure-boot-keys"]
    assert v.outcome is Outcome.FAIL
    assert "empty" in v.reason


def test_half_an_aes_256_key_fails(s3: Doc) -> None:
    doc = _set(s3, "KEY_PURPOSE_0", 2)  # XTS_AES_256_KEY_1 without its second half
    v = _run(doc)["flash-key-hidden"]
    assert v.outcome is Outcome.FAIL
    assert "half" in v.reason


def test_a_capture_of_no_known_chip_is_undecided_everywhere(s3: Doc) -> None:
    doc = {k: v for k, v in s3.items() if k != "SECURE_BOOT_EN"}
    found, verdicts = check_summary(parse_summary(json.dumps(doc)))
    assert found is None
    assert {v.outcome for v in verdicts} == {Outcome.UNDECIDED}


# the lock (CE-BOOT-03) -----------------------------------------------------------------------
def test_a_writeable_key_purpose_fails_the_lock_with_the_write_protect_as_fix(s3: Doc) -> None:
    """A purpose that can still change would let the flash key become an HMAC key."""
    doc = _set(s3, "KEY_PURPOSE_0", 4, writeable=True)
    v = _run(doc)["config-locked"]
    assert v.outcome is Outcome.FAIL
    assert v.reason.endswith(": KEY_PURPOSE_0")
    assert v.fix.startswith("`espefuse --port PORT write-protect-efuse KEY_PURPOSE_0`")
    assert _run(s3)["config-locked"].outcome is Outcome.PASS


def test_a_capture_without_the_writeable_flags_cannot_decide_the_lock(s3: Doc) -> None:
    """Hand-edited: no ``writeable`` anywhere. Neither the lock nor release mode may pass."""
    doc = copy.deepcopy(s3)
    for entry in doc.values():
        del entry["writeable"]
    v = _run(doc)
    assert v["config-locked"].outcome is Outcome.UNDECIDED
    assert "SPI_BOOT_CRYPT_CNT" in v["config-locked"].reason
    assert "writeable" in v["config-locked"].fix
    assert v["flash-encryption"].outcome is Outcome.UNDECIDED
    # a field that is writeable fails even when others lack the flag
    assert _run(_set(doc, "BLOCK_KEY1", 0xBEEF, writeable=True))[
        "config-locked"].outcome is Outcome.FAIL


def test_a_field_with_every_bit_burned_needs_no_write_protection(s3: Doc) -> None:
    doc = _set(s3, "SPI_BOOT_CRYPT_CNT", 0b111, writeable=True)  # odd and full: on for good
    v = _run(doc)
    assert v["config-locked"].outcome is Outcome.PASS
    assert v["flash-encryption"].outcome is Outcome.PASS
    assert _run(_set(s3, "SPI_BOOT_CRYPT_CNT", 0b001, writeable=True))[
        "config-locked"].outcome is Outcome.FAIL


def test_an_esp32_digest_block_left_writeable_fails_the_lock(esp32: Doc) -> None:
    v = _run(_set(esp32, "BLOCK2", 0xABC, writeable=True))["config-locked"]
    assert v.outcome is Outcome.FAIL
    assert v.reason.endswith(": BLOCK2")


def test_a_read_protected_key_purpose_cannot_decide_the_lock(s3: Doc) -> None:
    v = _run(_set(s3, "KEY_PURPOSE_1", 0, readable=False))["config-locked"]
    assert v.outcome is Outcome.UNDECIDED
    assert "KEY_PURPOSE_1" in v.reason


# in the hardened C3: burned fields with a 0 bit left (the rest are 1-bit switches at 1, or
# unused key blocks, whose write protection does not matter)
_MOVABLE = ("SPI_BOOT_CRYPT_CNT", "KEY_PURPOSE_0", "KEY_PURPOSE_1", "BLOCK_KEY0", "BLOCK_KEY1")
_INDIFFERENT = ("SECURE_BOOT_EN", "DIS_PAD_JTAG", "SECURE_BOOT_KEY_REVOKE0", "KEY_PURPOSE_2",
                "BLOCK_KEY3", "RD_DIS")


@given(opened=st.sets(st.sampled_from(_MOVABLE + _INDIFFERENT)))
def test_the_lock_fails_exactly_when_a_burned_field_that_can_change_is_writeable(
        captures: Captures, opened: set[str]) -> None:
    doc = copy.deepcopy(captures.load("hardened", "esp32c3"))
    for name in _MOVABLE:
        assert doc[name]["writeable"] is False  # as esptool wrote it after ``lock``
    for name in opened:
        doc[name]["writeable"] = True
    v = _run(doc)["config-locked"]
    should_fail = sorted(set(opened) & set(_MOVABLE))
    assert (v.outcome is Outcome.FAIL) == bool(should_fail)
    assert v.outcome in (Outcome.PASS, Outcome.FAIL)
    for name in should_fail:
        assert name in v.fix


# the research captures bundled with the package -------------------------------------------
EXPECTED = {
    # file: secure-boot, keys, flash-encryption, key-hidden, jtag, download, locked (P/F/U)
    "esp32.json": "FFFFFFF",
    # switches burned on a revision 0 virtual chip: v2 and UART_DOWNLOAD_DIS do nothing there
    "esp32_hardened.json": "FFFFPFF",
    "esp32c3.json": "FFFFFFF",
    "esp32s3.json": "FFFFFFF",
    "esp32s3_hardened.json": "PFFFPPF",  # same: crypt count 1 but writeable, no keys
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_research_captures(name: str) -> None:
    data = resources.files("cityedge_hardware").joinpath("captures", name).read_bytes()
    _, verdicts = check_summary(parse_summary(data))
    assert "".join(v.outcome.name[0] for v in verdicts) == EXPECTED[name]


# the parser --------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "words"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not an eFuse summary"),
    (b'{"WR_DIS": {"readable": true, "writeable": true, "bit_len": 8}}', "raw_value"),
    (b'{"WR_DIS": {"raw_value": "0x1ff", "readable": true, "writeable": true, "bit_len": 8}}',
     "more than its 8 bits"),
    (b'{"WR_DIS": {"raw_value": "12", "readable": true, "writeable": true, "bit_len": 8}}',
     "not hex"),
    (b'{"wr dis": {"raw_value": "0x1", "readable": true, "writeable": true, "bit_len": 8}}',
     "not an eFuse name"),
    (b" " * (1024 * 1024 + 1), "more than"),
])
def test_a_bad_capture_is_refused_with_what_is_wrong(data: bytes, words: str) -> None:
    with pytest.raises(EfuseDataError, match=words):
        parse_summary(data)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(
                         st.text(max_size=12), c, max_size=4), max_leaves=20)


@given(doc=st.dictionaries(st.sampled_from(["WR_DIS", "RD_DIS", "SECURE_BOOT_EN", "x"]),
                           _json, max_size=4))
def test_any_json_is_parsed_or_refused_as_a_data_error(doc: Any) -> None:
    try:
        summary = parse_summary(json.dumps(doc))
    except EfuseDataError:
        return
    for fuse in summary.fuses.values():
        assert fuse.raw is None or 0 <= fuse.raw < 2 ** fuse.bit_len


# ESP32 revisions -----------------------------------------------------------------------------
@pytest.mark.parametrize("check", ["secure-boot", "download-mode"])
def test_esp32_v3_only_switches_fail_on_an_older_revision(esp32: Doc, check: str) -> None:
    """Secure boot v2 and UART_DOWNLOAD_DIS burned on a revision 1 chip do nothing."""
    assert _run(esp32)[check].outcome is Outcome.PASS  # the virtual chip was made revision 3
    old = _set(esp32, "WAFER_VERSION_MAJOR", 1)
    v = _run(old)[check]
    assert v.outcome is Outcome.FAIL
    assert "revision 1" in v.reason
    unknown = {k: x for k, x in esp32.items() if k != "WAFER_VERSION_MAJOR"}
    assert _run(unknown)[check].outcome is Outcome.UNDECIDED


def test_a_capture_nested_past_the_parsers_stack_is_a_clear_error() -> None:
    """200 KB of brackets, under the size limit: Python's JSON parser runs out of stack,
    which must be the capture's error (``hw check``: could not decide), not a traceback."""
    from cityedge_hardware.errors import EfuseDataError

    with pytest.raises(EfuseDataError, match="nested too deep"):
        parse_summary(b"[" * 100_000 + b"]" * 100_000, source="deep.json")
