"""The gateway's TOML configuration, checked completely at start.

``load_config(path)`` parses the file with ``tomllib`` and validates every field. All
mistakes are collected and raised together as one ``ConfigError`` whose message has a line
per mistake: the key path, what is wrong, and what to do. The layout (see
``gateway/gateway.example.toml``)::

    [gateway]   device, key_file, identity_dir, batch_readings, batch_max_age_s,
                fleet_keys, root_cert
    [store]     path, budget_bytes
    [broker]    host, port, ca_file, cert_file, key_file, keepalive_s, inflight
    [node_link] the same keys, for the site's local broker the nodes publish to
    [metrics]   port (127.0.0.1 only)
    [update]    root, trial_deadline_s, trial_max_starts (the update installer: ``ota_*``);
                release_roots, hw_class, ca_file, build: the fleet's ``update`` command;
                download_deadline_s, download_attempts, download_backoff_max_s: the
                artifact download's retries
    [[serial]]  name, port, protocol = "sds011" | "modbus", baud, parity,
                modbus only: poll_interval_s, timeout_s, max_registers, and either one slave
                (unit, [[serial.registers]]) or several ([[serial.slaves]]: name, unit,
                max_registers, registers); a register: name, address, unit, table,
                type, order, scale, offset (words/signed: the older spelling of type)
    [[nodes]]   device, public_key (PEM file of the node's ES256 key)

Relative file paths are resolved against the config file's directory.

With ``identity_dir`` the gateway's identity (one key for TLS and for signing, and its
certificate) lives in two key slots there (``key_slots``) and can be rotated by the fleet.
On the first start the slots are seeded from ``[broker] cert_file`` and ``key_file`` (and
``[gateway] key_file``, if given, must be that same key); from then on those files are
not needed (the key file is removed once a slot holds it), so they need to exist only
while ``identity_dir`` has no identity yet.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cityedge_core.batch import check_device_id
from cityedge_core.errors import MalformedError
from cityedge_host.errors import UserError

from . import limits
from .key_slots import CURRENT
from .modbus import ORDERS, TABLES, TYPES, Register

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


class ConfigError(UserError, ValueError):
    """The configuration file is wrong; the message lists every mistake found."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(
            "%s has %d problem%s:\n  %s"
            % (path, len(problems), "" if len(problems) == 1 else "s", "\n  ".join(problems))
        )


@dataclass(frozen=True)
class SlaveConfig:
    """One Modbus slave on a port. Its readings are ``<port name>/<name>/<register>``;
    the single-slave form (``unit`` and ``registers`` on the port) has no name and its
    readings are ``<port name>/<register>``."""

    name: str
    unit: int
    registers: tuple[Register, ...]
    max_registers: int = limits.MODBUS_MAX_REGISTERS  # per request; split longer reads


@dataclass(frozen=True)
class SerialConfig:
    name: str
    port: str
    protocol: str
    baud: int
    unit: int = 0  # the single-slave form
    poll_interval_s: float = 10.0
    registers: tuple[Register, ...] = ()  # the single-slave form
    slaves: tuple[SlaveConfig, ...] = ()  # several slaves on the bus
    parity: str = "none"
    max_registers: int = limits.MODBUS_MAX_REGISTERS
    timeout_s: float = limits.MODBUS_RESPONSE_TIMEOUT_S  # an answer's wait, besides the wire

    def modbus_slaves(self) -> tuple[SlaveConfig, ...]:
        """The slaves polled on this port, in turn (one for the single-slave form)."""
        if self.slaves:
            return self.slaves
        if self.registers:
            return (SlaveConfig("", self.unit, self.registers, self.max_registers),)
        return ()


@dataclass(frozen=True)
class NodeConfig:
    device: str
    public_key: Path


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    keepalive_s: int = limits.MQTT_KEEPALIVE_S
    inflight: int = 64


BUILDS = ("venv", "copy")  # [update] build


@dataclass(frozen=True)
class UpdateConfig:
    """Where releases are installed and how a release in trial proves its health."""

    root: Path  # releases/, current, previous, state.json (``ota_install``)
    trial_deadline_s: float = limits.OTA_TRIAL_DEADLINE_DEFAULT_S
    trial_max_starts: int = limits.OTA_TRIAL_MAX_STARTS_DEFAULT
    # the fleet's signed ``update`` command (``ota_command``): the offline root set the
    # release keys are certified by (JSON, ``cityedge release``), this gateway's hardware
    # class, the CA the artifact server's certificate is checked against (None: the
    # broker's ca_file); None roots: the command is refused (updates by hand only)
    release_roots: Path | None = None
    hw_class: str = ""
    ca_file: Path | None = None
    # how a release is laid down: "venv" (pip install of the artifact's wheels/) or
    # "copy" (the artifact's tree is the release as it is: built elsewhere for the Pi)
    build: str = "venv"
    # the artifact's download (``ota_download``): its whole time, retries included; the
    # failed requests in a row it gives up after; the longest wait between two requests
    download_deadline_s: float = limits.OTA_DOWNLOAD_DEADLINE_S
    download_attempts: int = limits.OTA_DOWNLOAD_ATTEMPTS_DEFAULT
    download_backoff_max_s: float = limits.OTA_RETRY_MAX_DEFAULT_S


@dataclass(frozen=True)
class GatewayConfig:
    device: str
    key_file: Path
    store_path: Path
    budget_bytes: int = limits.STORE_BUDGET_DEFAULT_BYTES
    batch_readings: int = limits.BATCH_READINGS_DEFAULT
    batch_max_age_s: float = limits.BATCH_MAX_AGE_DEFAULT_S
    broker: BrokerConfig | None = None
    node_link: BrokerConfig | None = None  # the site's local broker the nodes publish to
    metrics_port: int = 0  # 0: no metrics endpoint
    serial: tuple[SerialConfig, ...] = ()
    nodes: tuple[NodeConfig, ...] = field(default_factory=tuple)
    # the fleet's command keys this gateway obeys (its trust store); none: not commandable
    fleet_keys: tuple[Path, ...] = ()
    # the key slots (``key_slots``); None: the key files above, no rotation
    identity_dir: Path | None = None
    # the update installer's root and the trial's bounds; None: no updates
    update: UpdateConfig | None = None
    # the fleet's offline root certificate (PEM): checks trust statements, which replace
    # ``fleet_keys`` (``cityedge_host.fleet_trust``); None: the fleet keys never change
    root_cert: Path | None = None


class _Checker:
    """Reads typed values out of nested tables, recording a problem instead of raising."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[str] = []

    def bad(self, where: str, what: str) -> None:
        self.problems.append("%s: %s" % (where, what))

    def table(self, doc: dict[str, Any], key: str, required: bool = True) -> dict[str, Any]:
        val = doc.get(key)
        if val is None:
            if required:
                self.bad("[%s]" % key, "missing; add the section (see gateway.example.toml)")
            return {}
        if not isinstance(val, dict):
            self.bad(key, "must be a table [%s]" % key)
            return {}
        return val

    def unknown(self, where: str, tbl: dict[str, Any], known: set[str]) -> None:
        for key in sorted(set(tbl) - known):
            self.bad(
                "%s.%s" % (where, key),
                "unknown key; check the spelling (known: %s)" % ", ".join(sorted(known)),
            )

    def text(self, where: str, tbl: dict[str, Any], key: str, default: str | None = None) -> str:
        val = tbl.get(key, default)
        if val is None:
            self.bad("%s.%s" % (where, key), "missing; it is required")
            return ""
        if not isinstance(val, str) or not val:
            self.bad("%s.%s" % (where, key), "must be a non-empty string, got %r" % (val,))
            return ""
        return val

    def number(
        self,
        where: str,
        tbl: dict[str, Any],
        key: str,
        default: float | None,
        lo: float,
        hi: float,
        unit: str,
        integer: bool = False,
    ) -> Any:
        val = tbl.get(key, default)
        path = "%s.%s" % (where, key)
        if val is None:
            self.bad(path, "missing; give a value in %s between %s and %s" % (unit, lo, hi))
            return lo
        ok_type = isinstance(val, int) if integer else isinstance(val, int | float)
        if isinstance(val, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            self.bad(path, "must be %s (%s), got %r" % (kind, unit, val))
            return lo
        if not lo <= val <= hi:
            self.bad(path, "%r is out of range; use %s..%s %s" % (val, lo, hi, unit))
            return lo
        return val

    def path(self, where: str, tbl: dict[str, Any], key: str, must_exist: bool = True) -> Path:
        text = self.text(where, tbl, key)
        if not text:
            return Path()
        p = Path(text)
        if not p.is_absolute():
            p = self.base / p
        if must_exist and not p.is_file():
            self.bad("%s.%s" % (where, key), "file %s does not exist; fix the path" % p)
        return p

    def device(self, where: str, tbl: dict[str, Any], key: str = "device") -> str:
        dev = self.text(where, tbl, key)
        if dev:
            try:
                check_device_id(dev)
            except MalformedError as e:
                self.bad("%s.%s" % (where, key), "%s; use e.g. urn:dev:mac:0024befffe804ff1" % e)
        return dev


_TYPE_NAMES = '"u16", "s16", "u32", "s32" or "f32"'


def _register_type(c: _Checker, w: str, r: dict[str, Any]) -> tuple[str, str]:
    """``type`` and ``order``; ``words``/``signed`` (the older keys) map to a type."""
    if "type" in r:
        type_ = r["type"]
        if "words" in r or "signed" in r:
            c.bad(w, 'type and words/signed both given; use type alone '
                  '(words = 2, signed = true is type = "s32")')
        if type_ not in TYPES:
            c.bad(w + ".type", "%r is not a value type; use %s" % (type_, _TYPE_NAMES))
            type_ = "u16"
    else:
        signed = r.get("signed", False)
        if not isinstance(signed, bool):
            c.bad(w + ".signed", "must be true or false")
            signed = False
        words = c.number(w, r, "words", 1, 1, 2, "registers", True)
        type_ = ("s" if signed else "u") + ("16" if words == 1 else "32")
    order = r.get("order", "ABCD")
    if order not in ORDERS:
        c.bad(w + ".order", '%r is not a byte order; use "ABCD" (big-endian), "CDAB" '
              '(words swapped), "BADC" (bytes swapped) or "DCBA" (little-endian)' % (order,))
        order = "ABCD"
    elif "order" in r and TYPES[type_] == 1:
        c.bad(w + ".order", "applies to the two-register types (u32, s32, f32) only; "
              "remove it")
        order = "ABCD"
    return type_, order


def _registers(c: _Checker, where: str, items: Any) -> tuple[Register, ...]:
    if not isinstance(items, list) or not items:
        c.bad(where, "a modbus slave needs at least one register (registers = [...])")
        return ()
    if len(items) > limits.MODBUS_VALUES_MAX:
        c.bad(where, "%d registers; at most %d per slave" % (len(items), limits.MODBUS_VALUES_MAX))
        return ()
    out = []
    names: set[str] = set()
    for i, r in enumerate(items):
        w = "%s[%d]" % (where, i)
        if not isinstance(r, dict):
            c.bad(w, "must be a table")
            continue
        known = {"name", "address", "unit", "table", "type", "order", "words", "signed",
                 "scale", "offset"}
        c.unknown(w, r, known)
        name = c.text(w, r, "name")
        if name and not set(name) <= _NAME_CHARS:
            c.bad(w + ".name", "use lowercase letters, digits, - and _ only")
        if name in names:
            c.bad(w + ".name", "%r is used twice; names must be unique per slave" % name)
        names.add(name)
        table = r.get("table", "holding")
        if table not in TABLES:
            c.bad(w + ".table", '%r is not a register table; use "holding" (function 3) or '
                  '"input" (function 4)' % (table,))
            table = "holding"
        type_, order = _register_type(c, w, r)
        address = c.number(w, r, "address", None, 0, 0xFFFF, "register number", True)
        if address + TYPES[type_] - 1 > 0xFFFF:
            c.bad(w + ".address", "a %s at %d runs past register 65535" % (type_, address))
            address = 0
        out.append(
            Register(
                name=name,
                address=address,
                unit=c.text(w, r, "unit"),
                type=type_,
                order=order,
                table=table,
                scale=float(c.number(w, r, "scale", 1.0, -1e9, 1e9, "")),
                offset=float(c.number(w, r, "offset", 0.0, -1e9, 1e9, "")),
            )
        )
    return tuple(out)


def _max_registers(c: _Checker, w: str, tbl: dict[str, Any], default: int) -> int:
    n: int = c.number(w, tbl, "max_registers", default, 2, limits.MODBUS_MAX_REGISTERS,
                      "registers per request", True)
    return n


def _slaves(c: _Checker, where: str, items: Any, max_registers: int
            ) -> tuple[SlaveConfig, ...]:
    if not isinstance(items, list) or not items:
        c.bad(where, "must be a non-empty array of tables [[serial.slaves]]")
        return ()
    if len(items) > limits.MODBUS_SLAVES_MAX:
        c.bad(where, "%d slaves; at most %d on one port" % (len(items), limits.MODBUS_SLAVES_MAX))
        return ()
    out = []
    names: dict[str, int] = {}
    units: dict[int, int] = {}
    for i, sl in enumerate(items):
        w = "%s[%d]" % (where, i)
        if not isinstance(sl, dict):
            c.bad(w, "must be a table")
            continue
        c.unknown(w, sl, {"name", "unit", "max_registers", "registers"})
        name = c.text(w, sl, "name")
        if name and not set(name) <= _NAME_CHARS:
            c.bad(w + ".name", "%r: use lowercase letters, digits, - and _ only" % name)
        elif name in names:
            c.bad(w + ".name", "%r is used by %s[%d]; names must be unique on a port"
                  % (name, where, names[name]))
        names.setdefault(name, i)
        unit = c.number(w, sl, "unit", None, 1, 247, "slave address", True)
        if "unit" in sl and unit in units:
            c.bad(w + ".unit", "%d is the address of %s[%d]; each slave on a bus needs its own"
                  % (unit, where, units[unit]))
        units.setdefault(unit, i)
        out.append(SlaveConfig(
            name=name,
            unit=unit,
            registers=_registers(c, w + ".registers", sl.get("registers")),
            max_registers=_max_registers(c, w, sl, max_registers),
        ))
    return tuple(out)


_PARITIES = ("none", "even", "odd")
_MODBUS_ONLY = ("unit", "registers", "slaves", "max_registers", "poll_interval_s",
                "timeout_s")


def _serial(c: _Checker, items: Any) -> tuple[SerialConfig, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        c.bad("serial", "must be an array of tables [[serial]]")
        return ()
    out = []
    names: set[str] = set()
    for i, s in enumerate(items):
        w = "serial[%d]" % i
        if not isinstance(s, dict):
            c.bad(w, "must be a table")
            continue
        known = {"name", "port", "protocol", "baud", "parity", *_MODBUS_ONLY}
        c.unknown(w, s, known)
        name = c.text(w, s, "name")
        if name and not set(name) <= _NAME_CHARS:
            c.bad(w + ".name", "%r: use lowercase letters, digits, - and _ only" % name)
        if name in names:
            c.bad(w + ".name", "%r is used twice; names must be unique" % name)
        names.add(name)
        protocol = c.text(w, s, "protocol")
        if protocol and protocol not in ("sds011", "modbus"):
            c.bad(w + ".protocol", '%r is not supported; use "sds011" or "modbus"' % protocol)
        baud = s.get("baud", 9600)
        if baud not in limits.BAUD_RATES:
            rates = ", ".join(str(b) for b in limits.BAUD_RATES)
            c.bad(w + ".baud", "%r is not a standard rate; use one of %s" % (baud, rates))
        parity = s.get("parity", "none")
        if parity not in _PARITIES:
            c.bad(w + ".parity", '%r is not a parity; use "none", "even" (the Modbus '
                  'default) or "odd"' % (parity,))
            parity = "none"
        cfg = SerialConfig(name=name, port=c.text(w, s, "port"), protocol=protocol, baud=baud,
                           parity=parity)
        if protocol == "modbus":
            max_registers = _max_registers(c, w, s, limits.MODBUS_MAX_REGISTERS)
            poll = float(
                c.number(w, s, "poll_interval_s", 10.0, limits.MODBUS_POLL_MIN_S, 86400, "s"))
            lo, hi = limits.MODBUS_TIMEOUT_RANGE_S
            timeout = float(c.number(w, s, "timeout_s", limits.MODBUS_RESPONSE_TIMEOUT_S,
                                     lo, hi, "s"))
            if "slaves" in s:
                if "unit" in s or "registers" in s:
                    c.bad(w, "give either unit + registers (one slave) or [[serial.slaves]] "
                          "(several), not both")
                cfg = SerialConfig(
                    name=name, port=cfg.port, protocol=protocol, baud=baud, parity=parity,
                    poll_interval_s=poll, max_registers=max_registers, timeout_s=timeout,
                    slaves=_slaves(c, w + ".slaves", s["slaves"], max_registers),
                )
            else:
                cfg = SerialConfig(
                    name=name, port=cfg.port, protocol=protocol, baud=baud, parity=parity,
                    poll_interval_s=poll, max_registers=max_registers, timeout_s=timeout,
                    unit=c.number(w, s, "unit", None, 1, 247, "slave address", True),
                    registers=_registers(c, w + ".registers", s.get("registers")),
                )
        elif any(k in s for k in _MODBUS_ONLY):
            c.bad(w, '%s apply to protocol = "modbus" only; remove them'
                  % ", ".join(k for k in _MODBUS_ONLY if k in s))
        out.append(cfg)
    return tuple(out)


def _nodes(c: _Checker, items: Any) -> tuple[NodeConfig, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        c.bad("nodes", "must be an array of tables [[nodes]]")
        return ()
    if len(items) > limits.NODES_MAX:
        c.bad("nodes", "%d nodes; at most %d per gateway" % (len(items), limits.NODES_MAX))
    out = []
    seen: set[str] = set()
    for i, n in enumerate(items):
        w = "nodes[%d]" % i
        if not isinstance(n, dict):
            c.bad(w, "must be a table")
            continue
        c.unknown(w, n, {"device", "public_key"})
        dev = c.device(w, n)
        if dev in seen:
            c.bad(w + ".device", "%s is listed twice" % dev)
        seen.add(dev)
        out.append(NodeConfig(dev, c.path(w, n, "public_key")))
    return tuple(out)


def _fleet_keys(c: _Checker, g: dict[str, Any]) -> tuple[Path, ...]:
    items = g.get("fleet_keys", [])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        c.bad("gateway.fleet_keys", "must be a list of key file paths")
        return ()
    if len(items) > limits.FLEET_KEYS_MAX:
        c.bad("gateway.fleet_keys", "%d keys; at most %d" % (len(items), limits.FLEET_KEYS_MAX))
        return ()
    return tuple(c.path("gateway", {"fleet_keys[%d]" % n: item}, "fleet_keys[%d]" % n)
                 for n, item in enumerate(items))


def _has_nodes(doc: dict[str, Any]) -> bool:
    return bool(doc.get("nodes"))


def _broker(c: _Checker, doc: dict[str, Any], name: str,
            identity_exists: bool = True) -> BrokerConfig | None:
    b = c.table(doc, name, required=False)
    if not b:
        return None
    known = {"host", "port", "ca_file", "cert_file", "key_file", "keepalive_s", "inflight"}
    c.unknown(name, b, known)
    return BrokerConfig(
        host=c.text(name, b, "host"),
        port=c.number(name, b, "port", 8883, 1, 65535, "TCP port", True),
        ca_file=c.path(name, b, "ca_file"),
        cert_file=c.path(name, b, "cert_file", must_exist=identity_exists),
        key_file=c.path(name, b, "key_file", must_exist=identity_exists),
        keepalive_s=c.number(name, b, "keepalive_s", limits.MQTT_KEEPALIVE_S, 5, 3600, "s", True),
        inflight=c.number(name, b, "inflight", 64, 1, limits.MQTT_INFLIGHT_MAX, "messages", True),
    )


def _update(c: _Checker, doc: dict[str, Any]) -> UpdateConfig | None:
    u = c.table(doc, "update", required=False)
    if not u:
        return None
    c.unknown("update", u, {"root", "trial_deadline_s", "trial_max_starts", "release_roots",
                            "hw_class", "ca_file", "build", "download_deadline_s",
                            "download_attempts", "download_backoff_max_s"})
    root = c.path("update", u, "root", must_exist=False)
    if root != Path() and not root.is_dir():
        c.bad("update.root", "directory %s does not exist; create it (it holds releases/, "
              "current and previous)" % root)
    lo, hi = limits.OTA_TRIAL_DEADLINE_RANGE_S
    deadline = c.number("update", u, "trial_deadline_s", limits.OTA_TRIAL_DEADLINE_DEFAULT_S,
                        lo, hi, "s")
    lo_n, hi_n = limits.OTA_TRIAL_MAX_STARTS_RANGE
    starts = c.number("update", u, "trial_max_starts", limits.OTA_TRIAL_MAX_STARTS_DEFAULT,
                      lo_n, hi_n, "starts", True)
    roots = c.path("update", u, "release_roots") if "release_roots" in u else None
    hw_class = c.text("update", u, "hw_class") if roots is not None else ""
    if roots is None and "hw_class" in u:
        c.bad("update.hw_class", "applies with release_roots (the fleet's update command) "
              "only; add release_roots or remove hw_class")
    ca_file = c.path("update", u, "ca_file") if "ca_file" in u else None
    build = u.get("build", "venv")
    if build not in BUILDS:
        c.bad("update.build", '%r is not a way to build a release; use "venv" (pip '
              'installs the wheels/ of the artifact) or "copy" (the artifact is the release)'
              % (build,))
        build = "venv"
    lo, hi = limits.OTA_DOWNLOAD_DEADLINE_RANGE_S
    dl_deadline = c.number("update", u, "download_deadline_s", limits.OTA_DOWNLOAD_DEADLINE_S,
                           lo, hi, "s")
    lo_n, hi_n = limits.OTA_DOWNLOAD_ATTEMPTS_RANGE
    attempts = c.number("update", u, "download_attempts", limits.OTA_DOWNLOAD_ATTEMPTS_DEFAULT,
                        lo_n, hi_n, "requests", True)
    lo, hi = limits.OTA_RETRY_MAX_RANGE_S
    backoff_max = c.number("update", u, "download_backoff_max_s",
                           limits.OTA_RETRY_MAX_DEFAULT_S, lo, hi, "s")
    return UpdateConfig(root=root, trial_deadline_s=float(deadline), trial_max_starts=starts,
                        release_roots=roots, hw_class=hw_class, ca_file=ca_file, build=build,
                        download_deadline_s=float(dl_deadline), download_attempts=attempts,
                        download_backoff_max_s=float(backoff_max))


def parse_config(doc: dict[str, Any], base: Path, source: Path) -> GatewayConfig:
    c = _Checker(base)
    c.unknown(
        "(top level)",
        doc,
        {"gateway", "store", "broker", "node_link", "metrics", "serial", "nodes", "update"},
    )
    g = c.table(doc, "gateway")
    c.unknown("gateway", g, {"device", "key_file", "batch_readings", "batch_max_age_s",
                             "fleet_keys", "identity_dir", "root_cert"})
    st = c.table(doc, "store")
    c.unknown("store", st, {"path", "budget_bytes"})
    device = c.device("gateway", g)
    identity_dir: Path | None = None
    if "identity_dir" in g:
        identity_dir = c.path("gateway", g, "identity_dir", must_exist=False)
        if identity_dir != Path() and not identity_dir.parent.is_dir():
            c.bad("gateway.identity_dir", "directory %s does not exist; create it"
                  % identity_dir.parent)
        if not isinstance(doc.get("broker"), dict):
            c.bad("gateway.identity_dir", "needs [broker]: its cert_file and key_file "
                  "are the initial identity")
    # with key slots holding an identity, the initial key files may be gone (moved)
    seeded = identity_dir is not None and (identity_dir / CURRENT).is_file()
    if identity_dir is not None and "key_file" not in g:
        key_file = Path()  # the broker's key_file (set below)
    else:
        key_file = c.path("gateway", g, "key_file", must_exist=not seeded)
    fleet_keys = _fleet_keys(c, g)
    root_cert = c.path("gateway", g, "root_cert") if "root_cert" in g else None
    if root_cert is not None and not fleet_keys:
        c.bad("gateway.root_cert", "checks updates of fleet_keys, and none are set; add "
              "fleet_keys or remove root_cert")
    batch_readings = c.number(
        "gateway", g, "batch_readings", limits.BATCH_READINGS_DEFAULT,
        1, limits.BATCH_READINGS_MAX, "readings", True,
    )  # fmt: skip
    batch_max_age_s = c.number(
        "gateway", g, "batch_max_age_s", limits.BATCH_MAX_AGE_DEFAULT_S,
        0.01, limits.BATCH_MAX_AGE_MAX_S, "s",
    )  # fmt: skip
    store_path = c.path("store", st, "path", must_exist=False)
    if store_path != Path() and not store_path.parent.is_dir():
        c.bad("store.path", "directory %s does not exist; create it" % store_path.parent)
    budget = c.number(
        "store", st, "budget_bytes", limits.STORE_BUDGET_DEFAULT_BYTES,
        limits.STORE_BUDGET_MIN_BYTES, 2**48, "bytes", True,
    )  # fmt: skip
    broker = _broker(c, doc, "broker", identity_exists=not seeded)
    if identity_dir is not None and broker is not None and key_file == Path():
        key_file = broker.key_file
    node_link = _broker(c, doc, "node_link")
    if node_link is not None and not _has_nodes(doc):
        c.bad("node_link", "no [[nodes]] are configured; add them or remove [node_link]")
    m = c.table(doc, "metrics", required=False)
    c.unknown("metrics", m, {"port"})
    metrics_port = c.number("metrics", m, "port", 0, 0, 65535, "TCP port", True)
    cfg = GatewayConfig(
        device=device,
        key_file=key_file,
        store_path=store_path,
        budget_bytes=budget,
        batch_readings=batch_readings,
        batch_max_age_s=float(batch_max_age_s),
        broker=broker,
        node_link=node_link,
        metrics_port=metrics_port,
        serial=_serial(c, doc.get("serial")),
        nodes=_nodes(c, doc.get("nodes")),
        fleet_keys=fleet_keys,
        identity_dir=identity_dir,
        update=_update(c, doc),
        root_cert=root_cert,
    )
    if c.problems:
        raise ConfigError(source, c.problems)
    return cfg


def load_config(path: Path) -> GatewayConfig:
    """Read and validate ``path``; raises ``ConfigError`` listing every mistake."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, ["cannot read the file: %s" % e.strerror]) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, ["not valid TOML: %s" % e]) from e
    return parse_config(doc, path.resolve().parent, path)
