"""``cityedge hw upload REPORT --fleet URL``: a vendor hands the city's fleet the JSON
report of ``cityedge hw check`` for one of its device models.

The report is checked here first by the fleet's own rules (``hw_report_check``: form,
profile, every requirement listed, a summary that agrees with the outcomes), so a vendor
sees what the fleet would refuse before sending anything; then it is sent unchanged
(``FleetClient.upload_hw_report``) with the vendor's API token, read from
``CITYEDGE_FLEET_TOKEN`` or asked for (never an argument: it would stay in the shell's
history). Plain ``http`` only to this machine (``check_fleet_url``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cityedge_fleet.config import FleetLimits
from cityedge_fleet.hw_report_check import HwReportRefused, check_report
from cityedge_host.errors import UserError
from cityedge_provision.errors import FleetRefused, NotLoggedIn
from cityedge_provision.fleet_client import FleetClient, check_fleet_url

TOKEN_VARIABLE = "CITYEDGE_FLEET_TOKEN"  # noqa: S105  (a variable's name, not a token)
LIMITS = FleetLimits()  # the fleet's defaults: a fleet with other limits answers itself


class ReportRefused(UserError):
    hint = ("run `cityedge hw check` again and upload the report.json it writes, "
            "unchanged")


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(LIMITS.hw_report_max_bytes + 1)
    except OSError as e:
        raise UserError("cannot read %s: %s" % (path, e.strerror or e),
                        "pass the report.json `cityedge hw check --out DIR` wrote") from e


def _token() -> str:
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        return token
    if not sys.stdin.isatty():
        raise UserError("no API token: set %s" % TOKEN_VARIABLE,
                        "ask the city's fleet admin for a vendor token")
    return str(typer.prompt("vendor API token", hide_input=True)).strip()


def upload_command(
    report: Annotated[Path, typer.Argument(help="The report.json `cityedge hw check` "
                                           "wrote.")],
    fleet: Annotated[str, typer.Option("--fleet", help="The fleet API's URL (https://).")],
    ca_file: Annotated[Path | None, typer.Option(
        help="CA bundle of the fleet's HTTPS certificate (default: the system's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the fleet's answer.")]
    = False,
) -> None:
    """Upload a hardware report to the city's fleet, for a device model of your vendor
    (token from CITYEDGE_FLEET_TOKEN)."""
    url = check_fleet_url(fleet)  # before a token is asked for
    data = _read(report)
    try:
        accepted = check_report(data, LIMITS)
    except HwReportRefused as e:
        raise ReportRefused("%s: the fleet would refuse this report: %s"
                            % (report, "; ".join(e.problems))) from e
    client = FleetClient(url, _token(), ca_file=ca_file)
    try:
        answer = client.upload_hw_report(data)
    except NotLoggedIn as e:
        raise UserError(str(e), "check %s: the token may have been revoked; ask the "
                        "city's fleet admin for a vendor token" % TOKEN_VARIABLE) from e
    except FleetRefused as e:
        if e.status == 403:
            raise UserError(str(e), "the city's security team registers your device "
                            "models to your vendor; ask them, naming the model") from e
        raise
    finally:
        client.close()
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    typer.echo("report %s stored for %s, profile %s: %s (sha256 %s)" % (
        answer.get("id"), accepted.report.device.model, accepted.report.profile.name,
        "met" if accepted.met else "NOT met", hashlib.sha256(data).hexdigest()))
