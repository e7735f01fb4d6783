"""The device configuration file (JSON on flash), checked once at boot with clear errors.

Layout (``main.py`` describes the sections it reads)::

    {"device": "urn:dev:mac:...",              # optional on boards (derived from the MAC)
     "broker": {"host": "mqtt.city.example", "port": 8883, "server_hostname": "..."},
     "tls": {"cert": "/cert.der", "key": "/key.der", "ca": "/ca.der"},
     "fleet_keys": ["/fleet0.pub"],
     "store": {"dir": "/buffer", "state": "/state.cbor"},
     "topic_prefix": "ce/v1",                  # optional; the only prefix the fleet serves
     "wifi": {"ssid": "...", "password": "..."},    # optional: fallback after Ethernet
     "agent": {"sample_interval_s": 10, "batch_readings": 32, "batch_seconds": 300,
               "buffer_budget_bytes": 262144, ...},   # ranges: ``settings.LIMITS``
     "sensors": [{"type": "sht3x", "name": "air", "i2c": 0, "sda": 21, "scl": 22},
                 {"type": "scd4x", "name": "room", "i2c": 0, "sda": 21, "scl": 22},
                 {"type": "ds18b20", "name": "water", "pin": 4, "rom": "28ff..."},
                 {"type": "adc", "name": "noise", "pin": 34, "unit": "dB",
                  "scale": 100.0, "offset": 20.0, "low": 25.0, "high": 110.0}]}

``load(path)`` returns the parsed map with defaults filled in, or raises ``ConfigError``
naming the key and what is wrong. The agent's own settings (intervals, batch size and age,
buffer budget) are range-checked by ``settings.check``: one place for those limits.
"""

import json

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x


from cityedge_core.batch import check_device_id
from cityedge_core.errors import LocalError, MalformedError
from cityedge_core.topics import PREFIX

# Limits as private constants, sensor types spelled where they are checked: every public
# name of a module stays interned on a device's heap after the module is unloaded.
_SENSORS_MAX = const(16)  # sensors on one device
_NAME_MAX_CHARS = const(24)  # characters of a sensor name (it prefixes SenML names of 64)
_CONFIG_MAX_BYTES = const(8192)  # bytes: a larger config file is a mistake, not a config
_PIN_MAX = const(48)  # highest GPIO number on the boards we support (ESP32-S3: 48)
_I2C_FREQ_MAX = const(1000000)  # Hz: I2C fast mode plus


class ConfigError(LocalError):
    """The device configuration is missing, unreadable or invalid (our side, not a peer's)."""


def _fail(name: str, msg: str) -> None:
    raise ConfigError("config: %s: %s" % (name, msg))


def _int(obj: dict, key: str, name: str, start: int, end: int, default: object = None) -> None:
    v = obj.get(key, default)
    if v is None and default is None and key not in obj:
        _fail(name, "%s is required" % key)
    if not isinstance(v, int) or isinstance(v, bool) or v < start or v > end:
        _fail(name, "%s=%r must be an integer in %d..%d" % (key, v, start, end))
    obj[key] = v


def _str(obj: dict, key: str, name: str, required: bool = True) -> None:
    if key not in obj:
        if required:
            _fail(name, "%s is required" % key)
        return
    if not isinstance(obj[key], str) or not obj[key]:
        _fail(name, "%s must be a non-empty string" % key)


def _number(obj: dict, key: str, name: str) -> None:
    v = obj.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        _fail(name, "%s=%r must be a number" % (key, v))


def _map(cfg: dict, key: str, required: bool) -> dict:
    v = cfg.get(key)
    if v is None:
        if required:
            _fail(key, "section is required")
        v = {}
        cfg[key] = v
    if not isinstance(v, dict):
        _fail(key, "must be a map")
    return v


def check_sensor(s: object, i: int) -> dict:
    where = "sensors[%d]" % i
    if not isinstance(s, dict):
        _fail(where, "must be a map")
    kind = s.get("type")
    types = ("sht3x", "scd4x", "ds18b20", "adc")  # the first two on I2C
    if kind not in types:
        _fail(where, "type=%r is not one of %s" % (kind, ", ".join(types)))
    _str(s, "name", where)
    name = s["name"]
    if len(name) > _NAME_MAX_CHARS or name.strip("abcdefghijklmnopqrstuvwxyz0123456789-_"):
        _fail(where, "name %r: at most %d of a-z 0-9 - _" % (name, _NAME_MAX_CHARS))
    if kind in types[:2]:
        _int(s, "i2c", where, 0, 1, 0)
        _int(s, "sda", where, 0, _PIN_MAX)
        _int(s, "scl", where, 0, _PIN_MAX)
        _int(s, "freq", where, 10000, _I2C_FREQ_MAX, 100000)
        _int(s, "address", where, 0x08, 0x77, 0x44 if kind == "sht3x" else 0x62)
    else:
        _int(s, "pin", where, 0, _PIN_MAX)
    if kind == "ds18b20" and "rom" in s:
        rom = s["rom"]
        if (
            not isinstance(rom, str)
            or len(rom) != 16
            or any(c not in "0123456789abcdef" for c in rom.lower())
        ):
            _fail(where, "rom must be 16 hex digits (the 64-bit ROM code)")
    if kind == "adc":
        _str(s, "unit", where)
        for key in ("scale", "offset", "low", "high"):
            _number(s, key, where)
    return s


def check_agent(cfg: dict) -> dict:
    """The ``agent`` section checked and completed by ``settings.check`` (the one place of
    the agent's limits; ``main.build`` calls it after the TLS context exists, ``validate``
    by default)."""
    from . import settings  # loaded here, not at import: see above

    try:
        cfg["agent"] = settings.check(cfg.get("agent") or {})
    except ValueError as e:
        _fail("agent", str(e))
    return cfg


def validate(cfg: object, agent: bool = True) -> dict:
    """Check a parsed configuration map; returns it with defaults filled in. With
    ``agent=False`` the ``agent`` section is left for ``check_agent``."""
    if not isinstance(cfg, dict):
        _fail("top level", "must be a JSON object")
    if "device" in cfg:
        try:
            check_device_id(cfg["device"])
        except MalformedError as e:
            _fail("device", str(e))
    broker = _map(cfg, "broker", True)
    _str(broker, "host", "broker")
    _int(broker, "port", "broker", 1, 65535, 8883)
    _str(broker, "server_hostname", "broker", False)
    tls = _map(cfg, "tls", True)
    for key in ("cert", "key", "ca"):
        _str(tls, key, "tls")
    store = _map(cfg, "store", False)
    store.setdefault("dir", "/buffer")
    store.setdefault("state", "/state.cbor")
    _str(store, "dir", "store")
    _str(store, "state", "store")
    keys = cfg.setdefault("fleet_keys", [])
    if not isinstance(keys, list) or any(not isinstance(k, str) for k in keys):
        _fail("fleet_keys", "must be a list of file paths")
    # The device publishes and subscribes under ``topic_prefix`` (``main.build``), but the
    # fleet's broker rules, ingest and commands serve the core's prefix only: a device
    # under another would have its batches acknowledged by the broker and dropped.
    if cfg.setdefault("topic_prefix", PREFIX) != PREFIX:
        _fail("topic_prefix", "must be %r (cityedge_core.topics.PREFIX): the fleet serves "
              "no other prefix, a device under another would publish into nothing" % PREFIX)
    if "wifi" in cfg:
        wifi = _map(cfg, "wifi", False)
        _str(wifi, "ssid", "wifi")
        if not isinstance(wifi.get("password", ""), str):
            _fail("wifi", "password must be a string")
    _map(cfg, "agent", False)
    if agent:
        check_agent(cfg)
    sensors = cfg.setdefault("sensors", [])
    if not isinstance(sensors, list) or len(sensors) > _SENSORS_MAX:
        _fail("sensors", "must be a list of at most %d sensors" % _SENSORS_MAX)
    names = []
    for i in range(len(sensors)):
        check_sensor(sensors[i], i)
        if sensors[i]["name"] in names:
            _fail("sensors[%d]" % i, "name %r used twice" % sensors[i]["name"])
        names.append(sensors[i]["name"])
    return cfg


def load(path: str, agent: bool = True) -> dict:
    """Read and check the configuration file at ``path`` (``agent``: see ``validate``).

    The size is checked first (``os.stat``) and the JSON parsed from the open file
    (``json.load``: MicroPython reads it as it parses), so no buffer of the file's size --
    let alone of the largest size allowed -- is taken from a board's heap."""
    import os

    try:
        if os.stat(path)[6] > _CONFIG_MAX_BYTES:
            raise ConfigError("config: %s is larger than %d bytes" % (path, _CONFIG_MAX_BYTES))
        with open(path, "rb") as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConfigError("config: cannot read %s: %s" % (path, e)) from None
    except ValueError as e:
        raise ConfigError("config: %s is not valid JSON: %s" % (path, e)) from None
    return validate(cfg, agent)
