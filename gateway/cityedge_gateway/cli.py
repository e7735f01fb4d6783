"""``cityedge gateway run --config gateway.toml``: the gateway agent's command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from .config import load_config

gateway_app = typer.Typer(
    help="The Raspberry Pi gateway agent: serial sensors, node relay, store-and-forward.",
    no_args_is_help=True,
)


@gateway_app.command("run")
def run_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="gateway TOML configuration")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log debug messages")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Check the configuration, its keys, certificates and folders, "
        "and exit (0: ready; 1: what to fix) without starting or changing anything.")]
    = False,
) -> None:
    """Run the gateway agent until stopped (SIGTERM or Ctrl-C)."""
    if check:
        from cityedge_host.errors import UserError

        from .preflight import check as preflight

        findings = preflight(load_config(config))
        for f in findings:
            print("%-4s  %s" % (f.level, f.what))
        failed = [f for f in findings if f.level == "fail"]
        if failed:
            raise UserError("%s: %d problem%s; the gateway would not run as configured"
                            % (config, len(failed), "s"[:len(failed) > 1]),
                            hint="fix the lines marked fail")
        print("%s: ready (%d checks, %d warnings)" % (
            config, len(findings), sum(f.level == "warn" for f in findings)))
        return
    from .service import Gateway  # imported late: `--help` stays fast

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    gateway = Gateway(load_config(config))  # a ConfigError is a UserError
    asyncio.run(gateway.run())
    if gateway.exit_code:  # a release in trial rolled back: systemd starts the previous one
        raise typer.Exit(gateway.exit_code)


@gateway_app.command("install-trust")
def install_trust_command(
    answer: Annotated[Path, typer.Argument(help="the fleet's enrollment answer (JSON)")],
    config: Annotated[Path, typer.Option("--config", "-c", help="gateway TOML configuration")],
) -> None:
    """Install the trust statement of the fleet's enrollment answer (checked against
    [gateway] root_cert) before the gateway's first start; run with the service stopped."""
    from .enroll_trust import install_enrollment, read_answer

    print(install_enrollment(load_config(config), read_answer(answer)))
