"""``cityedge gateway run --check``: is this configuration ready to run, without running it?

Reads everything the gateway would read at start and changes nothing: it opens no store
(so no database is created), moves no key into the key slots, connects to nothing. Each
finding is ``ok``, ``warn`` (the gateway starts, but something will not work until
fixed: a serial port not plugged in yet) or ``fail`` (the gateway would not start, or
would start and fail: a key others may read, a certificate expired or not for this key,
a folder it cannot write, an installed trust statement that does not hold: the
gateway would obey no fleet command).
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cityedge_core import cbor
from cityedge_core.errors import CityedgeError
from cityedge_host.crypto import KeyFileError, load_signer, load_verifier, public_sec1
from cityedge_host.fleet_trust import FleetTrust, VersionMark

from .config import BrokerConfig, GatewayConfig
from .enroll_trust import version_mark
from .key_slots import IdentityError, KeySlots
from .store import CommandState


class _ReadOnlyMark(VersionMark):
    """The version mark, read and never written (the check changes nothing)."""

    def set(self, version: int) -> None:
        pass


class _ReadOnlyState:
    """The buffer's command state read through a read-only SQLite connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?",
                              (CommandState.PREFIX + key,)).fetchone()
        return default if row is None else cbor.loads(bytes(row[0]))

    def set(self, **values: Any) -> None:
        raise AssertionError("the check writes nothing")


def _trust(cfg: GatewayConfig) -> Finding:
    """The trust statement in the buffer, checked as the start checks it
    (``FleetTrust.check_at_start``): the gateway would obey no command if it fails."""
    try:
        db = sqlite3.connect("file:%s?mode=ro" % cfg.store_path, uri=True)
    except sqlite3.Error as e:
        return Finding("fail", "[store] %s: %s" % (cfg.store_path, e))
    try:
        root = load_verifier(cfg.root_cert) if cfg.root_cert is not None else None
        trust = FleetTrust(map(load_verifier, cfg.fleet_keys), root, _ReadOnlyState(db),
                           lambda: int(time.time()),
                           _ReadOnlyMark(version_mark(cfg).path))
    except (CityedgeError, KeyFileError, sqlite3.Error, ValueError) as e:
        return Finding("fail", "trust store: %s" % e)
    finally:
        db.close()
    if trust.broken:
        return Finding("fail", "trust store: %s; the gateway would obey no fleet command "
                               "(install the fleet's statement again: cityedge gateway "
                               "install-trust)" % trust.broken)
    if trust.statement is None:
        return Finding("ok", "trust store: no statement installed, fleet_keys trusted")
    return Finding("ok", "trust store: statement v%d installed, %d fleet keys trusted now"
                   % (trust.version, len(trust.trusted())))


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "fail"
    what: str


def _private_key(path: Path, name: str) -> tuple[Finding, bytes | None]:
    from .service import check_private_file

    try:
        check_private_file(path)
        signer = load_signer(path)
    except KeyFileError as e:
        return Finding("fail", "%s: %s" % (name, e)), None
    return Finding("ok", "%s %s: a P-256 key, mode 0600 (kid %s)" % (name, path,
                                                                   signer.kid.hex())), \
        public_sec1(signer.public_key)


def _certificate(path: Path, name: str, key_point: bytes | None,
                 now: dt.datetime) -> Finding:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        return Finding("fail", "%s %s: %s" % (name, path, e.strerror))
    except ValueError:
        return Finding("fail", "%s %s: not a PEM certificate" % (name, path))
    cert = certs[0]
    if now > cert.not_valid_after_utc:
        return Finding("fail", "%s %s: expired %s" % (name, path,
                                                      cert.not_valid_after_utc.date()))
    if now < cert.not_valid_before_utc:
        return Finding("fail", "%s %s: not valid before %s (is the clock right?)"
                       % (name, path, cert.not_valid_before_utc))
    if key_point is not None:
        point = cert.public_key().public_bytes(serialization.Encoding.X962,
                                               serialization.PublicFormat.UncompressedPoint)
        if point != key_point:
            return Finding("fail", "%s %s: not the certificate of its key file" % (name, path))
    days = (cert.not_valid_after_utc - now).days
    return Finding("ok", "%s %s: valid %d more days" % (name, path, days))


def _readable(path: Path, name: str) -> Finding:
    try:
        path.read_bytes()
    except OSError as e:
        return Finding("fail", "%s %s: %s" % (name, path, e.strerror))
    return Finding("ok", "%s %s: readable" % (name, path))


def _writable_dir(path: Path, name: str) -> Finding:
    if not path.is_dir():
        return Finding("fail", "%s %s: no such folder (create it, owned by the gateway's "
                               "user)" % (name, path))
    if not os.access(path, os.W_OK | os.X_OK):
        return Finding("fail", "%s %s: this user may not write there" % (name, path))
    return Finding("ok", "%s %s: writable" % (name, path))


def _broker(b: BrokerConfig, name: str, now: dt.datetime,
            key_in_slots: bool = False) -> list[Finding]:
    out = [_readable(b.ca_file, "[%s] ca_file" % name)]
    point = None
    if not key_in_slots:
        f, point = _private_key(b.key_file, "[%s] key_file" % name)
        out.append(f)
    out.append(_certificate(b.cert_file, "[%s] cert_file" % name, point, now))
    return out


def check(cfg: GatewayConfig, now: dt.datetime | None = None) -> list[Finding]:
    """Every finding about ``cfg``, in the order the gateway meets them at start."""
    now = now or dt.datetime.now(dt.UTC)
    out: list[Finding] = []
    slot_in_use = False
    if cfg.identity_dir is not None and cfg.broker is not None:
        slots = KeySlots(cfg.identity_dir, cfg.device)
        try:
            slot = slots.current_slot() if cfg.identity_dir.is_dir() else None
        except IdentityError as e:
            return [Finding("fail", "identity_dir: %s" % e)]
        if slot is not None:
            slot_in_use = True
            key, cert = slots.key_file(slot), slots.cert_file(slot)
            f, point = _private_key(key, "identity slot %d key" % slot)
            out += [f, _certificate(cert, "identity slot %d certificate" % slot, point, now)]
        else:
            out.append(Finding("ok", "identity_dir %s: seeded from [broker] at the first "
                                     "start" % cfg.identity_dir))
            out.append(_writable_dir(cfg.identity_dir.parent, "identity_dir's folder"))
    else:
        out.append(_private_key(cfg.key_file, "[gateway] key_file")[0])
    if cfg.broker is not None:
        out += _broker(cfg.broker, "broker", now, key_in_slots=slot_in_use)
    else:
        out.append(Finding("warn", "no [broker]: readings are stored and never sent"))
    if cfg.node_link is not None:
        out += _broker(cfg.node_link, "node_link", now)
    for n in cfg.nodes:
        try:
            load_verifier(n.public_key)
            out.append(Finding("ok", "node %s: public key %s" % (n.device, n.public_key)))
        except KeyFileError as e:
            out.append(Finding("fail", "node %s: %s" % (n.device, e)))
    for i, path in enumerate(cfg.fleet_keys):
        try:
            load_verifier(path)
            out.append(Finding("ok", "fleet_keys[%d] %s: a P-256 key" % (i, path)))
        except KeyFileError as e:
            out.append(Finding("fail", "fleet_keys[%d]: %s" % (i, e)))
    if cfg.root_cert is not None:
        out.append(_certificate(cfg.root_cert, "root_cert", None, now))
    if cfg.store_path.exists():
        out.append(Finding("ok" if os.access(cfg.store_path, os.R_OK | os.W_OK) else "fail",
                           "[store] path %s: %s" % (cfg.store_path, "exists" if os.access(
                               cfg.store_path, os.R_OK | os.W_OK) else "not writable")))
        if cfg.fleet_keys:
            out.append(_trust(cfg))
    else:
        out.append(_writable_dir(cfg.store_path.parent, "[store] path's folder"))
    for s in cfg.serial:
        if Path(s.port).exists():
            out.append(Finding("ok", "serial %s: %s present" % (s.name, s.port)))
        else:
            out.append(Finding("warn", "serial %s: %s not present (plugged in? read again "
                                       "with backoff once running)" % (s.name, s.port)))
    if cfg.update is not None:
        out.append(_writable_dir(cfg.update.root, "[update] root"))
    return out
