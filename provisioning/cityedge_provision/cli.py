"""``cityedge provision``: the field technician's commands.

``cityedge provision [--port P] [--yes]`` provisions the device on the USB port: it shows
what it found, asks before changing anything, then runs the steps of
``cityedge_provision.session`` with one line per step and the time it took. Every failure
prints ``cityedge: <what failed>`` and ``  what to do: <next step>``, exit code 1.

Sub-commands: ``login`` / ``logout`` (the fleet URL and API token, kept in a 0600 file),
``tokens SERIAL...`` (enrollment tokens fetched beforehand for offline work), ``sync``
(enroll the CSRs queued offline), ``replace OLD_ID`` (a new device takes over a site's role
and config; the old one is retired and its certificate revoked), ``bulk MANIFEST`` (many
devices from a vendor delivery manifest, summary table at the end), ``label`` and
``ports``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cityedge_provision import label as labels
from cityedge_provision.errors import FleetRefused, ProvisionError
from cityedge_provision.fleet_client import FleetClient, Workspace, check_fleet_url
from cityedge_provision.limits import LIMITS
from cityedge_provision.session import DeviceInfo, Options, Outcome, ProvisionSession, StepResult
from cityedge_provision.transport import SerialTransport, list_ports

SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a manifest's claim_sha256

provision_app = typer.Typer(
    help="Provision devices over USB serial: identity, certificate, config, self-test.",
    invoke_without_command=True, no_args_is_help=False, add_completion=False)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

PortOpt = Annotated[str | None, typer.Option("--port", "-p", help="Serial port of the device "
                                             "(default: the only USB serial port found).")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before changing the "
                                      "device (for scripts).")]
SiteOpt = Annotated[str, typer.Option(help="Site the device is installed at.")]
OfflineOpt = Annotated[bool, typer.Option(help="No fleet connection: use enrollment tokens "
                                          "fetched beforehand and queue the CSR.")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the outcome as JSON on stdout (for scripts); progress goes to "
    "stderr.")]
LabelOpt = Annotated[Path | None, typer.Option("--label", help="Save a label (.png or .pdf) "
                                               "with a QR code of the device URN.")]


def workspace() -> Workspace:
    return Workspace()


def _der_certificate(path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
    except ValueError as e:
        raise ProvisionError("%s is not a PEM certificate: %s" % (path, e),
                             "give the CA certificate of the fleet's HTTPS endpoint") from e


def choose_port(port: str | None, yes: bool) -> str:
    if port:
        return port
    ports = list_ports()
    known = [p for p in ports if p.known]
    if len(known) == 1:
        out.print("Using %s" % known[0].label())
        return known[0].device
    if not ports:
        raise ProvisionError("no serial port found", "plug the device in with a data-capable "
                             "USB cable, then run again (or name it with --port)")
    out.print("Serial ports:")
    for p in ports:
        out.print("  %s" % p.label())
    if yes:
        raise ProvisionError("several serial ports and none is a known device",
                             "choose one with --port")
    choice: str = typer.prompt("Port of the device", default=ports[0].device)
    return choice


def _fleet(offline: bool, ws: Workspace) -> FleetClient | None:
    if offline:
        return None
    return FleetClient.from_workspace(ws)


def _confirm(yes: bool, site: str) -> Callable[[DeviceInfo], bool] | None:
    if yes:
        return None

    def ask(info: DeviceInfo) -> bool:
        where = " at site %s" % site if site else ""
        return typer.confirm("Provision %s (serial %s)%s?" % (info.device, info.serial, where),
                             default=False)

    return ask


def _on_start(name: str) -> None:
    if out.is_terminal:
        out.print("  … %s" % name, end="\r")


def _on_step(step: StepResult) -> None:
    out.print("  ✓ %-9s %s (%.2f s)" % (step.name, step.detail, step.seconds))


def run_session(port: str, ws: Workspace, fleet: FleetClient | None, opts: Options
                ) -> Outcome:
    out.print("Device on %s:" % port)
    with SerialTransport(port) as t:
        session = ProvisionSession(t, ws, fleet, opts, on_start=_on_start, on_step=_on_step)
        try:
            return session.run()
        except ProvisionError:
            if session.current is not None:
                out.print("  ✗ %-9s failed" % session.current)
            raise


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    """What ``--json`` prints of one device's outcome (no secret: ids, times, steps)."""
    return {"status": outcome.status, "device": outcome.device, "serial": outcome.serial,
            "kid": outcome.kid, "site": outcome.site, "seconds": round(outcome.seconds, 3),
            "steps": [{"name": s.name, "detail": s.detail, "seconds": round(s.seconds, 3)}
                      for s in outcome.steps], "warnings": outcome.warnings}


@contextlib.contextmanager
def _json_mode(on: bool) -> Iterator[None]:
    """With ``--json`` the human progress goes to stderr, so stdout holds the JSON alone
    (for the command's run only: the console follows ``sys.stdout`` again after it)."""
    if on:
        out.file = sys.stderr
    try:
        yield
    finally:
        out.file = None  # type: ignore[assignment]  # rich: None is the current sys.stdout


def report(outcome: Outcome, label_path: Path | None) -> None:
    if outcome.status == "ticket":
        out.print("Queued %s (serial %s) for enrollment in %.1f s: the device enrolls itself "
                  "when it reaches the fleet; `cityedge provision sync` records it here."
                  % (outcome.device, outcome.serial, outcome.seconds))
    elif outcome.status == "queued":
        out.print("Queued %s (serial %s) for enrollment in %.1f s: run `cityedge provision "
                  "sync` when online." % (outcome.device, outcome.serial, outcome.seconds))
    elif outcome.status == "installed":
        out.print("Installed %s (serial %s) in %.1f s; not self-tested, so not locked."
                  % (outcome.device, outcome.serial, outcome.seconds))
    else:
        out.print("Provisioned %s (serial %s) at site %s in %.1f s."
                  % (outcome.device, outcome.serial, outcome.site or "(none)",
                     outcome.seconds))
    for text in outcome.warnings:
        out.print("[bold yellow]Warning:[/] %s" % escape(text))
    if label_path is not None:
        labels.save(labels.LabelData(outcome.device, outcome.serial, outcome.site), label_path)
        out.print("Label saved to %s" % label_path)


@provision_app.callback()
def provision(
    ctx: typer.Context,
    port: PortOpt = None,
    yes: YesOpt = False,
    site: SiteOpt = "",
    hardware_class: Annotated[str, typer.Option(help="Hardware class to register "
                                                "(default: the model).")] = "",
    tag: Annotated[list[str] | None, typer.Option(help="Tag to register (repeatable).")
                   ] = None,
    offline: OfflineOpt = False,
    restart: Annotated[bool, typer.Option(help="Make a new device key even if it has one "
                                          "(before enrollment only).")] = False,
    self_test: Annotated[bool, typer.Option(help="Run the self-test, then lock.")] = True,
    fleet_key: Annotated[list[Path] | None, typer.Option(
        help="Fleet public key (65-byte SEC1 file) the device trusts for commands, instead "
             "of the fleet's own (repeatable; default: the keys the fleet hands over at "
             "enrollment).")] = None,
    server_hostname: Annotated[str | None, typer.Option(
        help="TLS name of the broker (default: the host of the fleet's broker URL).")] = None,
    label: LabelOpt = None,
    fleet_ca: Annotated[Path | None, typer.Option(
        help="Offline: CA certificate (PEM) of the fleet's HTTPS endpoint; with it the "
             "device is handed a ticket and enrolls itself when it reaches the fleet.")
                        ] = None,
    dev_http_enroll: Annotated[bool, typer.Option(
        help="Offline, DEVELOPMENT ONLY: let the device enroll itself over plain http:// "
             "(a fleet on loopback without TLS). Never for a real fleet.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Provision the device on the USB port (when no sub-command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    with _json_mode(as_json):
        _provision_one(port, yes, site, hardware_class, tag, offline, restart, self_test,
                       fleet_key, server_hostname, label, fleet_ca, dev_http_enroll, as_json)


def _provision_one(port: str | None, yes: bool, site: str, hardware_class: str,
                   tag: list[str] | None, offline: bool, restart: bool, self_test: bool,
                   fleet_key: list[Path] | None, server_hostname: str | None,
                   label: Path | None, fleet_ca: Path | None, dev_http_enroll: bool,
                   as_json: bool) -> None:
    ws = workspace()
    opts = Options(site=site, hardware_class=hardware_class, tags=list(tag or []),
                   offline=offline, restart=restart, self_test=self_test,
                   fleet_keys=[p.read_bytes() for p in fleet_key or []],
                   server_hostname=server_hostname, confirm=_confirm(yes, site),
                   fleet_ca=_der_certificate(fleet_ca) if fleet_ca else None,
                   dev_http_enroll=dev_http_enroll)
    fleet = _fleet(offline, ws)
    outcome = run_session(choose_port(port, yes), ws, fleet, opts)
    report(outcome, label)
    if as_json:
        typer.echo(json.dumps(outcome_json(outcome)))


@provision_app.command("ports")
def ports_command() -> None:
    """List serial ports, with USB vendor/product where known."""
    ports = list_ports()
    if not ports:
        out.print("No serial ports found.")
    for p in ports:
        out.print(p.label())


@provision_app.command("login")
def login_command(
    url: Annotated[str, typer.Option(help="Fleet API URL, e.g. https://fleet.city.example")],
    token_stdin: Annotated[bool, typer.Option(help="Read the token from standard input.")
                           ] = False,
    ca_file: Annotated[Path | None, typer.Option(
        help="PEM bundle of the CA that signed the fleet's HTTPS certificate (a private "
             "city CA); default: the system's CAs", exists=True, dir_okay=False)] = None,
) -> None:
    """Store your fleet API token (checked first) in a 0600 file under your config dir."""
    check_fleet_url(url)  # before asking for a token that must not go out in clear
    if token_stdin:
        token = sys.stdin.readline().strip()
    else:
        token = os.environ.get("CITYEDGE_FLEET_TOKEN") or typer.prompt(
            "API token", hide_input=True)
    client = FleetClient(url, token, ca_file=ca_file)
    try:
        client.check_login()
    finally:
        client.close()
    ws = workspace()
    ws.save_login(url, token, ca_file)
    out.print("Logged in to %s (token stored in %s, mode 0600)."
              % (url, ws.home / "login.json"))


@provision_app.command("logout")
def logout_command() -> None:
    """Forget the stored fleet token."""
    workspace().logout()
    out.print("Logged out.")


@provision_app.command("tokens")
def tokens_command(
    serials: Annotated[list[str], typer.Argument(help="Serials of the devices to provision.")],
    ttl_s: Annotated[int, typer.Option(help="Seconds the tokens stay valid.")
                     ] = LIMITS.offline_token_ttl_s,
) -> None:
    """Fetch enrollment tokens now, to provision these serials later without a connection."""
    ws = workspace()
    fleet = FleetClient.from_workspace(ws)
    got: dict[str, dict[str, str]] = {}
    for serial in serials:
        t = fleet.enrollment_token(serial, ttl_s)
        got[serial] = {"token": str(t["token"]), "expires_at": str(t["expires_at"])}
    ws.save_tokens(got)
    ws.save_fleet_keys(fleet.fleet_keys())  # what the offline devices' tickets carry
    out.print("Fetched %d enrollment token(s), valid until %s."
              % (len(got), min(v["expires_at"] for v in got.values())))


@provision_app.command("sync")
def sync_command() -> None:
    """Enroll the CSRs queued offline; then connect each device again to finish it."""
    ws = workspace()
    queued = ws.queued()
    if not queued:
        out.print("Nothing queued.")
        return
    fleet = FleetClient.from_workspace(ws)
    table = Table("serial", "device", "result")
    failures = revisit = 0
    for entry in queued:
        serial = entry["serial"]
        try:
            if fleet.get_device(entry["device"]) is None:
                fleet.register_device({
                    "id": entry["device"], "serial": serial, "model": entry["model"],
                    "hardware_class": entry.get("hardware_class") or entry["model"],
                    "site": entry.get("site", ""), "firmware_version": entry.get(
                        "firmware", "")})
            by_device = False
            if entry.get("ticket") and entry.get("token"):
                # the device holds the same token: whichever comes first enrolls,
                # the other gets the same certificate
                answer, by_device = fleet.enroll_ticket(
                    serial, str(entry["token"]), entry["csr_pem"])
            else:
                answer = fleet.enroll(serial, entry.get("token"), entry["csr_pem"],
                                      entry.get("claim"))
                revisit += 1
        except FleetRefused as e:
            failures += 1
            table.add_row(serial, entry["device"], "refused: %s" % e)
            continue
        ws.save_session(serial, {"serial": serial, "device": entry["device"],
                                 "kid": entry["kid"], "enrollment": answer})
        ws.unqueue(serial)
        ws.drop_token(serial)
        table.add_row(serial, entry["device"], "enrolled by the device itself" if by_device
                      else "certificate issued (the device fetches it with its ticket)"
                      if entry.get("ticket") else "certificate issued")
    out.print(table)
    if revisit:
        out.print("Connect each enrolled device again (`cityedge provision`) to install "
                  "its certificate and run the self-test.")
    if failures:
        raise ProvisionError("%d queued enrollment(s) refused" % failures,
                             "fetch new tokens (`cityedge provision tokens`) for those "
                             "serials and provision them again")


@provision_app.command("replace")
def replace_command(
    old_id: Annotated[str, typer.Argument(help="Device id (URN) of the device to replace.")],
    port: PortOpt = None,
    yes: YesOpt = False,
    label: LabelOpt = None,
) -> None:
    """Provision the device on the port as the replacement of OLD_ID, then retire OLD_ID."""
    ws = workspace()
    fleet = FleetClient.from_workspace(ws)
    old = fleet.get_device(old_id)
    if old is None:
        raise FleetRefused("the fleet has no device %s" % old_id, 404,
                           "check the id on the old device's label")
    if old.get("state") == "retired":
        raise FleetRefused("%s is already retired" % old_id, 409)
    site = str(old.get("site") or "")
    opts = Options(site=site, hardware_class=str(old.get("hardware_class") or ""),
                   tags=list(old.get("tags") or []), confirm=_confirm(yes, site),
                   register={"tags": list(old.get("tags") or [])})
    outcome = run_session(choose_port(port, yes), ws, fleet, opts)
    if outcome.device == old_id:
        raise ProvisionError("the device on the port is %s itself" % old_id,
                             "connect the new device")
    report(outcome, label)
    revoked = []
    try:
        for cred in fleet.credentials(old_id):
            if cred.get("status") == "active":
                fleet.revoke_credential(old_id, str(cred["serial"]))
                revoked.append(str(cred["serial"]))
        fleet.set_state(old_id, "retired", "replaced by %s" % outcome.device)
    except FleetRefused as e:
        raise ProvisionError(
            "%s is provisioned, but retiring %s failed: %s" % (outcome.device, old_id, e),
            "ask the security team to revoke the certificates of %s and retire it "
            "(the new device is already working)" % old_id) from e
    out.print("Retired %s (certificate%s %s revoked); %s took over site %s."
              % (old_id, "s" if len(revoked) != 1 else "",
                 ", ".join(revoked) or "none", outcome.device, site or "(none)"))


@provision_app.command("bulk")
def bulk_command(
    manifest: Annotated[Path, typer.Argument(help="Vendor delivery manifest (JSON).")],
    yes: YesOpt = False,
    labels_dir: Annotated[Path | None, typer.Option(help="Save a PNG label per device "
                                                    "here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Provision every device of a vendor manifest, one after another; summary at the end.

    The manifest (``docs/VENDOR_MANIFEST.md``): ``{"manifest": "<delivery note id>",
    "devices": [{"serial": ..., "claim_sha256": ..., "port": ..., "site": ...}, ...]}``.
    Its serials and claim hashes go to the fleet's allow-list first; each device then
    enrolls without a token, with the claim secret it reports from its flash (checked
    against the manifest's hash before it is sent).
    """
    with _json_mode(as_json):
        _bulk(manifest, yes, labels_dir, as_json)


def _bulk(manifest: Path, yes: bool, labels_dir: Path | None, as_json: bool) -> None:
    data = _load_manifest(manifest)
    ws = workspace()
    fleet = FleetClient.from_workspace(ws)
    fleet_call_upload(fleet, data)
    table = Table("serial", "device", "site", "result", "seconds")
    failed = 0
    results: list[dict[str, Any]] = []
    for entry in data["devices"]:
        serial = str(entry["serial"])
        port = entry.get("port")
        if not port or not yes:
            port = typer.prompt("Connect %s and give its port" % serial,
                                default=port or "")
        opts = Options(site=str(entry.get("site", "")), expect_serial=serial,
                       allow_list=True, expect_claim_sha256=str(entry["claim_sha256"]))
        try:
            o = run_session(str(port), ws, fleet, opts)
        except ProvisionError as e:
            failed += 1
            err.print("cityedge: %s: %s" % (serial, e))
            table.add_row(serial, "", str(entry.get("site", "")), "FAILED: %s" % e, "")
            results.append({"status": "failed", "serial": serial, "error": str(e)})
            continue
        if labels_dir is not None:
            labels_dir.mkdir(parents=True, exist_ok=True)
            labels.save(labels.LabelData(o.device, o.serial, o.site),
                        labels_dir / ("%s.png" % serial))
        for text in o.warnings:
            out.print("[bold yellow]Warning:[/] %s: %s" % (serial, escape(text)))
        status = o.status + (" (%d warning(s))" % len(o.warnings) if o.warnings else "")
        table.add_row(serial, o.device, o.site, status, "%.1f" % o.seconds)
        results.append(outcome_json(o))
    out.print(table)
    if as_json:
        typer.echo(json.dumps({"manifest": data.get("manifest"), "devices": results}))
    out.print("%d of %d devices provisioned." % (len(data["devices"]) - failed,
                                                 len(data["devices"])))
    if failed:
        raise ProvisionError("%d device(s) failed" % failed,
                             "fix each (the message says how) and run `cityedge provision "
                             "--port PORT` for it; done devices are not touched again")


def fleet_call_upload(fleet: FleetClient, data: dict[str, Any]) -> None:
    claims = {str(d["serial"]): str(d["claim_sha256"]) for d in data["devices"]}
    res = fleet.upload_manifest(str(data["manifest"]), claims)
    out.print("Manifest %s: %d serial(s) allow-listed, %d already listed."
              % (data["manifest"], res.get("added", 0), res.get("already_listed", 0)))


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProvisionError("cannot read the manifest %s: %s" % (path, e),
                             "give the vendor's delivery manifest (JSON)") from e
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list) or \
            not data.get("manifest") or not all(
                isinstance(d, dict) and d.get("serial") for d in data["devices"]):
        raise ProvisionError("the manifest %s needs a \"manifest\" id and a \"devices\" list "
                             "of {\"serial\": ..., \"claim_sha256\": ...}" % path)
    bad = [str(d["serial"]) for d in data["devices"]
           if not isinstance(d.get("claim_sha256"), str)
           or not SHA256_HEX.fullmatch(d["claim_sha256"])]
    if bad:
        raise ProvisionError(
            "the manifest %s has no valid claim_sha256 (64 lowercase hex digits) for %s"
            % (path, ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")),
            "a serial alone does not enroll: ask the vendor for the manifest with the "
            "devices' claim hashes (docs/VENDOR_MANIFEST.md)")
    return data


@provision_app.command("simulate")
def simulate_command(
    root: Annotated[Path, typer.Option(help="The simulated device's flash (a directory).")],
    serial: Annotated[str, typer.Option(help="Hardware serial it reports.")],
    device: Annotated[str, typer.Option(help="Device URN it reports.")],
    model: Annotated[str, typer.Option(help="Model it reports.")] = "ce-sim-1",
    claim: Annotated[str | None, typer.Option(
        help="Claim secret the vendor put in its flash (for `provision bulk`).")] = None,
) -> None:
    """Run a simulated device (the real firmware on MicroPython) on a pseudo-terminal, to
    provision it with `cityedge provision --port <the port printed>`; Ctrl-C stops it."""
    import tempfile

    from cityedge_provision.simdevice import SimulatedDevice, compile_firmware

    with tempfile.TemporaryDirectory(prefix="cityedge-sim-") as d:
        dev = SimulatedDevice(root, compile_firmware(Path(d)), serial, device, model,
                              claim=claim).start()
        out.print("Simulated %s (serial %s) on %s; its console log: %s"
                  % (device, serial, dev.port, dev.log))
        try:
            assert dev.proc is not None
            dev.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            dev.stop()


@provision_app.command("label")
def label_command(
    device: Annotated[str, typer.Argument(help="Device id (URN).")],
    serial: Annotated[str, typer.Option(help="Hardware serial.")],
    output: Annotated[Path, typer.Option("--out", help="Label file, .png or .pdf.")],
    site: SiteOpt = "",
) -> None:
    """Save a label with the device id, serial, site and a QR code of the URN."""
    labels.save(labels.LabelData(device, serial, site), output)
    out.print("Label saved to %s" % output)
