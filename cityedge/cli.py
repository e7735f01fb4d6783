"""The ``cityedge`` command: one entry point, one sub-command group per part of the system.

Errors a user can cause (a bad file, a bad key, an unreachable service) are reported as
``cityedge: <what went wrong and what to do>`` with exit code 1, never a traceback. Usage
errors (a wrong option) exit 2, as Click does.
"""

from __future__ import annotations

import sys

import typer

from cityedge.inspect_cmd import inspect_command
from cityedge.sim import sim_app
from cityedge_core.errors import CityedgeError
from cityedge_fleet.cli import audit_app, broker_app, ca_app, fleet_app
from cityedge_gateway.cli import gateway_app
from cityedge_host.crypto import KeyFileError
from cityedge_provision.cli import provision_app

app = typer.Typer(
    name="cityedge",
    help="Edge gateway firmware and fleet manager for a city's sensor network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """cityedge: sign, relay, verify and manage a city's sensor readings."""


app.command("inspect")(inspect_command)

# Sub-command groups of the other parts, one entry each.
for _name, _group in (
    ("gateway", gateway_app),
    ("fleet", fleet_app),
    ("ca", ca_app),
    ("audit", audit_app),
    ("broker", broker_app),
    ("sim", sim_app),
    ("provision", provision_app),
):
    app.add_typer(_group, name=_name)


class UserError(Exception):
    """Raised by commands for a problem the user can fix; printed without a traceback."""


def main() -> None:
    try:
        app()
    except (UserError, KeyFileError, CityedgeError, OSError) as e:
        print("cityedge: %s" % e, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
