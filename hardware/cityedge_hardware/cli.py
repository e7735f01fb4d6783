"""``cityedge hw``: the vendor's hardware checks against the city's device guidelines.

``cityedge hw catalogue [--profile P] [--json]`` lists the requirements (all of them, or those
a profile selects, with the profile's severities). ``cityedge hw efuse (--port P |
--efuse-json F) [--chip C] [--json]`` reads a chip's eFuses (or a capture of them) and gives
one verdict per eFuse requirement with its evidence and fix. ``cityedge hw serial --port P
[--json]`` probes a board's serial console (``serial_probe``): a MicroPython REPL fails.
``cityedge hw secrets PATH [--json]`` scans a firmware bundle (directory, tar, zip, ROMFS
image) for private keys, passwords and tokens (``secret_scan``). ``cityedge hw net --host ADDR
[--ports LIST] [--scan-json F] [--save-scan F] [--json]`` scans a device on the vendor's
network (``net_probe``): open ports, TLS, MQTT without credentials. ``cityedge hw image BUNDLE
[--release MANIFEST --release-keys LIST --release-root ROOTS] [--min-sequence N] [--json]``
checks a firmware bundle (``image_rules``): signed release, sequence, secrets, boot.py.
``cityedge hw host [--root DIR] [--unit NAME] [--run-tools] [--capture-json F]
[--save-capture F] [--json]`` checks a Raspberry Pi gateway host (``host_rules``).
A check with a failed or undecided requirement ends with exit code 1 and one line saying
how many; errors print ``cityedge: ...`` with what to do (``cityedge_host.errors``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cityedge_hardware.catalogue import Requirement, load_catalogue, load_profile
from cityedge_hardware.efuse_chips import CHIPS
from cityedge_hardware.efuse_collect import EfuseResult, collect
from cityedge_hardware.efuse_rules import check_summary
from cityedge_hardware.efuse_summary import parse_summary
from cityedge_hardware.errors import EfuseDataError
from cityedge_hardware.host_collect import probe_host
from cityedge_hardware.host_rules import DEFAULT_UNIT
from cityedge_hardware.image_probe import probe_image
from cityedge_hardware.image_rules import SYS_PLATFORM
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.net_capture import NetCapture, from_json
from cityedge_hardware.net_probe import DEFAULT_TCP_PORTS, DEFAULT_UDP_PORTS, scan
from cityedge_hardware.net_rules import check_capture, parse_declared, parse_ports
from cityedge_hardware.secret_bundle import Bundle
from cityedge_hardware.secret_scan import scan_items, secrets_verdict
from cityedge_hardware.serial_probe import probe
from cityedge_hardware.verdict import Outcome, Verdict
from cityedge_host.errors import UserError
from cityedge_host.files import write_atomic

hw_app = typer.Typer(help="Check hardware against the city's device guidelines.",
                     no_args_is_help=True, add_completion=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _req_json(r: Requirement, severity: str) -> dict[str, Any]:
    d = r.model_dump(exclude_none=True)
    d["severity"] = severity
    return d


@hw_app.command("catalogue")
def catalogue_command(
    profile: Annotated[str | None, typer.Option(
        "--profile", help="A bundled profile (city-baseline, city-critical, "
        "vendor-draft-example) or a path to a vendor's profile file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the guideline requirements, or those a profile selects."""
    cat = load_catalogue()
    rows: list[tuple[Requirement, str]]
    if profile is None:
        rows = [(r, r.severity) for r in cat.requirements]
        title = "cityedge device guidelines: %d requirements" % len(rows)
        name = None
    else:
        prof = load_profile(profile, cat)
        rows = [(s.requirement, s.severity) for s in prof.selected]
        title = "%s (%s): %d requirements" % (prof.title, " <- ".join(prof.chain), len(rows))
        name = prof.name
    if as_json:
        typer.echo(json.dumps({"profile": name, "catalogue_version": cat.version,
                               "requirements": [_req_json(r, s) for r, s in rows]}, indent=2))
        return
    typer.echo(title)
    for r, sev in rows:
        raised = " (raised)" if sev != r.severity else ""
        typer.echo("%-12s %-8s%s %-8s %s" % (r.id, sev, raised, r.decided_by, r.text))


def _read_upto(path: Path, limit: int, hint: str) -> bytes:
    """At most ``limit + 1`` bytes of a capture file (the parser names an oversize one)."""
    try:
        with path.open("rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise UserError("cannot read %s: %s" % (path, e.strerror or e), hint=hint) from e


def _read_capture(path: Path) -> bytes:
    data = _read_upto(path, LIMITS.efuse_json_max_bytes,
                      "pass the file `espefuse summary --format json --file F` wrote")
    if len(data) > LIMITS.efuse_json_max_bytes:
        raise EfuseDataError("%s is larger than an eFuse summary can be (%d bytes)"
                             % (path, LIMITS.efuse_json_max_bytes))
    return data


def _print_verdicts(header: str, head_json: dict[str, Any], verdicts: list[Verdict],
                    as_json: bool) -> int:
    """Print the verdicts (text or JSON); the number that failed or could not be decided."""
    counts = {o: sum(1 for v in verdicts if v.outcome is o) for o in Outcome}
    if as_json:
        typer.echo(json.dumps(dict(head_json, verdicts=[v.to_json() for v in verdicts]),
                              indent=2))
    else:
        typer.echo(header)
        for v in verdicts:
            typer.echo("%-16s %-10s %-16s %s" % (v.outcome.value.upper(), v.requirement,
                                                 v.check, v.reason))
            for e in v.evidence:
                typer.echo("    %s = %s%s" % (e.field, e.raw, "  (%s)" % e.note if e.note
                                              else ""))
            if v.fix and v.outcome is not Outcome.PASS:
                typer.echo("    fix: %s" % v.fix)
    return counts[Outcome.FAIL] + counts[Outcome.UNDECIDED]


def _print(result: EfuseResult, as_json: bool) -> int:
    return _print_verdicts("chip: %s (read from the %s)" % (result.chip or "unknown",
                                                           result.source),
                           {"source": result.source, "chip": result.chip},
                           result.verdicts, as_json)


@hw_app.command("efuse")
def efuse_command(
    port: Annotated[str | None, typer.Option("--port", "-p", help="Serial port of the chip "
                                             "(in its ROM bootloader).")] = None,
    efuse_json: Annotated[Path | None, typer.Option(
        "--efuse-json", help="A capture of `espefuse summary --format json`.")] = None,
    chip: Annotated[str | None, typer.Option(
        "--chip", help="Chip name (default: detected). Known: " + ", ".join(CHIPS))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a chip's eFuses: secure boot, flash encryption, JTAG, download mode, and the lock."""
    if (port is None) == (efuse_json is None):
        raise UserError("give exactly one of --port and --efuse-json",
                        hint="--port reads the chip now; --efuse-json reads a capture")
    if chip is not None and chip not in CHIPS:
        raise UserError("unknown chip %r" % chip, hint="known: %s" % ", ".join(CHIPS))
    if efuse_json is not None:
        summary = parse_summary(_read_capture(efuse_json), source=str(efuse_json))
        found, verdicts = check_summary(summary, chip)
        result = EfuseResult("capture", found, verdicts)
    else:
        assert port is not None
        result = collect(port, chip=chip or "auto")
    open_items = _print(result, as_json)
    if open_items:
        raise UserError("%d of %d eFuse requirements are not met or could not be decided"
                        % (open_items, len(result.verdicts)),
                        hint="run the fixes shown above (docs/VENDOR_GUIDE.md says in which "
                        "order: burned eFuses cannot be undone)")


@hw_app.command("serial")
def serial_command(
    port: Annotated[str, typer.Option("--port", "-p", help="Serial port of the board "
                                      "(running its production firmware).")],
    as_json: JsonOpt = False,
) -> None:
    """Check that a board's serial port offers no console: only cityedge frames answer."""
    result = probe(port)
    open_items = _print_verdicts("serial port: %s (%d probe steps)" % (port, len(result.steps)),
                                 {"port": port}, [result.verdict], as_json)
    if open_items:
        raise UserError("the serial console requirement is not met or could not be decided",
                        hint="see the verdict above; docs/VENDOR_GUIDE.md (serial console) "
                        "says how a production image closes the REPL")


@hw_app.command("secrets")
def secrets_command(
    path: Annotated[Path, typer.Argument(help="A firmware bundle: directory, .tar(.gz), .zip, "
                                         "ROMFS image or one file.")],
    as_json: JsonOpt = False,
) -> None:
    """Scan a firmware bundle for private keys, passwords and tokens (CE-AUTH-06)."""
    bundle = Bundle(path)
    result = scan_items(bundle.items())
    result.incomplete.extend(bundle.skipped)
    verdict = secrets_verdict(result)
    if as_json:
        typer.echo(json.dumps({"source": str(path), "scan": result.to_json(),
                               "verdicts": [verdict.to_json()]}, indent=2))
    else:
        typer.echo("%s: %d files, %d bytes scanned" % (path, result.files, result.bytes))
        typer.echo("%-16s %-10s %-16s %s" % (verdict.outcome.value.upper(),
                                             verdict.requirement, verdict.check,
                                             verdict.reason))
        for e in verdict.evidence:
            typer.echo("    %s: %s%s" % (e.field, e.raw, "  (%s)" % e.note if e.note else ""))
        if verdict.fix and verdict.outcome is not Outcome.PASS:
            typer.echo("    fix: %s" % verdict.fix)
    if verdict.outcome is not Outcome.PASS:
        raise UserError("%d secret(s) found, %d file(s) not fully scanned in %s"
                        % (len(result.findings), len(result.incomplete), path),
                        hint="remove them from the image (docs/VENDOR_GUIDE.md, "
                        "'Secrets in the firmware')")


def _path_opt(flag: str, text: str, *, dir_okay: bool = False) -> Any:
    return typer.Option(flag, help=text, exists=True, dir_okay=dir_okay, readable=True)


@hw_app.command("check")
def check_command(
    out: Annotated[Path, typer.Option("--out", help="Directory for report.json and "
                                      "report.html (created).")],
    profile: Annotated[str, typer.Option("--profile", help="A bundled profile or a path to a "
                                         "vendor's profile file.")] = "city-baseline",
    platform: Annotated[str | None, typer.Option(
        "--platform", help="esp32, rp2040 or rpi-gateway (default: the declaration's; esp32 "
        "with eFuse inputs).")] = None,
    port: Annotated[str | None, typer.Option(
        "--port", "-p", help="The board's serial port: eFuses (ESP32, in its bootloader) and "
        "the serial console.")] = None,
    efuse_json: Annotated[Path | None, _path_opt(
        "--efuse-json", "A capture of `espefuse summary --format json`.")] = None,
    security_info: Annotated[Path | None, _path_opt(
        "--security-info", "A capture of `esptool get-security-info` (Secure Download "
        "Mode).")] = None,
    chip: Annotated[str | None, typer.Option("--chip", help="Chip name (default: detected)."
                                             )] = None,
    firmware: Annotated[Path | None, _path_opt(
        "--firmware", "A firmware bundle to scan for secrets (directory, tar, zip, ROMFS).",
        dir_okay=True)] = None,
    evidence: Annotated[Path | None, _path_opt(
        "--evidence", "The vendor declaration (YAML).")] = None,
    vendor: Annotated[str | None, typer.Option("--vendor", help="Vendor name (default: the "
                                               "declaration's).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name (default: the "
                                              "declaration's).")] = None,
    host: Annotated[str | None, typer.Option(
        "--host", help="The device's network address: the network probe (loopback, private "
        "or link-local unless --allow-public).")] = None,
    declared: Annotated[str, typer.Option(
        "--declared", help="With --host: ports the model declares, e.g. 8883,5684/udp; every "
        "other open port fails.")] = "",
    mqtt_ports: Annotated[str, typer.Option(
        "--mqtt-ports", help="With --host: ports it serves MQTT on, besides 1883 and 8883."
    )] = "",
    ports: Annotated[str | None, typer.Option(
        "--ports", help="With --host: TCP ports to scan (default: %d well-known IoT ports)"
        % len(DEFAULT_TCP_PORTS))] = None,
    udp_ports: Annotated[str | None, typer.Option(
        "--udp-ports", help="With --host: UDP ports to probe (default: %d well-known; '' for "
        "none)" % len(DEFAULT_UDP_PORTS))] = None,
    allow_public: Annotated[bool, typer.Option(
        "--allow-public", help="With --host: scan an address outside loopback, private and "
        "link-local space (only with the network owner's permission).")] = False,
    release: Annotated[Path | None, _path_opt(
        "--release", "With --firmware: the signed release manifest.")] = None,
    release_keys: Annotated[Path | None, _path_opt(
        "--release-keys", "With --release: the certified release-key list.")] = None,
    release_root: Annotated[list[Path] | None, typer.Option(
        "--release-root", help="With --release: a release root set the city trusts "
        "(repeatable).", exists=True, readable=True)] = None,
    min_sequence: Annotated[int, typer.Option(
        "--min-sequence", min=0, help="With --release: the sequence the release must "
        "exceed (the last one shipped).")] = 0,
    gateway_root: Annotated[Path | None, _path_opt(
        "--gateway-root", "A Raspberry Pi gateway's file system root (/ on the Pi): the "
        "host probe.", dir_okay=True)] = None,
    host_capture: Annotated[Path | None, _path_opt(
        "--host-capture", "A capture `cityedge hw host --save-capture` wrote.")] = None,
) -> None:
    """Check a board against a profile; write report.json and report.html.

    Runs the probes the inputs allow (progress on stderr), decides every requirement of the
    profile, and exits 0 when the profile is met, 1 when it is not, 2 on a usage or input
    error. Runs without hardware on captured inputs.
    """
    from cityedge_hardware.check import CheckInputs, check_report, resolve_platform
    from cityedge_hardware.evidence import load_declaration
    from cityedge_hardware.report_html import write_reports

    try:
        if chip is not None and chip not in CHIPS:
            raise UserError("unknown chip %r" % chip, hint="known: %s" % ", ".join(CHIPS))
        for name, value in (("--vendor", vendor), ("--model", model)):
            if value is not None and not 1 <= len(value.strip()) <= 200:
                raise UserError("%s must have 1 to 200 characters" % name)
        decl = load_declaration(evidence) if evidence is not None else None
        esp = efuse_json is not None or security_info is not None
        inputs = CheckInputs(platform=resolve_platform(platform, esp, decl), port=port,
                             efuse_json=efuse_json, security_info=security_info,
                             firmware=firmware, declaration=decl, chip=chip,
                             host=host, declared_ports=tuple(sorted(_declared(declared))),
                             mqtt_ports=_port_option(mqtt_ports, (), "--mqtt-ports"),
                             tcp_ports=_port_option(ports, DEFAULT_TCP_PORTS, "--ports"),
                             udp_ports=_port_option(udp_ports, DEFAULT_UDP_PORTS,
                                                    "--udp-ports"),
                             allow_public=allow_public, release=release,
                             release_keys=release_keys, release_roots=tuple(release_root or ()),
                             min_sequence=min_sequence, gateway_root=gateway_root,
                             host_capture=host_capture)
        load_profile(profile)  # a bad profile is an input error before any probe runs
        doc = check_report(inputs, profile, vendor=vendor, model=model,
                           progress=lambda line: typer.echo(line, err=True))
        json_path, html_path = write_reports(doc, out)
    except UserError as e:
        typer.echo("cityedge: %s" % e, err=True)
        if e.hint:
            typer.echo("  what to do: %s" % e.hint, err=True)
        raise typer.Exit(2) from e
    summary = doc["summary"]
    counts = ", ".join("%d %s" % (n, name) for name, n in summary["counts"].items())
    typer.echo("%s %s: %s (%s)" % (doc["device"]["model"], doc["profile"]["name"],
                                   "MET" if summary["met"] else "NOT MET", counts))
    typer.echo("report: %s" % html_path)
    typer.echo("json:   %s" % json_path)
    if not summary["met"]:
        raise typer.Exit(1)
def _declared(text: str) -> frozenset[tuple[str, int]]:
    try:
        return parse_declared(text)
    except ValueError as e:
        raise UserError("--declared: %s" % e, hint="give ports as 8883,22/tcp,5684/udp") from e


def _port_option(text: str | None, default: tuple[int, ...], option: str) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        return parse_ports(text)
    except ValueError as e:
        raise UserError("%s: %s" % (option, e), hint="give ports as 22,80,8000-8100") from e


def _read_scan(path: Path) -> NetCapture:
    data = _read_upto(path, LIMITS.net_scan_json_max_bytes,
                      "pass a file `cityedge hw net --save-scan F` wrote")
    return from_json(data, source=str(path))


@hw_app.command("net")
def net_command(
    host: Annotated[str | None, typer.Option(
        "--host", help="The device's address: loopback, private or link-local unless "
        "--allow-public.")] = None,
    ports: Annotated[str | None, typer.Option(
        "--ports", help="TCP ports to scan, e.g. 22,80,8000-8100 (default: %d well-known "
        "IoT ports)" % len(DEFAULT_TCP_PORTS))] = None,
    udp_ports: Annotated[str | None, typer.Option(
        "--udp-ports", help="UDP ports to probe (default: %d well-known; '' for none)"
        % len(DEFAULT_UDP_PORTS))] = None,
    mqtt_ports: Annotated[str, typer.Option(
        "--mqtt-ports", help="Ports the device serves MQTT on, besides 1883 and 8883.")] = "",
    declared: Annotated[str, typer.Option(
        "--declared", help="Ports the model declares it needs, e.g. 8883,5684/udp; every "
        "other open port fails.")] = "",
    allow_public: Annotated[bool, typer.Option(
        "--allow-public", help="Scan an address outside loopback, private and link-local "
        "space (only with the network owner's permission).")] = False,
    scan_json: Annotated[Path | None, typer.Option(
        "--scan-json", help="Decide on a saved scan instead of scanning.")] = None,
    save_scan: Annotated[Path | None, typer.Option(
        "--save-scan", help="Write the scan to this file (JSON) for --scan-json.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Scan a device on the network: open ports, clear-text services, TLS, MQTT access."""
    declared_ports = _declared(declared)
    if scan_json is not None:
        capture = _read_scan(scan_json)
    elif host is None:
        raise UserError("give --host (the device's address) or --scan-json (a saved scan)",
                        hint="cityedge hw net --host 192.168.1.50")
    else:
        capture = scan(host, tcp_ports=_port_option(ports, DEFAULT_TCP_PORTS, "--ports"),
                       udp_ports=_port_option(udp_ports, DEFAULT_UDP_PORTS, "--udp-ports"),
                       mqtt_ports=_port_option(mqtt_ports, (), "--mqtt-ports"),
                       allow_public=allow_public,
                       progress=lambda m: typer.echo(m, err=True))
    if save_scan is not None:
        write_atomic(save_scan, capture.dumps().encode(), 0o644)
    verdicts = check_capture(capture, declared_ports)
    open_items = _print_verdicts(
        "host: %s (scanned %s; %d TCP, %d UDP ports; %d open)"
        % (capture.host, capture.scanned_at, len(capture.tcp_ports), len(capture.udp_ports),
           len(capture.open_ports())),
        {"host": capture.host, "scanned_at": capture.scanned_at,
         "notes": list(capture.notes)}, verdicts, as_json)
    if open_items:
        raise UserError("%d of %d network checks are not met or could not be decided"
                        % (open_items, len(verdicts)),
                        hint="see the fixes above (docs/VENDOR_GUIDE.md, 'Network')")
@hw_app.command("image")
def image_command(
    bundle: Annotated[Path, typer.Argument(help="The firmware bundle: the directory `make "
                                           "firmware` wrote (build/), a tar or zip of it, "
                                           "or the ROMFS image.")],
    release: Annotated[Path | None, typer.Option(
        "--release", help="The signed manifest (manifest.cose of `cityedge release sign`)."
    )] = None,
    release_keys: Annotated[Path | None, typer.Option(
        "--release-keys", help="The root-signed release-key list (release-keys.cose).")]
    = None,
    release_root: Annotated[list[Path] | None, typer.Option(
        "--release-root", help="A root set the city names (root-set.json); repeatable: "
        "the release must verify under one of them.")] = None,
    min_sequence: Annotated[int, typer.Option(
        "--min-sequence", help="The sequence devices run now: the release's must be "
        "above it.")] = 0,
    platform: Annotated[str, typer.Option(
        "--platform", help="The board family: " + ", ".join(SYS_PLATFORM))] = "esp32",
    hw_class: Annotated[str | None, typer.Option(
        "--hw-class", help="Check that the release names this hardware class.")] = None,
    at: Annotated[int | None, typer.Option(
        "--at", help="Judge expiries at this UNIX time (default: now).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a firmware bundle: signed update and sequence, no secrets, REPL detached."""
    if platform not in SYS_PLATFORM:
        raise UserError("unknown platform %r" % platform,
                        hint="give one of %s" % ", ".join(SYS_PLATFORM))
    verdicts = probe_image(bundle, manifest=release, release_keys=release_keys,
                           release_roots=release_root or (), min_sequence=min_sequence,
                           platform=platform, hw_class=hw_class, now=at)
    open_items = _print_verdicts("firmware bundle: %s (%s)" % (bundle, platform),
                                 {"source": str(bundle), "platform": platform},
                                 verdicts, as_json)
    if open_items:
        raise UserError("%d of %d image requirements are not met or could not be decided"
                        % (open_items, len(verdicts)),
                        hint="see the fixes above (docs/VENDOR_GUIDE.md, 'Firmware image')")


@hw_app.command("host")
def host_command(
    root: Annotated[Path, typer.Option(
        "--root", help="The gateway's root file system (a mounted SD card works too).")]
    = Path("/"),
    unit: Annotated[str, typer.Option("--unit", help="The gateway's systemd unit.")]
    = DEFAULT_UNIT,
    run_tools: Annotated[bool, typer.Option(
        "--run-tools", help="Also ask the running system: `sshd -T` and `systemctl show` "
        "(with --root /; run as root).")] = False,
    capture_json: Annotated[Path | None, typer.Option(
        "--capture-json", help="Decide on a capture saved with --save-capture.")] = None,
    save_capture: Annotated[Path | None, typer.Option(
        "--save-capture", help="Save what was read (JSON, mode 0600; no password hashes)."
    )] = None,
    reference_unit: Annotated[Path | None, typer.Option(
        "--reference-unit", help="The project's unit file (default: "
        "gateway/cityedge-gateway.service of this installation).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a Raspberry Pi gateway: SSH, accounts, updates, the service and its keys."""
    verdicts = probe_host(root, unit=unit, run_tools=run_tools, capture_json=capture_json,
                          reference_unit=reference_unit, save_to=save_capture)
    source = str(capture_json) if capture_json is not None else str(root)
    open_items = _print_verdicts("gateway host: %s (unit %s)" % (source, unit),
                                 {"source": source, "unit": unit}, verdicts, as_json)
    if open_items:
        raise UserError("%d of %d host checks are not met or could not be decided"
                        % (open_items, len(verdicts)),
                        hint="see the fixes above (docs/VENDOR_GUIDE.md, 'Raspberry Pi "
                        "gateway')")
