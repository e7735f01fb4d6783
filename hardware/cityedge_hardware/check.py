"""``cityedge hw check``'s orchestration: which probes run on the inputs given, in what order.

Each probe is a ``Step``: a name, the rule saying when it runs (in words, for the help and the
report, and as a function of the inputs), the requirements it decides, and a function that
returns ``list[Verdict]``. ``run_check`` runs the steps that apply, one after another, and
reports each on ``progress`` (``[2/4] eFuse capture ... 7 verdicts``). A step that raises a
project error (``UserError``: a board that does not answer, a capture that is not one) does
not stop the check: its requirements become "could not decide", with the error as the
reason and its hint as the fix. Any other exception is a bug and propagates.

Adding a probe is one entry in ``STEPS``. The steps: eFuses (a capture or the board on
``--port``), security info, the serial console (``--port``), the firmware image
(``--firmware``, with its signed release: ``image_probe``; on a gateway only its secret scan),
the network (``--host``: ``net_probe``), the Raspberry Pi host (``--gateway-root`` or
``--host-capture``: ``host_collect``) and the vendor declaration (``--evidence``).
Every input file is hashed (sha256) for the report, so a report names exactly what it saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cityedge_hardware.catalogue import (
    catalogue_bytes,
    load_catalogue,
    load_profile,
    profile_source,
)
from cityedge_hardware.efuse_collect import collect
from cityedge_hardware.efuse_rules import EFUSE_REQUIREMENTS, check_summary
from cityedge_hardware.efuse_summary import parse_summary
from cityedge_hardware.errors import CheckInputError
from cityedge_hardware.evidence import (
    EVIDENCE_REQUIREMENTS,
    InputFile,
    LoadedDeclaration,
    check_declaration,
    read_bounded,
    sha256,
)
from cityedge_hardware.host_collect import probe_host
from cityedge_hardware.host_rules import (
    REQ_ACCOUNTS,
    REQ_CONFINE,
    REQ_KEYS,
    REQ_PRIV,
    REQ_SSH,
    REQ_UPDATES,
)
from cityedge_hardware.image_probe import probe_image
from cityedge_hardware.image_rules import REQ_ROLLBACK, REQ_SIGNED
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.net_probe import check_network
from cityedge_hardware.net_rules import (
    REQ_AUTH,
    REQ_BANNER,
    REQ_CERT_AUTH,
    REQ_CLEAR_TEXT,
    REQ_PORTS,
    REQ_TLS,
    PortSpec,
)
from cityedge_hardware.report import evaluate
from cityedge_hardware.report_json import Device, report_document
from cityedge_hardware.secinfo import check_security_info, parse_security_info
from cityedge_hardware.secret_bundle import Bundle
from cityedge_hardware.secret_scan import REQ_NO_SHIPPED_SECRETS, scan_items, secrets_verdict
from cityedge_hardware.serial_probe import probe as serial_probe
from cityedge_hardware.serial_rules import REQ_NO_CONSOLE
from cityedge_hardware.verdict import Evidence, Outcome, Verdict
from cityedge_host.errors import UserError

Progress = Callable[[str], None]
Kind = Literal["probe", "evidence"]


@dataclass(frozen=True)
class CheckInputs:
    """What the vendor gave ``cityedge hw check`` (paths as given)."""

    platform: str
    port: str | None = None
    efuse_json: Path | None = None
    security_info: Path | None = None
    firmware: Path | None = None
    declaration: LoadedDeclaration | None = None
    chip: str | None = None
    host: str | None = None  # the network probe's target
    declared_ports: tuple[PortSpec, ...] = ()  # ports the model declares it serves
    tcp_ports: tuple[int, ...] | None = None  # None: the probe's default list
    udp_ports: tuple[int, ...] | None = None
    mqtt_ports: tuple[int, ...] = ()
    allow_public: bool = False
    release: Path | None = None  # the signed manifest of the --firmware bundle
    release_keys: Path | None = None
    release_roots: tuple[Path, ...] = ()
    min_sequence: int = 0
    gateway_root: Path | None = None  # the Pi gateway's file system (host probe)
    host_capture: Path | None = None  # or a saved host capture


@dataclass
class CheckRun:
    """What the steps found besides verdicts: the chip read and the input files hashed."""

    inputs: list[InputFile] = field(default_factory=list)
    chip: str | None = None


@dataclass(frozen=True)
class Step:
    name: str
    runs_when: str
    applies: Callable[[CheckInputs], bool]
    requirements: tuple[str, ...]
    run: Callable[[CheckInputs, CheckRun, Progress | None], list[Verdict]]
    kind: Kind = "probe"


@dataclass(frozen=True)
class StepOutcome:
    step: Step
    verdicts: list[Verdict]
    error: str | None = None  # the project error that made its requirements undecided


@dataclass(frozen=True)
class CheckResult:
    steps: list[StepOutcome]
    run: CheckRun

    def verdicts(self, kind: Kind) -> list[Verdict]:
        return [v for s in self.steps if s.step.kind == kind for v in s.verdicts]


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory's listing of ``<sha256>  <relative path>`` lines."""
    if path.is_dir():
        lines = []
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if len(files) > LIMITS.secret_max_files:
            raise CheckInputError("%s holds more than %d files" % (path,
                                                                    LIMITS.secret_max_files))
        for p in files:
            lines.append("%s  %s\n" % (hash_path(p), p.relative_to(path).as_posix()))
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise CheckInputError("cannot read %s: %s" % (path, e.strerror or e)) from e
    return digest.hexdigest()


def _efuse_capture(inp: CheckInputs, run: CheckRun, progress: Progress | None
                   ) -> list[Verdict]:
    assert inp.efuse_json is not None
    data = read_bounded(inp.efuse_json, LIMITS.efuse_json_max_bytes, "eFuse capture")
    run.inputs.append(InputFile("efuse-json", str(inp.efuse_json), sha256(data)))
    chip, verdicts = check_summary(parse_summary(data, source=str(inp.efuse_json)), inp.chip)
    run.chip = run.chip or chip
    return verdicts


def _efuse_port(inp: CheckInputs, run: CheckRun, progress: Progress | None) -> list[Verdict]:
    assert inp.port is not None
    result = collect(inp.port, chip=inp.chip or "auto")
    run.chip = run.chip or result.chip
    return result.verdicts


def _security_info(inp: CheckInputs, run: CheckRun, progress: Progress | None
                   ) -> list[Verdict]:
    assert inp.security_info is not None
    data = read_bounded(inp.security_info, LIMITS.secinfo_max_bytes, "security info")
    run.inputs.append(InputFile("security-info", str(inp.security_info), sha256(data)))
    return check_security_info(parse_security_info(data.decode("utf-8", "replace")))


def _serial(inp: CheckInputs, run: CheckRun, progress: Progress | None) -> list[Verdict]:
    assert inp.port is not None
    return [serial_probe(inp.port).verdict]


def _secrets(inp: CheckInputs, run: CheckRun, progress: Progress | None) -> list[Verdict]:
    assert inp.firmware is not None
    run.inputs.append(InputFile("firmware", str(inp.firmware), hash_path(inp.firmware)))
    bundle = Bundle(inp.firmware)
    result = scan_items(bundle.items())
    result.incomplete.extend(bundle.skipped)
    return [secrets_verdict(result)]


def _image(inp: CheckInputs, run: CheckRun, progress: Progress | None) -> list[Verdict]:
    assert inp.firmware is not None
    run.inputs.append(InputFile("firmware", str(inp.firmware), hash_path(inp.firmware)))
    for name, path in (("release", inp.release), ("release-keys", inp.release_keys),
                       *(("release-root", p) for p in inp.release_roots)):
        if path is not None:
            run.inputs.append(InputFile(name, str(path), hash_path(path)))
    return probe_image(inp.firmware, manifest=inp.release, release_keys=inp.release_keys,
                       release_roots=inp.release_roots, min_sequence=inp.min_sequence,
                       platform=inp.platform, progress=progress)


def _network(inp: CheckInputs, run: CheckRun, progress: Progress | None) -> list[Verdict]:
    assert inp.host is not None
    return check_network(inp.host, tcp_ports=inp.tcp_ports, udp_ports=inp.udp_ports,
                         mqtt_ports=inp.mqtt_ports, declared=inp.declared_ports,
                         allow_public=inp.allow_public, progress=progress)


def _pi_host(inp: CheckInputs, run: CheckRun, progress: Progress | None) -> list[Verdict]:
    if inp.host_capture is not None:
        run.inputs.append(InputFile("host-capture", str(inp.host_capture),
                                    hash_path(inp.host_capture)))
        return probe_host(capture_json=inp.host_capture, progress=progress)
    assert inp.gateway_root is not None
    return probe_host(inp.gateway_root, progress=progress)


def _evidence(inp: CheckInputs, run: CheckRun, progress: Progress | None) -> list[Verdict]:
    assert inp.declaration is not None
    verdicts = check_declaration(inp.declaration)
    run.inputs.extend(f for f in inp.declaration.inputs if f.name != "evidence")
    return verdicts


_MCU = ("esp32", "rp2040")

STEPS: tuple[Step, ...] = (
    Step("eFuse capture", "--efuse-json is given", lambda i: i.efuse_json is not None,
         EFUSE_REQUIREMENTS, _efuse_capture),
    Step("eFuses over USB", "--port is given on an esp32 and no --efuse-json",
         lambda i: i.platform == "esp32" and i.port is not None and i.efuse_json is None,
         EFUSE_REQUIREMENTS, _efuse_port),
    Step("security info capture", "--security-info is given (esptool get-security-info)",
         lambda i: i.security_info is not None, EFUSE_REQUIREMENTS, _security_info),
    Step("serial console", "--port is given on an esp32 or rp2040",
         lambda i: i.platform in _MCU and i.port is not None, (REQ_NO_CONSOLE,), _serial),
    Step("firmware image", "--firmware is given on an esp32 or rp2040",
         lambda i: i.platform in _MCU and i.firmware is not None,
         (REQ_SIGNED, REQ_ROLLBACK, REQ_NO_SHIPPED_SECRETS, REQ_NO_CONSOLE), _image),
    Step("secrets in the firmware", "--firmware is given on a rpi-gateway",
         lambda i: i.platform not in _MCU and i.firmware is not None,
         (REQ_NO_SHIPPED_SECRETS,), _secrets),
    Step("network", "--host is given", lambda i: i.host is not None,
         (REQ_PORTS, REQ_CLEAR_TEXT, REQ_BANNER, REQ_TLS, REQ_AUTH, REQ_CERT_AUTH), _network),
    Step("Raspberry Pi host", "--gateway-root or --host-capture is given on a rpi-gateway",
         lambda i: i.platform == "rpi-gateway" and (i.gateway_root is not None
                                                    or i.host_capture is not None),
         (REQ_SSH, REQ_PRIV, REQ_ACCOUNTS, REQ_UPDATES, REQ_CONFINE, REQ_KEYS), _pi_host),
    Step("vendor declaration", "--evidence is given", lambda i: i.declaration is not None,
         EVIDENCE_REQUIREMENTS, _evidence, kind="evidence"),
)


def _failed(step: Step, e: UserError) -> list[Verdict]:
    why = "the %s step failed: %s" % (step.name, str(e)[:LIMITS.tool_output_max_chars])
    return [Verdict(req, step.name, Outcome.UNDECIDED, why, (Evidence("error", type(e).__name__),),
                    e.hint or "fix the input and run the check again")
            for req in step.requirements]


def run_check(inputs: CheckInputs, steps: tuple[Step, ...] = STEPS,
              progress: Progress | None = None) -> CheckResult:
    """Run every step that applies to ``inputs`` (module docstring)."""
    say = progress or (lambda _line: None)
    chosen = [s for s in steps if s.applies(inputs)]
    run = CheckRun()
    if inputs.declaration is not None:
        run.inputs.extend(f for f in inputs.declaration.inputs if f.name == "evidence")
    done: list[StepOutcome] = []
    for n, step in enumerate(chosen, 1):
        say("[%d/%d] %s ..." % (n, len(chosen), step.name))
        try:
            verdicts = step.run(inputs, run, progress)
        except UserError as e:
            done.append(StepOutcome(step, _failed(step, e), str(e)))
            say("[%d/%d] %s ... could not decide: %s" % (n, len(chosen), step.name,
                                                         str(e).splitlines()[0][:200]))
            continue
        done.append(StepOutcome(step, verdicts))
        say("[%d/%d] %s ... %d verdict%s" % (n, len(chosen), step.name, len(verdicts),
                                            "" if len(verdicts) == 1 else "s"))
    return CheckResult(done, run)


def resolve_platform(platform: str | None, esp_inputs: bool,
                     declaration: LoadedDeclaration | None) -> str:
    """The device's platform: as named, else the declaration's, else esp32 for eFuse inputs."""
    declared = declaration.declaration.platform if declaration else None
    if platform and declared and platform != declared:
        raise CheckInputError("--platform %s, but the declaration %s says %s"
                              % (platform, declaration.path if declaration else "", declared))
    chosen = platform or declared or ("esp32" if esp_inputs else None)
    if chosen is None:
        raise CheckInputError("name the platform: --platform esp32, rp2040 or rpi-gateway "
                              "(or give --evidence, whose declaration names it)")
    if chosen != "esp32" and esp_inputs:
        raise CheckInputError("eFuse and security-info inputs are ESP32 inputs, not %s"
                              % chosen)
    return chosen


def check_report(inputs: CheckInputs, profile_name: str, *, vendor: str | None = None,
                 model: str | None = None, progress: Progress | None = None,
                 steps: tuple[Step, ...] = STEPS) -> dict[str, Any]:
    """Run the check and return the JSON report's document (``report_json``)."""
    cat = load_catalogue()
    profile = load_profile(profile_name, cat)
    profile_data, _ = profile_source(profile_name)
    result = run_check(inputs, steps, progress)
    outcome = evaluate(profile, inputs.platform, result.verdicts("probe"),
                       result.verdicts("evidence"))
    decl = inputs.declaration.declaration if inputs.declaration else None
    device = Device(vendor=vendor or (decl.vendor if decl else "undeclared"),
                    model=model or (decl.model if decl else "undeclared"),
                    platform=inputs.platform, chip=result.run.chip,
                    firmware=decl.firmware if decl else None)
    return report_document(outcome, catalogue=cat, catalogue_sha256=sha256(catalogue_bytes()),
                           profile_sha256=sha256(profile_data), device=device,
                           inputs=result.run.inputs)
