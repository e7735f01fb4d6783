"""``cityedge ca rollover | retire | status``: the intermediate CA's lifecycle after
``ca init`` (``ca_rollover``, ``ca_retire``; the procedure: docs/SECURITY_TEAM.md,
"Roll the intermediate CA over")."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session

from cityedge_fleet.cli import _engine, _reading, ca_app, load_settings

__all__ = ["ca_app"]
from cityedge_host.errors import UserError


def _settings_if_here() -> object | None:
    """The fleet's settings when this host has them (``CITYEDGE_MODE`` set), else None:
    the root may live on a machine without the fleet's database."""
    if "CITYEDGE_MODE" not in os.environ and "CITYEDGE_ENV_FILE" not in os.environ:
        return None
    return load_settings()


@ca_app.command("rollover")
def rollover_command(
    root_dir: Annotated[Path, typer.Option(help="The offline root's directory (its key).")],
    ca_dir: Annotated[Path, typer.Option(help="The fleet's CA directory (CITYEDGE_CA_DIR).")],
    broker_pid_file: Annotated[Path | None, typer.Option(
        help="Mosquitto's pid file: SIGHUP it once it must trust the new intermediate "
             "(default: CITYEDGE_BROKER_PID_FILE when the fleet's settings are here).")]
    = None,
    root_password_file: Annotated[Path | None, typer.Option(
        envvar="CITYEDGE_ROOT_PASSWORD_FILE",
        help="The root key's passphrase file, when `ca init` encrypted it.")] = None,
    password_file: Annotated[Path | None, typer.Option(
        envvar="CITYEDGE_CA_PASSWORD_FILE",
        help="The intermediates' passphrase file: opens the current one, encrypts the new "
             "one.")] = None,
) -> None:
    """Make a new online intermediate signed by the root; it signs from now on, the old
    one stays trusted until `ca retire` (run where the root lives)."""
    from cityedge_fleet import audit, revocation
    from cityedge_fleet.ca import CRL_FILE
    from cityedge_fleet.ca_custody import Custody, custody_of
    from cityedge_fleet.ca_rollover import rollover
    from cityedge_fleet.config import Settings

    settings = _settings_if_here()
    assert settings is None or isinstance(settings, Settings)
    custody = custody_of(settings) if settings else Custody()
    if password_file is not None:
        custody = dataclasses.replace(custody, password_file=password_file)
    pid_file = broker_pid_file or (settings.broker_pid_file if settings else None)
    reloads: list[bool] = []

    def reload() -> None:
        reloads.append(revocation.tell_broker(settings, ca_dir / CRL_FILE,
                                              pid_file=pid_file))

    done = rollover(root_dir, ca_dir, before_switch=reload,
                    root_password_file=root_password_file, custody=custody)
    print("intermediate %s (%s, until %s) signs from now on; %s stays trusted for the "
          "overlap%s" % (done.new_id, done.new_subject, done.new_not_after.date(),
                         done.old_id, " (CA directory moved to the rollover layout)"
                         if done.migrated else ""))
    rabbitmq = settings is not None and settings.broker_engine == "rabbitmq"
    if reloads and all(reloads):
        print("broker %s: it trusts both intermediates"
              % ("nodes have both CRLs" if rabbitmq else "reloaded"))
    elif rabbitmq:
        print("cityedge: the new CRL file is NOT on every RabbitMQ node: the fleet's "
              "reconciler installs it within CITYEDGE_BROKER_SYNC_EVERY_S; until then the "
              "new intermediate's certificates are refused there", file=sys.stderr)
    else:
        print("cityedge: the broker was NOT reloaded: send it SIGHUP now (it refuses the "
              "new intermediate's certificates until it re-reads %s and %s)"
              % (ca_dir / "broker-ca.pem", ca_dir / "crl.pem"), file=sys.stderr)
    print("next: cityedge keys rotate --select 'intermediate=%s', then cityedge ca retire"
          % done.old_id)
    if settings is None:
        print("cityedge: not audited here (no fleet settings on this host): the fleet "
              "audits the retirement", file=sys.stderr)
        return
    with Session(_engine(settings)) as session:
        audit.append(session, actor="cli", action="ca.rollover", outcome=audit.OK,
                     target=done.new_id, source="local",
                     detail={"old": done.old_id, "subject": done.new_subject,
                             "not_after": done.new_not_after.isoformat(),
                             "broker_reloaded": bool(reloads and all(reloads))})
        session.commit()


@ca_app.command("retire")
def retire_command(
    ca_dir: Annotated[Path | None, typer.Option(
        help="The fleet's CA directory (default: CITYEDGE_CA_DIR).")] = None,
) -> None:
    """Take the previous intermediate out of service once no device depends on it: the
    broker then refuses every certificate it issued."""
    from cityedge_fleet.ca_retire import retire

    settings = load_settings()
    with Session(_engine(settings)) as session:
        done = retire(session, ca_dir or settings.ca_dir, settings, by="cli")
    if done.broker_reloaded:
        told = "told"
    elif settings.broker_engine == "rabbitmq":
        told = ("NOT told (a node did not answer; the fleet's reconciler installs the CRL "
                "on every node at its next round)")
    else:
        told = "NOT reloaded (no CITYEDGE_BROKER_PID_FILE): send it SIGHUP"
    print("retired %s (key destroyed, no longer trusted by the broker); %s signs; broker %s"
          % (", ".join(done.retired), done.signing, told))


@ca_app.command("status")
def status_command(
    ca_dir: Annotated[Path | None, typer.Option(
        help="The fleet's CA directory (default: CITYEDGE_CA_DIR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, one object per "
                                          "intermediate.")] = False,
) -> None:
    """The intermediates in service, their expiry and how many devices depend on each."""
    from cityedge_fleet.ca import CaError, CertificateAuthority
    from cityedge_fleet.ca_custody import custody_of
    from cityedge_fleet.ca_retire import status

    settings = load_settings()
    try:
        ca = CertificateAuthority(ca_dir or settings.ca_dir, custody_of(settings))
    except CaError as e:
        raise UserError(str(e)) from e
    with Session(_reading(settings)) as session:
        rows = status(session, ca)
    if as_json:
        json.dump([{"id": r.id, "subject": r.subject, "role": r.role,
                    "not_before": r.not_before.isoformat(),
                    "not_after": r.not_after.isoformat(), "devices": r.devices}
                   for r in rows], sys.stdout, indent=1)
        print()
        return
    print("%-16s %-8s %-26s %-25s %s" % ("id", "role", "subject", "expires", "devices"))
    for r in rows:
        print("%-16s %-8s %-26s %-25s %d" % (r.id, r.role, r.subject,
                                             r.not_after.isoformat(timespec="seconds"),
                                             r.devices))
    for r in rows:
        if r.role == "overlap":
            print("%s: %s; then cityedge ca retire" % (r.id, (
                "%d devices to move: cityedge keys rotate --select 'intermediate=%s'"
                % (r.devices, r.id)) if r.devices else "no device depends on it"))


@ca_app.command("encrypt-keys")
def encrypt_keys_command(
    password_file: Annotated[Path, typer.Option(
        envvar="CITYEDGE_CA_PASSWORD_FILE",
        help="The passphrase file (mode 0600) to encrypt the keys with.")],
    ca_dir: Annotated[Path | None, typer.Option(
        help="Encrypt the intermediates' keys in this CA directory.")] = None,
    root_dir: Annotated[Path | None, typer.Option(
        help="Encrypt the root key in this directory (its own passphrase file: run it "
             "again with --root-dir alone).")] = None,
) -> None:
    """Encrypt CA key files that a `ca init` without --password-file wrote in clear; each
    clear file is overwritten before it is removed. Keys already encrypted are left."""
    from cityedge_fleet.ca_custody import encrypt_key_files, read_secret_file

    if (ca_dir is None) == (root_dir is None):
        raise UserError("give --ca-dir or --root-dir (each with its own passphrase file)")
    folder = ca_dir if ca_dir is not None else root_dir
    assert folder is not None
    paths = (sorted([*folder.glob("*.key"), *(folder / "intermediates").glob("*.key")])
             if ca_dir is not None else [folder / "root.key"])
    if not paths or not all(p.is_file() for p in paths):
        raise UserError("no CA key in %s" % folder)
    done = encrypt_key_files(paths, read_secret_file(password_file, "CA passphrase"))
    print("encrypted %d key file(s) in %s%s" % (len(done), folder, "".join(
        "\n  %s" % p for p in done)))


@ca_app.command("import-to-token")
def import_to_token_command(
    pkcs11_module: Annotated[Path, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_MODULE", help="The PKCS#11 module (.so).")],
    pkcs11_token: Annotated[str, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_TOKEN", help="The token's label.")],
    pkcs11_pin_file: Annotated[Path, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_PIN_FILE",
        help="The file holding the token's user PIN (mode 0600).")],
    ca_dir: Annotated[Path, typer.Option(help="The fleet's CA directory (CITYEDGE_CA_DIR).")],
    pkcs11_key_label: Annotated[str, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_KEY_LABEL", help="The key's label in the token.")]
    = "cityedge-intermediate",
    password_file: Annotated[Path | None, typer.Option(
        envvar="CITYEDGE_CA_PASSWORD_FILE",
        help="The intermediate key's passphrase file, when it is encrypted.")] = None,
) -> None:
    """Move the signing intermediate's key into a PKCS#11 token (sensitive, not
    extractable); its key file is overwritten and removed: the fleet then signs through
    the token (set CITYEDGE_CA_PKCS11_*)."""
    from cityedge_fleet.ca_custody import cli_custody
    from cityedge_fleet.ca_token import move_to_token

    custody = cli_custody(password_file, pkcs11_module, pkcs11_token, pkcs11_key_label,
                          pkcs11_pin_file)
    inter_id = move_to_token(ca_dir, custody)
    print("intermediate %s now signs from PKCS#11 token %r (key %r); its key file is gone"
          % (inter_id, pkcs11_token, pkcs11_key_label))
