"""The fleet as the provisioning tool sees it: an HTTP client and the technician's local files.

``FleetClient`` wraps the fleet API (httpx) and turns its failures into the tool's errors:
connection failures and timeouts are ``FleetUnreachable``, 401 is ``NotLoggedIn`` (token
expired or revoked), other HTTP errors ``FleetRefused`` with the fleet's own message.

``Workspace`` is the technician's side, all under one directory (``CITYEDGE_HOME`` or
``$XDG_CONFIG_HOME/cityedge``), every file written atomically with mode 0600:

- ``login.json``: the fleet URL and the technician's API token (never printed);
- ``tokens.json``: enrollment tokens fetched beforehand for offline work, per serial;
- ``fleet_keys.json``: the fleet's public command keys, fetched with the tokens, for the
  tickets of devices provisioned offline (public data);
- ``sessions/<serial>.json``: a provisioning in progress (the device's kid, and once
  enrolled, the certificate chain and config the fleet returned: public data), so an
  interrupted run resumes instead of enrolling twice;
- ``queue/<serial>.json``: CSRs made offline, waiting for ``cityedge provision sync``
  (with the token, or a manifest device's claim secret, that enrolls them);
- ``provisioned.jsonl``: one line per device provisioned from this laptop.

No private key ever passes through here: the device keeps its key, the tool only sees
CSRs and certificates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import ssl
from pathlib import Path
from typing import Any

import httpx

from cityedge_host.files import write_atomic
from cityedge_provision.errors import FleetRefused, FleetUnreachable, NotLoggedIn
from cityedge_provision.limits import LIMITS, ProvisionLimits


def default_home() -> Path:
    env = os.environ.get("CITYEDGE_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cityedge"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by us only (its folder too)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, 0o600)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FleetRefused("%s is unreadable (%s); remove it and log in again" % (path, e),
                           0) from e


class Workspace:
    """The technician's files (see the module docstring)."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home or default_home()

    # login ----------------------------------------------------------------------------
    def save_login(self, url: str, token: str, ca_file: Path | None = None) -> None:
        record = {"url": url.rstrip("/"), "token": token}
        if ca_file is not None:
            record["ca_file"] = str(ca_file.resolve())
        write_private(self.home / "login.json", json.dumps(record).encode())

    def login(self) -> tuple[str, str]:
        data = _read_json(self.home / "login.json")
        if not isinstance(data, dict) or not data.get("url") or not data.get("token"):
            raise NotLoggedIn("not logged in to a fleet")
        return str(data["url"]), str(data["token"])

    def login_ca_file(self) -> Path | None:
        """The CA bundle saved with the login (a fleet behind a private CA), if any."""
        data = _read_json(self.home / "login.json")
        ca = data.get("ca_file") if isinstance(data, dict) else None
        return Path(ca) if ca else None

    def logout(self) -> None:
        (self.home / "login.json").unlink(missing_ok=True)

    # offline enrollment tokens ------------------------------------------------------------
    def save_tokens(self, tokens: dict[str, dict[str, str]]) -> None:
        current = self.tokens()
        current.update(tokens)
        write_private(self.home / "tokens.json", json.dumps(current, indent=1).encode())

    def tokens(self) -> dict[str, dict[str, str]]:
        data = _read_json(self.home / "tokens.json")
        return data if isinstance(data, dict) else {}

    def take_token(self, serial: str) -> str | None:
        """The pre-fetched token for ``serial`` if it has not expired (kept until used)."""
        entry = self.tokens().get(serial)
        if not entry:
            return None
        expires = dt.datetime.fromisoformat(entry["expires_at"])
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=dt.UTC)
        if expires <= dt.datetime.now(dt.UTC):
            return None
        return entry["token"]

    def save_fleet_keys(self, keys: list[str]) -> None:
        write_private(self.home / "fleet_keys.json", json.dumps(keys).encode())

    def fleet_keys(self) -> list[bytes]:
        """The fleet's command keys saved by ``provision tokens`` (SEC1 points), or none."""
        data = _read_json(self.home / "fleet_keys.json")
        try:
            return [bytes.fromhex(k) for k in data] if isinstance(data, list) else []
        except (TypeError, ValueError):
            return []

    def drop_token(self, serial: str) -> None:
        current = self.tokens()
        if current.pop(serial, None) is not None:
            write_private(self.home / "tokens.json", json.dumps(current, indent=1).encode())

    # sessions, queue, log -------------------------------------------------------------
    def _json_file(self, kind: str, serial: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in serial)
        return self.home / kind / (safe + ".json")

    def session(self, serial: str) -> dict[str, Any] | None:
        data = _read_json(self._json_file("sessions", serial))
        return data if isinstance(data, dict) else None

    def save_session(self, serial: str, record: dict[str, Any]) -> None:
        write_private(self._json_file("sessions", serial), json.dumps(record).encode())

    def end_session(self, serial: str) -> None:
        self._json_file("sessions", serial).unlink(missing_ok=True)

    def queue(self, serial: str, entry: dict[str, Any]) -> None:
        if len(self.queued()) >= LIMITS.queue_max_entries:
            raise FleetRefused("the offline queue is full (%d CSRs): run `cityedge provision "
                               "sync`" % LIMITS.queue_max_entries, 0)
        write_private(self._json_file("queue", serial), json.dumps(entry).encode())

    def queued(self) -> list[dict[str, Any]]:
        d = self.home / "queue"
        if not d.is_dir():
            return []
        out = []
        for p in sorted(d.glob("*.json")):
            data = _read_json(p)
            if isinstance(data, dict):
                out.append(data)
        return out

    def unqueue(self, serial: str) -> None:
        self._json_file("queue", serial).unlink(missing_ok=True)

    def log_provisioned(self, entry: dict[str, Any]) -> None:
        path = self.home / "provisioned.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_fleet_url(url: str) -> str:
    """The fleet URL without a trailing slash; plain ``http`` only to this machine (the
    token and the enrollment answers must not cross a network in clear)."""
    parsed = httpx.URL(url.rstrip("/"))
    if parsed.scheme == "https" and parsed.host:
        return str(parsed)
    if parsed.scheme == "http" and parsed.host in _LOOPBACK:
        return str(parsed)
    raise FleetRefused("refusing fleet URL %r: use https:// (plain http only to this "
                       "machine, e.g. http://127.0.0.1:8000)" % url, 0,
                       "ask your fleet admin for the https address of the fleet API")


def tls_verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    """Certificate checking for the fleet: the system's CAs, or the given bundle only."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise FleetRefused("cannot use %s as the fleet's CA bundle: %s" % (ca_file, e), 0,
                           "give --ca-file a PEM file with the CA that signed the fleet's "
                           "HTTPS certificate") from e


class FleetClient:
    """The fleet API with the technician's token (see the module docstring)."""

    def __init__(self, url: str, token: str, limits: ProvisionLimits = LIMITS,
                 transport: httpx.BaseTransport | None = None,
                 ca_file: Path | None = None) -> None:
        self.url = check_fleet_url(url)
        self._http = httpx.Client(base_url=self.url, timeout=limits.http_timeout_s,
                                  headers={"Authorization": "Bearer %s" % token},
                                  transport=transport, verify=tls_verify(ca_file))
        self.limits = limits

    @classmethod
    def from_workspace(cls, ws: Workspace) -> FleetClient:
        url, token = ws.login()
        return cls(url, token, ca_file=ws.login_ca_file())

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200, 201),
              **kw: Any) -> httpx.Response:
        try:
            res = self._http.request(method, path, **kw)
        except httpx.TimeoutException as e:
            raise FleetUnreachable("the fleet at %s did not answer in %.0f s"
                                   % (self.url, self.limits.http_timeout_s)) from e
        except httpx.TransportError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise FleetUnreachable(
                    "the fleet's HTTPS certificate at %s is not trusted (%s)" % (self.url, e),
                    "if the fleet uses the city's private CA, log in again with "
                    "`cityedge provision login --ca-file CITY-CA.pem`") from e
            raise FleetUnreachable("cannot reach the fleet at %s (%s)" % (self.url, e)) from e
        if res.status_code in ok:
            return res
        detail = _detail(res)
        if res.status_code == 401:
            raise NotLoggedIn("the fleet refused your login token (%s)" % detail,
                              "the token has expired or was revoked: log in again with "
                              "`cityedge provision login` (ask your fleet admin for a token)")
        if res.status_code == 403:
            raise FleetRefused("the fleet refused: %s" % detail, 403,
                               "your role may not do this; ask a fleet admin")
        if res.status_code == 503:  # the fleet is up but a part it needs is not (the broker)
            raise FleetUnreachable("the fleet cannot do this now: %s" % detail,
                                   "run the same command again in a minute")
        raise FleetRefused("the fleet refused %s %s: %s" % (method, path, detail),
                           res.status_code)

    def check_login(self) -> None:
        self._call("GET", "/devices", params={"limit": 1})

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        res = self._call("GET", "/devices/%s" % device_id, ok=(200, 404))
        return None if res.status_code == 404 else _obj(res)

    def register_device(self, body: dict[str, Any]) -> dict[str, Any]:
        return _obj(self._call("POST", "/devices", json=body))

    def update_device(self, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return _obj(self._call("PATCH", "/devices/%s" % device_id, json=body))

    def set_state(self, device_id: str, state: str, reason: str) -> dict[str, Any]:
        return _obj(self._call("POST", "/devices/%s/state" % device_id,
                               json={"state": state, "reason": reason}))

    def credentials(self, device_id: str) -> list[dict[str, Any]]:
        data = self._call("GET", "/devices/%s/credentials" % device_id).json()
        return data if isinstance(data, list) else []

    def revoke_credential(self, device_id: str, serial: str) -> dict[str, Any]:
        return _obj(self._call("POST", "/devices/%s/credentials/%s/revoke"
                               % (device_id, serial)))

    def enrollment_token(self, serial: str, ttl_s: int) -> dict[str, Any]:
        return _obj(self._call("POST", "/enrollment/tokens",
                               json={"serial": serial, "ttl_s": ttl_s}))

    def fleet_keys(self) -> list[str]:
        """The fleet's public command keys (``GET /ca/fleet-keys``: SEC1 points, hex)."""
        keys = _obj(self._call("GET", "/ca/fleet-keys")).get("fleet_keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise FleetRefused("the fleet sent an unexpected list of fleet keys", 200)
        return keys

    def upload_manifest(self, manifest: str, claims: dict[str, str]) -> dict[str, Any]:
        """Allow-list a vendor delivery: ``{serial: SHA-256 hex of its claim secret}``."""
        devices = [{"serial": serial, "claim_sha256": digest}
                   for serial, digest in claims.items()]
        return _obj(self._call("POST", "/enrollment/manifests",
                               json={"manifest": manifest, "devices": devices}))

    def upload_hw_report(self, data: bytes) -> dict[str, Any]:
        """``POST /hw/reports``: a hardware report's JSON bytes, unchanged (a vendor token)."""
        return _obj(self._call("POST", "/hw/reports", content=data,
                               headers={"Content-Type": "application/json"}))

    def enroll(self, serial: str, token: str | None, csr_pem: str,
               claim: str | None = None) -> dict[str, Any]:
        """``POST /enroll`` with a token, or (allow-listed) the device's claim secret."""
        body: dict[str, Any] = {"serial": serial, "csr_pem": csr_pem}
        if token is not None:
            body["token"] = token
        if claim is not None:
            body["claim"] = claim
        return _obj(self._call("POST", "/enroll", json=body))

    def enroll_ticket(self, serial: str, token: str, csr_pem: str,
                      register: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
        """Redeem an offline ticket's token (``/enroll/ticket``): the answer, and True if
        the device had already enrolled itself with it (the same certificate again)."""
        body: dict[str, Any] = {"serial": serial, "token": token, "csr_pem": csr_pem}
        if register is not None:
            body["registration"] = register
        res = self._call("POST", "/enroll/ticket", json=body)
        return _obj(res), res.headers.get("X-Cityedge-Enrollment") == "existing"


def _detail(res: httpx.Response) -> str:
    with contextlib.suppress(ValueError):
        body = res.json()
        if isinstance(body, dict) and "detail" in body:
            detail = body["detail"]
            if isinstance(detail, list):  # a 422: [{"loc": [...], "msg": ..., "type": ...}]
                return "; ".join(
                    "%s: %s" % (".".join(str(p) for p in e.get("loc", [])[1:]) or "request",
                                e.get("msg")) if isinstance(e, dict) else str(e)
                    for e in detail)
            return str(detail)
    return "HTTP %d" % res.status_code


def _obj(res: httpx.Response) -> dict[str, Any]:
    try:
        data = res.json()
    except ValueError as e:
        raise FleetRefused("the fleet sent a reply that is not JSON", res.status_code) from e
    if not isinstance(data, dict):
        raise FleetRefused("the fleet sent an unexpected reply", res.status_code)
    return data
