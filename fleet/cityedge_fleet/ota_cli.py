"""``cityedge ota``: releases and OTA campaigns (the release manager's), on the fleet's
database and artifact store directly, like ``cityedge keys`` (``fleet serve``'s runner
does the rolling out); every change is audited with actor ``cli``, a refusal too.

- ``release upload --manifest M --keys K --artifact A``: the artifact streamed into the
  store under its SHA-256, then the release checked (``ota_store.create_release``);
- ``release list`` / ``release show ID``;
- ``campaign create --release ID --select S --waves 1%,10%,100% --success 90%
  --max-failures 5%`` (``--yes`` over ``CampaignLimits.confirm_over`` devices);
- ``campaign status ID [--devices] [--json]``, ``pause`` / ``resume`` / ``abort ID``.

Errors are ``UserError`` (exit 2) with a hint where one helps.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlmodel import Session

from cityedge_fleet.cli import _engine, load_settings
from cityedge_host.errors import UserError

ota_app = typer.Typer(help="Releases and staged OTA campaigns (release manager).",
                      no_args_is_help=True)
release_app = typer.Typer(help="Signed releases in the fleet's store.", no_args_is_help=True)
campaign_app = typer.Typer(help="Roll a release out in waves.", no_args_is_help=True)
ota_app.add_typer(release_app, name="release")
ota_app.add_typer(campaign_app, name="campaign")
CHUNK = 1 << 16


def _dump(value: Any) -> None:
    json.dump(value, sys.stdout, indent=1, default=str)
    print()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError("cannot read the %s %s: %s" % (what, path, e.strerror)) from e


def _refuse(session: Session, action: str, target: str, e: Exception, hint: str = ""
            ) -> UserError:
    from cityedge_fleet import audit

    session.rollback()
    audit.record(session, actor="cli", action=action, outcome=audit.REFUSED, target=target,
                 source="local", detail={"why": str(e)})
    return UserError(str(e), hint)


@release_app.command("upload")
def release_upload(
    manifest: Annotated[Path, typer.Option(help="The signed manifest (`cityedge release "
                                           "sign`).")],
    keys: Annotated[Path, typer.Option(help="The root-signed release-key list.")],
    artifact: Annotated[Path, typer.Option(help="The artifact the manifest names.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
) -> None:
    """Store an artifact and its checked release (the fleet signs nothing: it checks the
    manifest against its root set and refuses what a device would refuse)."""
    from cityedge_fleet import audit, ota_store

    settings = load_settings()
    m, k = _read(manifest, "manifest"), _read(keys, "key list")
    h = hashlib.sha256()
    try:
        with artifact.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except OSError as e:
        raise UserError("cannot read the artifact %s: %s" % (artifact, e.strerror)) from e
    with Session(_engine(settings)) as session:
        try:
            up = ota_store.ArtifactUpload(settings, h.hexdigest())
            with artifact.open("rb") as f:
                while chunk := f.read(CHUNK):
                    up.feed(chunk)
            up.finish()
            rel = ota_store.create_release(session, settings, manifest=m, key_list=k,
                                           by="cli")
            audit.append(session, actor="cli", action="ota.release.upload",
                         outcome=audit.OK, target="release:%d" % (rel.id or 0),
                         source="local", detail=ota_store.release_public(rel))
            session.commit()
        except ota_store.OtaError as e:
            raise _refuse(session, "ota.release.upload", str(artifact)[:200], e,
                          "check it first with `cityedge release verify`") from e
        out = ota_store.release_public(rel)
    if as_json:
        _dump(out)
    else:
        print("release %d: %s %s (sequence %d) for %s, %d bytes, expires %s" % (
            out["id"], out["component"], out["version"], out["sequence"],
            ",".join(out["hw_classes"]), out["size"], out["expires_at"]))


@release_app.command("list")
def release_list(as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False
                 ) -> None:
    """The newest releases."""
    from cityedge_fleet import ota_store

    settings = load_settings()
    with Session(_engine(settings)) as session:
        rows = [ota_store.release_public(r) for r in ota_store.releases(session)]
    if as_json:
        _dump(rows)
        return
    for r in rows:
        print("%4d  %-16s %-10s seq %-6d %s" % (r["id"], r["component"], r["version"],
                                               r["sequence"], ",".join(r["hw_classes"])))


@release_app.command("show")
def release_show(release_id: Annotated[int, typer.Argument(metavar="RELEASE")]) -> None:
    """One release (JSON)."""
    from cityedge_fleet import ota_store

    settings = load_settings()
    with Session(_engine(settings)) as session:
        try:
            _dump(ota_store.release_public(ota_store.get_release(session, release_id)))
        except ota_store.OtaError as e:
            raise UserError(str(e), "`cityedge ota release list` shows them") from e


@campaign_app.command("create")
def campaign_create(
    release: Annotated[int, typer.Option(help="The release's id.")],
    select: Annotated[str, typer.Option(help="Which devices (the key campaigns' selector: "
                                        "site=, model=, hardware-class=, tag=, ...; or "
                                        "all).")],
    waves: Annotated[str, typer.Option(help="Cumulative shares or counts.")] = "1%,10%,100%",
    success: Annotated[str, typer.Option(help="Share of a wave that must commit before "
                                         "the next starts.")] = "90%",
    max_failures: Annotated[str, typer.Option(help="Rollbacks and failures that halt it "
                                              "when exceeded.")] = "5%",
    yes: Annotated[bool, typer.Option("--yes", help="Confirm a large selection.")] = False,
) -> None:
    """Roll RELEASE out to the devices SELECT matches, wave by wave."""
    from cityedge_fleet import audit, ota_store

    settings = load_settings()
    with Session(_engine(settings)) as session:
        try:
            camp = ota_store.create_campaign(
                session, settings, release_id=release, selector_text=select, waves=waves,
                success=success, max_failures=max_failures, by="cli", confirmed=yes)
            audit.append(session, actor="cli", action="ota.campaign.create",
                         outcome=audit.OK, target="ota-campaign:%d" % (camp.id or 0),
                         source="local", detail={"release": release, "waves": camp.waves,
                                                 "members": camp.members})
            session.commit()
        except ota_store.OtaError as e:
            raise _refuse(session, "ota.campaign.create", select[:200], e,
                          "add --yes to confirm" if "confirm" in str(e) else "") from e
        print("OTA campaign %d: release %d to %d devices in waves %s (cumulative), next "
              "wave at %s committed, halts over %d failures; `fleet serve` runs it"
              % (camp.id or 0, release, camp.members, ",".join(map(str, camp.waves)),
                 camp.success, camp.allowed_failures))


def render_status(st: dict[str, Any]) -> str:
    c = st["counts"]
    rel = st["release"]
    lines = ["OTA campaign %d (%s %s, sequence %d; %s): %s%s" % (
        st["id"], rel["component"], rel["version"], rel["sequence"], st["selector"],
        st["state"], " - %s" % st["reason"] if st["reason"] else ""),
        "  wave %d of %d (%s); this wave %d committed, %d needed" % (
            st["wave"], len(st["waves"]), st["waves_text"], st["wave_committed"],
            st["wave_needed"]),
        "  " + ", ".join("%s %d" % kv for kv in c.items() if kv[1])]
    for f in st["failed"][:20]:
        lines.append("  %s %s (wave %s): %s" % (f["status"], f["device_id"], f["wave"],
                                                f["reason"]))
    return "\n".join(lines)


@campaign_app.command("status")
def campaign_status(
    campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
    devices: Annotated[bool, typer.Option("--devices", help="Every device.")] = False,
) -> None:
    """A campaign's progress: counts by status, the wave's threshold, failures."""
    from cityedge_fleet import ota_store

    settings = load_settings()
    with Session(_engine(settings)) as session:
        try:
            st = ota_store.status(session, campaign_id, devices=devices)
        except ota_store.OtaError as e:
            raise UserError(str(e)) from e
    if as_json:
        _dump(st)
    else:
        print(render_status(st))


def _act(action: str, campaign_id: int) -> None:
    from cityedge_fleet import ota_store

    settings = load_settings()
    with Session(_engine(settings)) as session:
        try:
            camp = ota_store.act(session, campaign_id, action, by="cli")
            session.commit()
        except ota_store.OtaError as e:
            raise _refuse(session, "ota.campaign.%s" % action,
                          "ota-campaign:%d" % campaign_id, e) from e
        print("OTA campaign %d: %s" % (campaign_id, camp.state))


@campaign_app.command("pause")
def campaign_pause(campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN")]) -> None:
    """Start no more devices until resumed."""
    _act("pause", campaign_id)


@campaign_app.command("resume")
def campaign_resume(campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN")]
                    ) -> None:
    """Go on with a paused campaign."""
    _act("resume", campaign_id)


@campaign_app.command("abort")
def campaign_abort(campaign_id: Annotated[int, typer.Argument(metavar="CAMPAIGN")]) -> None:
    """Stop for good; update commands not delivered yet are cancelled."""
    _act("abort", campaign_id)
