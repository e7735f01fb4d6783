"""The ``cityedge`` command: one entry point, one sub-command group per part of the system.

Errors a user can cause (a bad file, a bad key, an unreachable service) are raised as
``cityedge_host.errors.UserError`` by every part and printed here, once, as ``cityedge:
<what went wrong>`` and ``  what to do: <hint>``, exit code 1 (3 when the error says
nothing was there to work on: ``EXIT_UNAVAILABLE``) — never a traceback. The
core's ``CityedgeError`` family and ``OSError`` are reported the same way, without a hint.
Usage errors (a wrong option) exit 2, as Click does; Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from cityedge.hw_upload import upload_command
from cityedge.inspect_cmd import inspect_command
from cityedge.release_cmd import release_app
from cityedge.sim import sim_app
from cityedge_core.errors import CityedgeError
from cityedge_fleet.ca_cli import ca_app  # ca init/issue-service + rollover/retire/status
from cityedge_fleet.cli import audit_app, broker_app, fleet_app
from cityedge_fleet.keys_cli import keys_app
from cityedge_gateway.cli import gateway_app
from cityedge_hardware.cli import hw_app
from cityedge_host.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from cityedge_provision.cli import provision_app


def report(e: BaseException) -> None:
    """Print an error the way every ``cityedge`` command does."""
    typer.echo("cityedge: %s" % e, err=True)
    hint = getattr(e, "hint", "")
    if hint:
        typer.echo("  what to do: %s" % hint, err=True)


class _Commands(TyperGroup):
    """The root group: any sub-command's user error is reported here, once."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        try:
            return super().invoke(ctx)
        except (UserError, CityedgeError, OSError) as e:
            report(e)
            raise typer.Exit(getattr(e, "exit_code", EXIT_USER_ERROR)) from e


app = typer.Typer(
    name="cityedge",
    help="Edge gateway firmware and fleet manager for a city's sensor network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)


@app.callback()
def _root() -> None:
    """cityedge: sign, relay, verify and manage a city's sensor readings."""


app.command("inspect")(inspect_command)
hw_app.command("upload")(upload_command)  # the fleet side of `hw`: a report to the city

# Sub-command groups of the other parts, one entry each.
for _name, _group in (
    ("gateway", gateway_app),
    ("fleet", fleet_app),
    ("ca", ca_app),
    ("audit", audit_app),
    ("broker", broker_app),
    ("keys", keys_app),
    ("sim", sim_app),
    ("provision", provision_app),
    ("release", release_app),
    ("hw", hw_app),
):
    app.add_typer(_group, name=_name)


def main() -> None:
    try:
        app()
    except (UserError, CityedgeError, OSError) as e:  # raised outside a sub-command
        report(e)
        sys.exit(getattr(e, "exit_code", EXIT_USER_ERROR))
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
