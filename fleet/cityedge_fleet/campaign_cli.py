"""``cityedge keys`` commands for rotation campaigns and the key report (security team):

- ``rotate --select 'site=S,key-age>60d' --wave 100 --max-failures 5%``: a campaign
  (``campaign_store.create``); ``--dry-run`` shows what it would select and leave out;
  over ``CampaignLimits.confirm_over`` devices it asks (in a terminal) or needs ``--yes``;
- ``status CAMPAIGN``: progress (a bar in a terminal, ``--watch`` until it ends; ``--json``);
- ``pause`` / ``resume`` / ``abort CAMPAIGN``; ``campaigns``: the newest;
- ``report``: key age and certificate expiry across the fleet, overdue and expired devices,
  campaigns (``renewal.key_report``).

Like the other ``keys`` commands they work on the fleet's database directly (``fleet
serve``'s runner does the rotating), and every change is audited with actor ``cli``, a
refusal too. ``register`` adds them to the ``keys`` app.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from sqlmodel import Session

from cityedge_fleet.cli import _engine, _reading, load_settings
from cityedge_host.errors import UserError

WATCH_EVERY_S = 2.0  # seconds between refreshes of ``status --watch``
PREVIEW_SHOWN = 20  # device ids ``rotate --dry-run`` prints


def _dump(value: Any) -> None:
    json.dump(value, sys.stdout, indent=1, default=str)
    print()


def rotate_command(
    select: Annotated[str, typer.Option(help="Which devices: site=, model=, "
                                        "hardware-class=, tag=, firmware=, state= (= or !=, "
                                        "a|b), key-age>60d, cert-expiry<30d; or all.")],
    wave: Annotated[int, typer.Option(min=1, help="Devices per wave.")] = 100,
    max_failures: Annotated[str, typer.Option(help="Failures that halt it when exceeded: "
                                              "a count or a percentage.")] = "5%",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the selection only.")]
    = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm a large selection.")] = False,
) -> None:
    """Rotate the keys of every device SELECT matches, in waves; `fleet serve` runs it
    (see `keys status CAMPAIGN`)."""
    from cityedge_fleet import audit, campaign_store
    from cityedge_fleet.campaign import LIMITS, CampaignError, SelectorError, parse_selector
    from cityedge_fleet.models import utcnow

    settings = load_settings()
    try:
        selector = parse_selector(select)
    except SelectorError as e:
        raise UserError("--select: %s" % e) from e
    with Session(_engine(settings)) as session:
        seen = campaign_store.preview(session, selector, utcnow())
        n = len(seen.selected)
        print("selector %s: %d devices to rotate" % (seen.selector, n))
        for why, count in sorted(seen.left_out.items()):
            print("  left out: %d %s" % (count, why))
        if dry_run:
            for dev in seen.selected[:PREVIEW_SHOWN]:
                print("  %s" % dev)
            if n > PREVIEW_SHOWN:
                print("  ... and %d more" % (n - PREVIEW_SHOWN))
            return
        if n > LIMITS.confirm_over and not yes:
            if not sys.stdin.isatty():
                raise UserError("%d devices is over %d" % (n, LIMITS.confirm_over),
                                "check the selection with --dry-run, then add --yes")
            yes = typer.confirm("rotate the keys of %d devices?" % n)
            if not yes:
                raise UserError("not confirmed: nothing started")
        try:
            camp, _seen = campaign_store.create(
                session, selector_text=select, wave_size=wave, max_failures=max_failures,
                by="cli", confirmed=yes)
            session.commit()
        except (SelectorError, CampaignError) as e:
            session.rollback()
            audit.record(session, actor="cli", action="campaign.create",
                         outcome=audit.REFUSED, target=select[:200], source="local",
                         detail={"why": str(e)})
            raise UserError("campaign refused: %s" % e) from e
        print("campaign %d: %d devices in waves of %d, halts over %d failures (%s); "
              "`fleet serve` runs it" % (camp.id or 0, camp.members, camp.wave_size,
                                         camp.allowed_failures, camp.max_failures))


def _status(campaign_id: int, devices: bool = False) -> dict[str, Any]:
    from cityedge_fleet import campaign_store
    from cityedge_fleet.campaign import CampaignError

    settings = load_settings()
    with Session(_engine(settings, "read")) as session:
        try:
            return campaign_store.status(session, campaign_id, devices=devices)
        except CampaignError as e:
            raise UserError(str(e)) from e


def render_status(st: dict[str, Any]) -> str:
    """The plain text of a campaign's status (also below the bar in a terminal)."""
    c = st["counts"]
    lines = ["campaign %d (%s): %s%s" % (st["id"], st["selector"], st["state"],
                                         " - %s" % st["reason"] if st["reason"] else ""),
             "  wave %d of %d (%d devices each); %d devices" % (
                 st["wave"], st["waves"], st["wave_size"], st["members"]),
             "  done %d, failed %d (halts over %d), rotating %d, offline %d, retry %d, "
             "waiting %d" % (c["done"], c["failed"], st["allowed_failures"], c["active"],
                             c["offline"], c["retry"], c["waiting"]),
             "  rotations: %s" % (", ".join("%s %d" % kv for kv in st["rotations"].items())
                                  or "none yet")]
    for f in st["failed"][:20]:
        lines.append("  failed %s (wave %s, %d tries): %s" % (
            f["device_id"], f["wave"], f["attempts"], f["reason"]))
    if len(st["failed"]) > 20:
        lines.append("  ... %d more failed (--json lists all)" % (len(st["failed"]) - 20))
    return "\n".join(lines)


def status_command(
    campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN", help="The campaign's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until it ends.")] = False,
    devices: Annotated[bool, typer.Option("--devices", help="Every device: its wave, "
                                          "status and rotation state.")] = False,
) -> None:
    """A campaign's live progress: devices done, failed (with reasons), offline, waiting."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cityedge_fleet.campaign import FINAL

    st = _status(campaign_id, devices)
    if as_json:
        _dump(st)
        return
    console = Console()
    if not console.is_terminal:
        print(render_status(st))
        _print_devices(st)
        return
    with Progress(TextColumn("campaign %d" % campaign_id), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), console=console) as bar:
        task = bar.add_task("", total=st["members"])
        while True:
            c = st["counts"]
            bar.update(task, completed=c["done"] + c["failed"],
                       description="%s, %d failed" % (st["state"], c["failed"]))
            if not watch or st["state"] in FINAL:
                break
            time.sleep(WATCH_EVERY_S)
            st = _status(campaign_id, devices)
    print(render_status(st))
    _print_devices(st)


def _print_devices(st: dict[str, Any]) -> None:
    if "devices" not in st:
        return
    print("%-34s %5s %-8s %5s %-13s %s" % ("device", "wave", "status", "tries", "rotation",
                                           "reason"))
    for d in st["devices"]:
        print(("%-34s %5s %-8s %5d %-13s %s" % (
            d["device_id"], d["wave"] if d["wave"] is not None else "-", d["status"],
            d["attempts"], d["rotation_state"] or "-", d["reason"])).rstrip())


def _act(action: str, campaign_id: int) -> None:
    from cityedge_fleet import audit, campaign_store
    from cityedge_fleet.campaign import CampaignError

    settings = load_settings()
    with Session(_engine(settings)) as session:
        try:
            camp = campaign_store.act(session, campaign_id, action, by="cli")
            session.commit()
        except CampaignError as e:
            session.rollback()
            audit.record(session, actor="cli", action="campaign.%s" % action,
                         outcome=audit.REFUSED, target="campaign:%d" % campaign_id,
                         source="local", detail={"why": str(e)})
            raise UserError(str(e)) from e
        print("campaign %d: %s" % (campaign_id, camp.state))


def pause_command(campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN")]) -> None:
    """Start nothing more until resumed (rotations under way go on)."""
    _act("pause", campaign_id)


def resume_command(campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN")]) -> None:
    """Go on with a paused campaign."""
    _act("resume", campaign_id)


def abort_command(campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN")]) -> None:
    """Stop for good: nothing more starts; rotations that have not reached their device
    are cancelled, the others finish."""
    _act("abort", campaign_id)


def campaigns_command(
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
) -> None:
    """The newest campaigns and their state."""
    from cityedge_fleet import campaign_store

    settings = load_settings()
    with Session(_reading(settings)) as session:
        rows = [campaign_store.status(session, c.id or 0)
                for c in campaign_store.campaigns(session, limit=50)]
    if as_json:
        _dump(rows)
        return
    print("%5s %-8s %7s %6s %6s  %s" % ("id", "state", "devices", "done", "failed",
                                        "selector"))
    for r in rows:
        print("%5d %-8s %7d %6d %6d  %s" % (r["id"], r["state"], r["members"],
                                            r["counts"]["done"], r["counts"]["failed"],
                                            r["selector"]))


def report_command(
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
    everything: Annotated[bool, typer.Option("--all", help="Every device, not only those "
                                             "needing attention.")] = False,
) -> None:
    """Key age and certificate expiry across the fleet: overdue (due for renewal, nothing
    under way), expired (needs a technician), rotating; and the campaigns."""
    from cityedge_fleet import renewal

    settings = load_settings()
    with Session(_reading(settings)) as session:
        got = renewal.key_report(session)
    if not everything:
        got["devices"] = [d for d in got["devices"] if d["status"] != "ok"]
    if as_json:
        _dump(got)
        return
    s = got["summary"]
    print("keys at %s: %d active devices; overdue %d, expired %d (need a technician), "
          "rotating %d, due within 30 days %d, without a certificate %d" % (
              got["at"], s["devices"], s["overdue"], s["expired"], s["rotating"],
              s["due_30d"], s["no_certificate"]))
    print("%-34s %-10s %-9s %9s %10s  %s" % ("device", "site", "status", "key age d",
                                           "expires d", "renewal due"))
    for d in got["devices"]:
        if "kid" not in d:
            print("%-34s %-10s %-9s" % (d["device_id"], d["site"], d["status"]))
            continue
        print("%-34s %-10s %-9s %9.1f %10.1f  %s%s" % (
            d["device_id"], d["site"], d["status"], d["key_age_days"], d["expires_in_days"],
            d["renewal_due"][:19], " (%s)" % d["rotation"] if d["rotation"] else ""))
    if got["campaigns"]:
        print("campaigns:")
        for c in got["campaigns"]:
            print("  %d %s %s: done %d, failed %d of %d" % (
                c["id"], c["state"], c["selector"], c["counts"]["done"],
                c["counts"]["failed"], c["members"]))


def register(app: typer.Typer) -> None:
    """Add these commands to ``cityedge keys``."""
    app.command("rotate")(rotate_command)
    app.command("status")(status_command)
    app.command("pause")(pause_command)
    app.command("resume")(resume_command)
    app.command("abort")(abort_command)
    app.command("campaigns")(campaigns_command)
    app.command("report")(report_command)
