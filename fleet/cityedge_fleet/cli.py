"""The fleet's sub-commands of ``cityedge``: ``fleet``, ``ca``, ``audit`` and ``broker``.

Errors the operator can fix raise ``cityedge_host.errors.UserError``, which the
``cityedge`` command prints once as ``cityedge: <message>`` with exit code 1 (3 for a
missing, empty, foreign or unreachable database: ``db.DatabaseError``).

Only ``fleet init-db`` and ``fleet serve --init-db`` create a database; the commands that
change things migrate an existing one; the readers (``audit verify``, ``audit export``, the
reports) neither create nor migrate, and name the database they read (``db.open_database``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from pydantic import ValidationError
from sqlmodel import Session

from cityedge_fleet.config import ENV_FILE_VARIABLE, Settings, describe_errors, env_file_from
from cityedge_host.errors import EXIT_UNAVAILABLE, UserError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from cityedge_fleet.models import AuditVerifyResult

fleet_app = typer.Typer(help="Fleet service: API, ingest, tokens.", no_args_is_help=True)
ca_app = typer.Typer(help="Certificate authority: offline root, online intermediate.",
                     no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
broker_app = typer.Typer(help="Broker configuration for the fleet (Mosquitto, or a RabbitMQ "
                         "cluster).", no_args_is_help=True)


def load_settings() -> Settings:
    """The settings from ``CITYEDGE_*`` (and the file ``CITYEDGE_ENV_FILE`` names, said on
    stderr); every problem is listed at once, naming its variable."""
    try:
        env_file = env_file_from(os.environ)
    except ValueError as e:
        raise UserError("fleet settings: %s" % e) from e
    if env_file is not None:
        print("cityedge: fleet settings: reading %s (%s)" % (env_file, ENV_FILE_VARIABLE),
              file=sys.stderr)
    try:
        return Settings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as e:
        raise UserError("fleet settings: %s" % "; ".join(describe_errors(e))) from e


def _engine(settings: Settings, purpose: Literal["read", "write"] = "write") -> Engine:
    """The database for a command: ``write`` migrates an existing fleet database, ``read``
    only checks it; neither creates one (``fleet init-db`` does)."""
    from cityedge_fleet.db import open_database

    return open_database(settings, purpose)


def _reading(settings: Settings, *, to_stdout: bool = False) -> Engine:
    """A reader's engine, the database it reads said on stderr (password masked; on
    stdout with ``to_stdout``, where a verdict says what it rests on)."""
    from cityedge_fleet.db import describe_database

    engine = _engine(settings, "read")
    print("database: %s" % describe_database(settings.database_url),
          file=sys.stdout if to_stdout else sys.stderr)
    return engine


class NothingToCheck(UserError):
    """A reader found its table empty where a fleet that has run has rows."""

    exit_code = EXIT_UNAVAILABLE


@fleet_app.command("init-db")
def init_db_command() -> None:
    """Create the fleet's database (a SQLite file, or the schema in an empty PostgreSQL
    database) or bring an existing one to the newest schema. The only command that
    creates one: the others refuse a missing database (a mistyped URL)."""
    from cityedge_fleet.db import describe_database, make_engine, migrate

    settings = load_settings()
    engine = make_engine(settings, create=True)
    try:
        before, after = migrate(engine, create=True)
    finally:
        engine.dispose()
    where = describe_database(settings.database_url)
    if before is None:
        print("database %s: created, schema %s" % (where, after))
    elif before != after:
        print("database %s: migrated from schema %s to %s" % (where, before, after))
    else:
        print("database %s: up to date, schema %s" % (where, after))


@fleet_app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8080,
    ingest: Annotated[bool, typer.Option(help="Also run an ingest worker.")] = True,
    init_db: Annotated[bool, typer.Option(
        "--init-db", help="Create the database if it does not exist (as `fleet init-db`); "
        "without it a missing database stops the start.")] = False,
) -> None:
    """Run the fleet API (OpenAPI at /docs); migrations are applied at start."""
    from cityedge_fleet.serve import serve

    settings = load_settings()
    settings.ingest_with_serve = ingest and settings.ingest_with_serve
    try:
        serve(settings, host, port, init_db=init_db)
    except ValueError as e:
        raise UserError(str(e)) from e


@fleet_app.command("ingest")
def ingest_command() -> None:
    """Run one ingest worker (MQTT 5 shared subscription, or the cluster's queue with
    CITYEDGE_BROKER_ENGINE=rabbitmq); several may run side by side."""
    from cityedge_fleet.ingest import Ingestor
    from cityedge_fleet.ingest_transport import ingest_worker
    from cityedge_fleet.serve import say_start

    settings = load_settings()
    say_start("fleet ingest", settings, ingest=True)
    try:
        worker = ingest_worker(Ingestor(_engine(settings), settings), settings)
    except ValueError as e:
        raise UserError(str(e)) from e
    worker.run_forever()


@fleet_app.command("retention")
def retention_command() -> None:
    """Make the readings' coming partitions and drop those retention expired (run daily:
    CITYEDGE_READING_PARTITION, _PARTITIONS_AHEAD, _RETENTION_DAYS)."""
    from cityedge_fleet import reading_partitions

    settings = load_settings()
    engine = _engine(settings)
    try:
        report = reading_partitions.maintain(
            engine, period=settings.reading_partition,
            ahead=settings.reading_partitions_ahead,
            retention_days=settings.reading_retention_days)
    finally:
        engine.dispose()
    print("partitions made: %s" % (" ".join(report.created) or "none"))
    print("partitions dropped: %s" % (" ".join(report.dropped) or "none"))
    print("expired rows deleted: %d; rows moved out of the default partition: %d"
          % (report.deleted_rows, report.moved_rows))


@fleet_app.command("replay-dead-letters")
def replay_dead_letters_command(
    limit: Annotated[int, typer.Option(min=1, max=10_000,
                                       help="Dead letters to replay, oldest first.")] = 100,
) -> None:
    """Run the ingest again on messages kept as dead letters (once their cause is fixed);
    each one stored is removed, each one still refused is kept with its new error."""
    from cityedge_fleet.ingest_dead_letter import replay_from_settings

    replay_from_settings(load_settings(), limit)


@fleet_app.command("create-token")
def create_token_command(
    name: Annotated[str, typer.Option(help="Who the token is for.")],
    role: Annotated[str, typer.Option(help="Role: admin, security, technician, ...")] = "admin",
    site: Annotated[list[str] | None, typer.Option(
        help="Scope a technician token to this site (repeatable); none: every site.")] = None,
    vendor: Annotated[str | None, typer.Option(
        help="A vendor token's vendor (required for --role vendor): it uploads hardware "
        "reports for that vendor's device models only.")] = None,
) -> None:
    """Create an API token (the bootstrap admin token); it is printed once, never stored."""
    from cityedge_fleet import audit
    from cityedge_fleet.auth import create_api_token
    from cityedge_fleet.models import ApiTokenCreate, Role

    try:
        role_ = Role(role)
    except ValueError as e:
        raise UserError("unknown role %r; one of: %s"
                            % (role, ", ".join(r.value for r in Role))) from e
    try:
        wanted = ApiTokenCreate(name=name, role=role_, sites=list(site or ()), vendor=vendor)
    except ValidationError as e:
        raise UserError("create-token: %s" % "; ".join(
            str(err["msg"]).removeprefix("Value error, ") for err in e.errors())) from e
    settings = load_settings()
    with Session(_engine(settings)) as session:
        row, token = create_api_token(session, name=wanted.name, role=role_, created_by="cli",
                                      sites=wanted.sites, vendor=wanted.vendor)
        detail: dict[str, object] = {"role": role_.value, "id": row.id}
        if wanted.sites:
            detail["sites"] = wanted.sites
        if wanted.vendor is not None:
            detail["vendor"] = wanted.vendor
        audit.append(session, actor="cli", action="token.create", outcome=audit.OK,
                     target=name, source="local", detail=detail)
        session.commit()
    print(token)
    scope = " at sites %s" % ", ".join(wanted.sites) if wanted.sites else ""
    scope += " for vendor %s" % wanted.vendor if wanted.vendor else ""
    print("cityedge: token for %s (%s%s) printed once; store it now" % (name, role_.value, scope),
          file=sys.stderr)


@ca_app.command("init")
def ca_init_command(
    root_dir: Annotated[Path, typer.Option(help="Offline root: key + cert (keep it offline).")],
    out_dir: Annotated[Path, typer.Option(help="Online CA dir (CITYEDGE_CA_DIR).")],
    name: Annotated[str, typer.Option(help="Name in the CA certificates.")] = "cityedge",
    root_password_file: Annotated[Path | None, typer.Option(
        envvar="CITYEDGE_ROOT_PASSWORD_FILE",
        help="Encrypt the root key with the passphrase in this file (mode 0600).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        envvar="CITYEDGE_CA_PASSWORD_FILE",
        help="Encrypt the intermediate key with the passphrase in this file (mode 0600).")]
    = None,
    pkcs11_module: Annotated[Path | None, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_MODULE",
        help="Make the intermediate key inside this PKCS#11 module's token instead.")] = None,
    pkcs11_token: Annotated[str | None, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_TOKEN", help="The token's label.")] = None,
    pkcs11_key_label: Annotated[str, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_KEY_LABEL", help="The key's label in the token.")]
    = "cityedge-intermediate",
    pkcs11_pin_file: Annotated[Path | None, typer.Option(
        envvar="CITYEDGE_CA_PKCS11_PIN_FILE",
        help="The file holding the token's user PIN (mode 0600).")] = None,
) -> None:
    """Create the offline root CA and the online intermediate that signs devices; the keys
    encrypted with passphrases from files, or the intermediate made in a PKCS#11 token."""
    from cityedge_fleet.ca import init_ca
    from cityedge_fleet.ca_custody import cli_custody, read_secret_file

    custody = cli_custody(password_file, pkcs11_module, pkcs11_token, pkcs11_key_label,
                          pkcs11_pin_file)
    root_password = (read_secret_file(root_password_file, "root passphrase")
                     if root_password_file else None)
    init_ca(root_dir, out_dir, name=name, root_password=root_password, custody=custody)
    where = ("in PKCS#11 token %r" % pkcs11_token if custody.token else
             "encrypted" if password_file else "in clear (development only)")
    print("root CA: %s (%s; move the key offline); intermediate: %s (key %s)"
          % (root_dir, "encrypted" if root_password else "key in clear", out_dir, where))


@ca_app.command("issue-service")
def ca_issue_service_command(
    cn: Annotated[str, typer.Option(help="fleet-ingest, fleet-commands, or the broker's name.")],
    out_dir: Annotated[Path, typer.Option(help="Where to write <cn>.key and <cn>.crt.")],
    server: Annotated[list[str] | None, typer.Option(
        help="Make a TLS server certificate for this DNS name or IP (repeatable).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="The intermediate key's passphrase file (default: CITYEDGE_CA_PASSWORD_FILE).")]
    = None,
) -> None:
    """Issue a certificate for a fleet service (ingest, commands) or for the broker."""
    import dataclasses

    from cityedge_fleet.ca import CertificateAuthority, issue_service
    from cityedge_fleet.ca_custody import custody_of

    settings = load_settings()
    custody = custody_of(settings)
    if password_file is not None:
        custody = dataclasses.replace(custody, password_file=password_file)
    ca = CertificateAuthority(settings.ca_dir, custody)
    cert, key = issue_service(ca, cn, out_dir, tuple(server or ()))
    print("certificate %s, key %s (mode 0600)" % (cert, key))


@audit_app.command("verify")
def audit_verify_command(
    jsonl: Annotated[Path | None, typer.Option(
        help="Verify this export (`cityedge audit export`) instead of the database.")] = None,
    without_key: Annotated[bool, typer.Option(
        help="With --jsonl, for an auditor without the key: linkage only.")] = False,
    allow_empty: Annotated[bool, typer.Option(
        help="Accept an empty log (a fleet that has not yet written one).")] = False,
) -> None:
    """Check the audit log's MACs and chain; exit 1 naming every edited, forged, deleted
    or reordered row (and a missing or emptied anchor); exit 3 when there was nothing to
    check (no database, not a fleet database, unreachable, or an empty log). Never
    creates or migrates the database; names the one it checked."""
    from cityedge_fleet import audit, audit_key

    if jsonl is not None:
        key = None if without_key else audit_key.load(load_settings().audit_key_file)
        result = audit.verify_rows(_read_export(jsonl), key)
    elif without_key:
        raise typer.BadParameter("--without-key checks an export: give --jsonl FILE")
    else:
        with Session(_reading(load_settings(), to_stdout=True)) as session:
            result = audit.verify(session)
    if result.rows == 0 and not allow_empty:
        raise NothingToCheck(
            "the audit log %s has no rows: nothing was verified"
            % ("export %s" % jsonl if jsonl is not None else "in this database"),
            hint="a fleet that has run has rows (tokens, enrollments, revocations are "
                 "audited): check CITYEDGE_DATABASE_URL; --allow-empty accepts a new "
                 "fleet's empty log")
    _print_verified_with(result)
    if not result.ok:
        for problem in result.problems:
            print(problem, file=sys.stderr)
        raise UserError("audit log is broken: %d problem(s) in %d rows"
                            % (len(result.problems), result.rows))
    print("audit log intact: %d rows" % result.rows)
    if jsonl is None and result.anchor is None:
        print("warning: no CITYEDGE_AUDIT_ANCHOR_FILE: deleting the newest rows would not "
              "be detected", file=sys.stderr)


def _read_export(path: Path) -> list[dict[str, object]]:
    import json

    rows: list[dict[str, object]] = []
    try:
        with path.open() as f:
            for n, line in enumerate(f, 1):
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("line %d is not a JSON object" % n)
                rows.append(row)
    except (OSError, ValueError) as e:
        raise UserError("cannot read the audit export %s: %s" % (path, e)) from e
    return rows


def _print_verified_with(result: AuditVerifyResult) -> None:
    """Say what the verdict rests on: which key, which anchor, what was not checkable."""
    if result.key_id is not None:
        print("key %s: %d keyed rows checked, %d legacy rows (plain SHA-256, vouched for "
              "by the key's audit.key row)" % (result.key_id, result.keyed_rows,
                                              result.legacy_rows))
    else:
        print("no key: linkage only; %d keyed rows not authenticated, %d legacy rows"
              % (result.unauthenticated_rows, result.legacy_rows))
    if result.anchor is not None:
        print("anchor %s: %d heads compared" % (result.anchor, result.anchored_heads))


@audit_app.command("init-key")
def audit_init_key_command() -> None:
    """Create the audit log's key (CITYEDGE_AUDIT_KEY_FILE, 32 random bytes, mode 0600)
    and, on a log written before it, append the keyed row that vouches for those rows."""
    from cityedge_fleet import audit, audit_key

    settings = load_settings()
    path = settings.audit_key_file
    if audit_key.create(path):
        print("audit key created: %s (mode 0600; back it up off this host: without it "
              "the log's MACs cannot be checked)" % path)
    else:
        print("audit key %s exists: kept (a new key would not verify the rows keyed "
              "with it)" % path)
    with Session(_engine(settings)) as session:
        key = audit_key.for_session(session)
        assert key is not None  # make_engine attaches it
        print("key id %s" % key.key_id)
        try:
            row = audit.vouch_for_legacy(session, key, actor="cli")
        except ValueError as e:
            if str(e).startswith("the audit log already has keyed rows"):
                print(str(e))
                return
            raise UserError("the audit log written before the key does not verify, so "
                                "the key does not vouch for it: %s" % e) from e
        if row is None:
            return
        rid = row.id or 0
        session.commit()
    print("row %d vouches for the %d rows written before the key" % (rid, rid - 1))


@audit_app.command("export")
def audit_export_command(
    out: Annotated[Path | None, typer.Option(
        help="File to write (default: stdout).", dir_okay=False)] = None,
    allow_empty: Annotated[bool, typer.Option(
        help="Accept an empty log (a fleet that has not yet written one).")] = False,
) -> None:
    """Export the audit log as JSON lines (exit 3 when there is no database or the log is
    empty; never creates or migrates the database; names the one it read on stderr)."""
    from sqlmodel import func, select

    from cityedge_fleet import audit
    from cityedge_fleet.models import AuditRecord

    settings = load_settings()
    with Session(_reading(settings)) as session:
        if not allow_empty and not session.exec(select(func.count()).select_from(
                AuditRecord)).one():
            raise NothingToCheck("the audit log in this database has no rows: nothing to "
                                 "export", hint="check CITYEDGE_DATABASE_URL; "
                                 "--allow-empty accepts a new fleet's empty log")
        if out is None:
            for line in audit.export_jsonl(session):
                sys.stdout.write(line)
            return
        with out.open("w") as f:
            for line in audit.export_jsonl(session):
                f.write(line)


def _rabbitmq_config(settings: Settings, out_dir: Path, certfile: Path, keyfile: Path,
                     bind: str, service: list[str] | None, *, nodes: int, host: str,
                     mqtt_port: int, amqp_port: int, dist_port: int) -> None:
    from cityedge_fleet import broker, broker_acl, broker_rabbitmq
    from cityedge_fleet.broker_sync import desired_devices
    from cityedge_fleet.ca import CRL_FILE, CertificateAuthority
    from cityedge_fleet.ca_custody import custody_of

    services = service or [broker_acl.INGEST_CN, broker_acl.COMMANDS_CN]
    for cn in services:
        if broker_acl.identity_kind(cn) not in broker_acl.SERVICE_KINDS:
            raise UserError("--service %s is not a fleet service identity" % cn)
    try:  # the layout first: a wrong one is refused before anything is read or written
        cluster = broker_rabbitmq.nodes(nodes, host=host, mqtt_port=mqtt_port,
                                        amqp_port=amqp_port, dist_port=dist_port)
    except ValueError as e:
        raise UserError(str(e)) from e
    ca = CertificateAuthority(settings.ca_dir, custody_of(settings))
    with Session(_engine(settings)) as session:
        devices = desired_devices(session)
    files = broker.BrokerFiles(cafile=ca.write_broker_bundle(), certfile=certfile,
                               keyfile=keyfile, crlfile=settings.ca_dir / CRL_FILE)
    try:
        dirs = broker_rabbitmq.write(out_dir, files, cluster, bind=bind,
                                     identities=[*services, *devices])
    except ValueError as e:
        raise UserError(str(e)) from e
    for node, d in zip(cluster, dirs, strict=True):
        print("%s %s" % (node.name, d))
    print("cityedge: %d nodes, %d services and %d devices; start each node with its own "
          "file, first node first: RABBITMQ_CONF_ENV_FILE=<its dir>/rabbitmq-env.conf "
          "rabbitmq-server (docs/BROKERS.md)" % (len(cluster), len(services), len(devices)),
          file=sys.stderr)


@broker_app.command("config")
def broker_config_command(
    out_dir: Annotated[Path, typer.Option(
        help="Where to write mosquitto.conf and dynamic-security.json (the broker's user "
             "must be able to write there: the plugin rewrites its file).")],
    certfile: Annotated[Path, typer.Option(help="The broker's server certificate (PEM).")],
    keyfile: Annotated[Path, typer.Option(help="The broker's server key (PEM).")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="TLS listener port.")] = 8883,
    bind: Annotated[str, typer.Option(help="Listener address.")] = "0.0.0.0",  # noqa: S104
    pid_file: Annotated[Path | None, typer.Option(help="Mosquitto pid file (for SIGHUP).")]
    = None,
    service: Annotated[list[str] | None, typer.Option(
        help="A fleet service identity (certificate CN) the broker lets in; repeatable. "
             "Default: fleet-ingest, fleet-commands, fleet-control.")] = None,
    plugin: Annotated[Path | None, typer.Option(
        help="mosquitto_dynamic_security.so (found in Debian's places by default).")] = None,
    broker_user: Annotated[str, typer.Option(
        help="The user the broker runs as (Debian's service drops to `mosquitto`): it "
             "must be able to read every file the config names.")] = "mosquitto",
    set_owner: Annotated[bool, typer.Option(
        help="Give the broker's user what it lacks: group read on the files, group enter "
             "on their folders, ownership of --out-dir (run as root).")] = False,
    persistence_dir: Annotated[Path, typer.Option(
        help="mosquitto: where the broker saves its sessions and queued messages "
             "(mosquitto.db; the broker's user writes there).")]
    = Path("/var/lib/mosquitto"),
    max_queued_mb: Annotated[int, typer.Option(
        min=1, help="mosquitto: MiB of messages the broker queues for one client (the "
                    "ingest, while it is away) before it drops what comes next; the bound "
                    "on its memory (docs/SECURITY.md).")] = 1024,
    engine: Annotated[str, typer.Option(
        help="mosquitto (one node) or rabbitmq (a cluster; docs/BROKERS.md).")]
    = "mosquitto",
    nodes: Annotated[int, typer.Option(
        min=1, max=99, help="rabbitmq: cluster nodes (on one host each takes the next "
                            "ports after --port, --amqp-port and --dist-port).")] = 3,
    node_host: Annotated[str, typer.Option(
        help="rabbitmq: the host of the nodes: one (every node on it, each the next ports), "
             "or one per node, comma-separated (a node per machine, the same ports on "
             "each; full names or IPv4 addresses give Erlang long node names).")]
    = "localhost",
    amqp_port: Annotated[int, typer.Option(min=1, max=65535,
                                           help="rabbitmq: first AMQP TLS port.")] = 5671,
    dist_port: Annotated[int, typer.Option(
        min=1, max=65535, help="rabbitmq: first Erlang distribution port.")] = 25672,
) -> None:
    """Write a Mosquitto config: mTLS listener, CN as username and client id, CRL, and the
    dynamic security plugin's rules for the fleet's services and every device the
    registry lets connect now. Then check that the broker's user can read every file it
    names (exit 1 listing what to change, or --set-owner to change it).

    --engine rabbitmq writes a cluster instead: one directory per node (rabbitmq.conf,
    advanced.config, enabled_plugins, rabbitmq-env.conf), the registry's users and rules in
    definitions.json and the CRL in its hash directory."""
    from cityedge_fleet import broker, broker_acl, broker_files
    from cityedge_fleet.broker_sync import desired_devices
    from cityedge_fleet.ca import CRL_FILE, CertificateAuthority
    from cityedge_fleet.ca_custody import custody_of

    if engine not in ("mosquitto", "rabbitmq"):
        raise UserError("--engine %s is not supported" % engine,
                        hint="use mosquitto (one node) or rabbitmq (a cluster)")
    settings = load_settings()
    if engine == "rabbitmq":
        _rabbitmq_config(settings, out_dir, certfile, keyfile, bind, service, nodes=nodes,
                         host=node_host, mqtt_port=port, amqp_port=amqp_port,
                         dist_port=dist_port)
        return
    user = broker_files.lookup(broker_user)
    if user is None:
        raise UserError("there is no user %s on this machine" % broker_user,
                        hint="pass --broker-user the user the broker runs as (Debian's "
                             "mosquitto package creates `mosquitto`)")
    services = service or list(broker_acl.DEFAULT_SERVICES)
    for cn in services:
        if broker_acl.identity_kind(cn) not in broker_acl.SERVICE_KINDS:
            raise UserError("--service %s is not a fleet service identity (fleet-ingest, "
                                "fleet-commands or fleet-control, with an optional "
                                "-<suffix>)" % cn)
    ca = CertificateAuthority(settings.ca_dir, custody_of(settings))
    with Session(_engine(settings)) as session:
        devices = desired_devices(session)
    out_dir.mkdir(parents=True, exist_ok=True)
    persistence_dir.mkdir(parents=True, exist_ok=True)
    # the CA keeps its bundle beside its CRL: a rollover and a retirement change both
    bundle = ca.write_broker_bundle()
    files = broker.BrokerFiles(cafile=bundle, certfile=certfile, keyfile=keyfile,
                               crlfile=settings.ca_dir / CRL_FILE)
    try:
        conf = broker.write(out_dir, files, port=port, bind=bind, pid_file=pid_file,
                            identities=[*services, *devices],
                            share_group=settings.ingest_share_group, plugin=plugin,
                            user=broker_user, persistence_dir=persistence_dir,
                            max_queued_bytes=max_queued_mb << 20)
    except ValueError as e:
        raise UserError(str(e)) from e
    read = [conf, files.cafile, files.certfile, files.keyfile, files.crlfile,
            plugin or broker.find_dynsec_plugin()]
    # the plugin saves its file as <file>.new, renamed over it; the broker its state
    write = [out_dir, persistence_dir]
    if set_owner:
        try:
            for change in broker_files.set_owner(user, read, write):
                print("cityedge: %s" % change, file=sys.stderr)
        except PermissionError as e:
            raise UserError("--set-owner could not change %s: %s" % (e.filename, e.strerror),
                            hint="run it as root, or make the changes listed without "
                                 "--set-owner by hand") from e
    print(conf)
    print("cityedge: %d services and %d devices granted; the fleet keeps the devices in step "
          "through fleet-control" % (len(services), len(devices)), file=sys.stderr)
    missing = broker_files.problems(user, read, write)
    if missing:
        raise UserError(
            "the broker's user %s cannot %s" % (user.name, "; cannot ".join(
                "%s %s (%s)" % (p.need, p.path, p.why) for p in missing)),
            hint="change: %s; or run `broker config` again with --set-owner as root"
                 % "; ".join(p.fix for p in missing if p.fix))
