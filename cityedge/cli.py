"""The ``cityedge`` command: one entry point, one sub-command group per part of the system.

Errors a user can cause (a bad file, a bad key, an unreachable service) are raised as
``cityedge_host.errors.UserError`` by every part and printed here, once, as ``cityedge:
<what went wrong>`` and ``  what to do: <hint>``, exit code 1 (3 when the error says
nothing was there to work on: ``EXIT_UNAVAILABLE``) — never a traceback. The
core's ``CityedgeError`` family and ``OSError`` are reported the same way, without a hint.
Usage errors (a wrong option) exit 2, as Click does; Ctrl-C exits 130.

**Start-up cost.** The parts' command groups are imported only when one is run
(``_Commands.resolve_command``): ``cityedge --help`` and ``cityedge --version`` list them
from ``PARTS`` (name, module, attribute, one-line help) without importing FastAPI,
SQLAlchemy or the crypto libraries, so the bare command answers at once on a Raspberry Pi.
A test keeps ``PARTS``' help lines equal to the groups' own. ``cityedge PART --version``
answers for a part too (the parts ship in one distribution: one version).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from cityedge_core.errors import CityedgeError
from cityedge_host.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

# name: (module, attribute, the group's one-line help as the group itself says it).
# A module listed twice is imported once; ``ca_cli`` adds rollover/retire/status to the
# fleet's ``ca`` group, ``hw_upload`` adds ``hw upload`` (the fleet side of ``hw``).
PARTS: dict[str, tuple[str, str, str]] = {
    "inspect": ("cityedge.inspect_cmd", "inspect_command",
                "Decode a signed reading batch; verify its signature when a key is given."),
    "gateway": ("cityedge_gateway.cli", "gateway_app", "The Raspberry Pi gateway agent: "
                "serial sensors, node relay, store-and-forward."),
    "fleet": ("cityedge_fleet.cli", "fleet_app", "Fleet service: API, ingest, tokens."),
    "ca": ("cityedge_fleet.ca_cli", "ca_app",
           "Certificate authority: offline root, online intermediate."),
    "audit": ("cityedge_fleet.cli", "audit_app", "The hash-chained audit log."),
    "broker": ("cityedge_fleet.cli", "broker_app",
               "Broker configuration for the fleet (Mosquitto, or a RabbitMQ cluster)."),
    "keys": ("cityedge_fleet.keys_cli", "keys_app",
             "Keys and signed fleet commands (security team)."),
    "sim": ("cityedge.sim", "sim_app", "Run simulated devices on the MicroPython unix port."),
    "provision": ("cityedge_provision.cli", "provision_app", "Provision devices over USB "
                  "serial: identity, certificate, config, self-test."),
    "release": ("cityedge.release_cmd", "release_app",
                "Release keys, signed update manifests (release manager)."),
    "hw": ("cityedge_hardware.cli", "hw_app",
           "Check hardware against the city's device guidelines."),
    "ota": ("cityedge_fleet.ota_cli", "ota_app",
            "Releases and staged OTA campaigns (release manager)."),
}


# the extra (pyproject.toml) each part needs beyond the base install
EXTRAS = {"gateway": "gateway", "fleet": "fleet", "ca": "fleet", "audit": "fleet",
          "broker": "fleet", "keys": "fleet", "ota": "fleet", "provision": "provisioning",
          "hw": "hardware", "sim": "firmware", "release": "firmware", "inspect": "gateway"}


def version() -> str:
    """The installed distribution's version (``pyproject.toml``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("cityedge")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def _print_version(ctx: Any, _param: Any, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo("cityedge %s" % version())
        raise typer.Exit()


def load_part(name: str) -> Any:
    """The click command of part ``name``, imported now."""
    module, attribute, _help = PARTS[name]
    try:
        obj = getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as e:  # a part whose extra this install left out
        if e.name and e.name.split(".")[0].startswith("cityedge"):
            raise
        extra = EXTRAS.get(name, "all")
        raise UserError("cityedge %s is not installed here (it needs %s)" % (name, e.name),
                        hint="pip install 'cityedge[%s]'" % extra) from e
    if name == "hw" and not any(c.name == "upload" for c in obj.registered_commands):
        try:  # the fleet side of `hw`: checks a report as the fleet will, then sends it
            from cityedge.hw_upload import upload_command
        except ModuleNotFoundError as e:  # a vendor's install without the fleet's stack
            upload_command = _needs_extra("hw upload", "fleet", str(e.name))
            obj.command("upload", context_settings={"allow_extra_args": True,
                                                    "ignore_unknown_options": True},
                        help="Send a report to the city's fleet (needs cityedge[fleet]).")(
                upload_command)
        else:
            obj.command("upload")(upload_command)
    cmd: Any
    if isinstance(obj, typer.Typer):
        cmd = typer.main.get_group(obj)
    else:  # a single command (``inspect``)
        single = typer.Typer(add_completion=False)
        single.command(name)(obj)
        cmd = typer.main.get_command(single)
    cmd.name = name
    return cmd


def _needs_extra(command: str, extra: str, missing: str) -> Any:
    """A stand-in for ``command`` in an install without ``extra``: says what to install."""

    def stand_in() -> None:
        raise UserError("cityedge %s is not installed here (it needs %s)" % (command, missing),
                        hint="pip install 'cityedge[%s]'" % extra)

    return stand_in


def _part_version(args: list[str]) -> bool:
    """``cityedge PART --version``: answered before typer builds anything (the parts ship
    in one distribution, so the version is the distribution's)."""
    if len(args) == 2 and args[0] in PARTS and args[1] == "--version":
        typer.echo("cityedge %s %s" % (args[0], version()))
        return True
    return False


class _Commands(TyperGroup):
    """The root group: parts listed from ``PARTS``, imported when run; any sub-command's
    user error is reported here, once."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, (_module, _attribute, help_text) in PARTS.items():
            if name not in self.commands:  # a stand-in for the listing (``--help``)
                self.commands[name] = TyperGroup(name=name, help=help_text,
                                                 rich_markup_mode=None)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if _part_version(args):
            raise typer.Exit()
        if args and args[0] in PARTS and not getattr(self.commands[args[0]], "_loaded",
                                                     False):
            cmd = load_part(args[0])
            cmd._loaded = True
            self.commands[args[0]] = cmd
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        try:
            return super().invoke(ctx)
        except (UserError, CityedgeError, OSError) as e:
            report(e)
            raise typer.Exit(getattr(e, "exit_code", EXIT_USER_ERROR)) from e


def report(e: BaseException) -> None:
    """Print an error the way every ``cityedge`` command does."""
    typer.echo("cityedge: %s" % e, err=True)
    hint = getattr(e, "hint", "")
    if hint:
        typer.echo("  what to do: %s" % hint, err=True)


app = typer.Typer(
    name="cityedge",
    help="Edge gateway firmware and fleet manager for a city's sensor network.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich's import alone would double the start-up
    cls=_Commands,
)


@app.callback()
def _root(
    _version: bool = typer.Option(False, "--version", is_eager=True, expose_value=False,
                                  callback=_print_version, help="Show the version and exit."),
) -> None:
    """cityedge: sign, relay, verify and manage a city's sensor readings."""


def main() -> None:
    if _part_version(sys.argv[1:]):
        return
    try:
        app()
    except (UserError, CityedgeError, OSError) as e:  # raised outside a sub-command
        report(e)
        sys.exit(getattr(e, "exit_code", EXIT_USER_ERROR))
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
