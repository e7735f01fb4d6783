"""The eFuse rules against esptool's virtual chips: every rule both ways on every chip.

Blank chips (factory state) fail every rule; the same chips after the release burns
(``efuse_virt.burn``) and the write protection (``efuse_virt.lock``) pass every rule; in
between, burned but not locked, the lock rule (CE-BOOT-03) fails naming what to lock. The
captures are real ``espefuse summary --format json`` output, so field names, raw encodings
and read protection are the tool's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cityedge_hardware.efuse_collect import collect
from cityedge_hardware.efuse_rules import EFUSE_REQUIREMENTS, RULES, check_summary
from cityedge_hardware.efuse_summary import parse_summary
from cityedge_hardware.verdict import Outcome, Verdict

from support.efuse_virt import HARDENED_CHIPS, LOCKED, LOCKED_DEFAULT, OTHER_CHIPS, Captures

RULE_NAMES = ("secure-boot", "secure-boot-keys", "flash-encryption", "flash-key-hidden",
              "jtag-off", "download-mode", "config-locked")
CASES = [(chip, rule) for chip in HARDENED_CHIPS for rule in RULE_NAMES]


def _verdicts(captures: Captures, kind: str, chip: str) -> dict[str, Outcome]:
    return {check: v.outcome for check, v in _full(captures, kind, chip).items()}


def _full(captures: Captures, kind: str, chip: str) -> dict[str, Verdict]:
    found, verdicts = check_summary(parse_summary(captures.path(kind, chip).read_bytes()))
    assert found == chip
    return {v.check: v for v in verdicts}


def test_one_rule_per_efuse_requirement() -> None:
    assert len(RULES) == len(EFUSE_REQUIREMENTS) == len(RULE_NAMES)


@pytest.mark.parametrize(("chip", "rule"), CASES)
def test_a_blank_chip_fails_the_rule(captures: Captures, chip: str, rule: str) -> None:
    assert _verdicts(captures, "blank", chip)[rule] is Outcome.FAIL


@pytest.mark.parametrize(("chip", "rule"), CASES)
def test_a_hardened_chip_passes_the_rule(captures: Captures, chip: str, rule: str) -> None:
    assert _verdicts(captures, "hardened", chip)[rule] is Outcome.PASS


@pytest.mark.parametrize("chip", HARDENED_CHIPS)
def test_burned_but_not_write_protected_fails_the_lock_naming_what_to_lock(
        captures: Captures, chip: str) -> None:
    """The chip as burned before ``lock``: key blocks and the counter still writeable."""
    verdicts = _full(captures, "burned", chip)
    locked = LOCKED.get(chip, LOCKED_DEFAULT)
    lock = verdicts["config-locked"]
    assert lock.outcome is Outcome.FAIL
    assert lock.reason.endswith(": " + ", ".join(locked))
    assert lock.fix.startswith("`espefuse --port PORT write-protect-efuse %s`"
                               % " ".join(locked))
    # the counter's lock is also release mode; everything else was already in place
    assert {c: v.outcome for c, v in verdicts.items()} == {
        **dict.fromkeys(RULE_NAMES, Outcome.PASS),
        "flash-encryption": Outcome.FAIL, "config-locked": Outcome.FAIL}
    assert _verdicts(captures, "hardened", chip)["config-locked"] is Outcome.PASS


@pytest.mark.parametrize("chip", HARDENED_CHIPS + OTHER_CHIPS)
def test_every_chip_esptool_knows_is_recognised_by_its_fields(
        captures: Captures, other_blanks: dict[str, Path], chip: str) -> None:
    path = captures.blank.get(chip) or other_blanks[chip]
    found, verdicts = check_summary(parse_summary(path.read_bytes()))
    assert found == chip
    # a factory chip never passes anything: a rule either fails it or cannot decide
    assert all(v.outcome is not Outcome.PASS for v in verdicts)


def test_a_hardened_chips_flash_key_reads_as_zeros_and_still_passes(captures: Captures
                                                                     ) -> None:
    """Read protection makes the key block read back as zeros: hidden, not empty."""
    doc = captures.load("hardened", "esp32s3")
    assert doc["BLOCK_KEY0"]["readable"] is False
    assert int(doc["BLOCK_KEY0"]["raw_value"], 16) == 0
    assert _verdicts(captures, "hardened", "esp32s3")["flash-key-hidden"] is Outcome.PASS


@pytest.mark.parametrize("chip", ["esp32", "esp32s3"])
def test_the_collector_reads_a_virtual_chip_through_espefuse(captures: Captures,
                                                              chip: str) -> None:
    """The collector's real path: espefuse in a child process, its JSON, the rules."""
    result = collect("virtual", chip=chip,
                     extra_args=["--virt", "--path-efuse-file", str(captures.efuse_files[chip])])
    assert result.source == "summary"
    assert result.chip == chip
    assert [v.outcome for v in result.verdicts] == [Outcome.PASS] * len(RULES)
