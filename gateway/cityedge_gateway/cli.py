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
) -> None:
    """Run the gateway agent until stopped (SIGTERM or Ctrl-C)."""
    from .service import Gateway  # imported late: `--help` stays fast

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    gateway = Gateway(load_config(config))  # a ConfigError is a UserError
    asyncio.run(gateway.run())
    if gateway.exit_code:  # a release in trial rolled back: systemd starts the previous one
        raise typer.Exit(gateway.exit_code)
