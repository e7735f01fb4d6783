"""Read a chip's eFuses with esptool (from PyPI, pinned) and hand the result to the rules.

``collect(port)`` runs ``espefuse summary --format json`` in a child process with a timeout
(``limits.LIMITS.collect_timeout_s``): a hung port or a board that never enters its
bootloader ends as a ``CollectError``, never as a hung checker. When the chip is in Secure
Download Mode the summary is refused ("Secure Download Mode is enabled"); then
``esptool get-security-info`` runs instead and ``secinfo`` decides what it can. Both tools run
as ``python -m`` of this interpreter, so the esptool that cityedge pins is the one used.

The child's output is quoted to the user only as its last lines, bounded; nothing it prints
is a secret (a summary shows read-protected keys as ``??``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cityedge_hardware.efuse_rules import check_summary
from cityedge_hardware.efuse_summary import parse_summary
from cityedge_hardware.errors import CollectError
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.secinfo import check_security_info, parse_security_info
from cityedge_hardware.verdict import Verdict

Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]

SECURE_DOWNLOAD_MARK = "Secure Download Mode is enabled"


@dataclass(frozen=True)
class EfuseResult:
    """Verdicts and where they came from: ``summary`` or ``security-info``."""

    source: str
    chip: str | None
    verdicts: list[Verdict]


def _run(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def _tail(text: str) -> str:
    text = " ".join(text.strip().splitlines()[-3:])
    return text[-LIMITS.tool_output_max_chars:]


def _call(runner: Runner, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return runner(argv, LIMITS.collect_timeout_s)
    except subprocess.TimeoutExpired as e:
        raise CollectError("%s did not finish within %.0f s" % (what, LIMITS.collect_timeout_s)
                           ) from e
    except OSError as e:
        raise CollectError("could not start %s: %s" % (what, e),
                           hint="reinstall cityedge (`make setup`): it brings esptool") from e


def collect(port: str, *, chip: str = "auto", runner: Runner = _run,
            extra_args: Sequence[str] = ()) -> EfuseResult:
    """Read the chip on ``port`` and decide the eFuse requirements.

    ``extra_args`` go before the command (``--virt --path-efuse-file F`` runs esptool's
    virtual chip: the tests use it).
    """
    with tempfile.TemporaryDirectory(prefix="cityedge-efuse-") as tmp:
        out = Path(tmp) / "summary.json"
        argv = [sys.executable, "-m", "espefuse", "--port", port, "--chip", chip,
                *extra_args, "summary", "--format", "json", "--file", str(out)]
        done = _call(runner, argv, "espefuse")
        text = (done.stdout or "") + (done.stderr or "")
        if done.returncode == 0 and out.exists():
            summary = parse_summary(out.read_bytes(), source="espefuse summary")
            found, verdicts = check_summary(summary, None if chip == "auto" else chip)
            return EfuseResult("summary", found, verdicts)
    if SECURE_DOWNLOAD_MARK in text:
        argv = [sys.executable, "-m", "esptool", "--port", port, "--chip", chip,
                *extra_args, "get-security-info"]
        done = _call(runner, argv, "esptool get-security-info")
        if done.returncode != 0:
            raise CollectError("the chip is in Secure Download Mode and esptool "
                               "get-security-info failed: %s" % _tail(done.stdout + done.stderr))
        info = parse_security_info(done.stdout)
        return EfuseResult("security-info", info.chip, check_security_info(info))
    raise CollectError("espefuse could not read %s: %s" % (port, _tail(text)))
