"""Config validation: a good file loads; each mistake is reported with path and remedy."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityedge_gateway.config import ConfigError, load_config

GOOD = """
[gateway]
device = "urn:dev:mac:0024befffe804ff1"
key_file = "gw.key"
batch_readings = 50

[store]
path = "buffer.sqlite"
budget_bytes = 1_000_000

[metrics]
port = 9108

[[serial]]
name = "pm-north"
port = "/dev/ttyUSB0"
protocol = "sds011"

[[serial]]
name = "env"
port = "/dev/ttyUSB1"
protocol = "modbus"
baud = 19200
unit = 3
poll_interval_s = 5
registers = [
  { name = "temp", address = 0, unit = "Cel", signed = true, scale = 0.1 },
  { name = "rh", address = 1, unit = "%RH", scale = 0.1 },
]

[[nodes]]
device = "urn:dev:mac:0024befffe804ff2"
public_key = "node.pem"
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "gw.key").write_text("x")
    (tmp_path / "node.pem").write_text("x")
    p = tmp_path / "gateway.toml"
    p.write_text(text)
    return p


def test_good_config_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.device == "urn:dev:mac:0024befffe804ff1"
    assert cfg.key_file == tmp_path / "gw.key"
    assert cfg.store_path == tmp_path / "buffer.sqlite"
    assert cfg.budget_bytes == 1_000_000
    assert [s.protocol for s in cfg.serial] == ["sds011", "modbus"]
    assert cfg.serial[1].registers[0].type == "s16" and cfg.serial[1].unit == 3  # signed = true
    assert cfg.nodes[0].public_key == tmp_path / "node.pem"
    assert cfg.broker is None and cfg.metrics_port == 9108


def test_example_config_in_repo_is_valid_apart_from_missing_files() -> None:
    example = Path(__file__).parents[2] / "gateway" / "gateway.example.toml"
    with pytest.raises(ConfigError) as e:
        load_config(example)
    # Only paths to files that exist on a real gateway may be reported.
    assert all("does not exist" in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(
    ("old", "new", "where", "what"),
    [
        ('device = "urn:dev:mac:0024befffe804ff1"', 'device = "gw1"', "gateway.device", "urn:dev"),
        ('key_file = "gw.key"', 'key_file = "nope.key"', "gateway.key_file", "does not exist"),
        ("batch_readings = 50", "batch_readings = 0", "gateway.batch_readings", "out of range"),
        ("batch_readings = 50", 'batch_readings = "50"', "gateway.batch_readings", "integer"),
        ("budget_bytes = 1_000_000", "budget_bytes = 10", "store.budget_bytes", "out of range"),
        ('protocol = "sds011"', 'protocol = "pms5003"', "serial[0].protocol", "not supported"),
        ("baud = 19200", "baud = 12345", "serial[1].baud", "standard rate"),
        ("unit = 3\n", "unit = 300\n", "serial[1].unit", "out of range"),
        ('name = "env"', 'name = "pm-north"', "serial[1].name", "used twice"),
        ("[metrics]", "[metrix]", "(top level).metrix", "unknown key"),
        ("batch_readings = 50", "batch_reading = 50", "gateway.batch_reading", "spelling"),
        ('path = "buffer.sqlite"', 'path = "no/dir/b.sqlite"', "store.path", "create it"),
    ],
)
def test_each_mistake_is_named(tmp_path: Path, old: str, new: str, where: str, what: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, GOOD.replace(old, new, 1)))
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(where + ":")
    assert what in e.value.problems[0]


def test_several_mistakes_all_reported_and_bad_toml(tmp_path: Path) -> None:
    text = GOOD.replace("batch_readings = 50", "batch_readings = 999").replace(
        "budget_bytes = 1_000_000", "budget_bytes = -1"
    )
    with pytest.raises(ConfigError, match="2 problems"):
        load_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[gateway\n"))
    with pytest.raises(ConfigError, match=r"\[gateway\]: missing"):
        load_config(_write(tmp_path, ""))


def test_fleet_keys_are_a_short_list_of_existing_files(tmp_path: Path) -> None:
    (tmp_path / "fleet0.pub").write_text("x")
    good = GOOD.replace('batch_readings = 50', 'batch_readings = 50\nfleet_keys = ["fleet0.pub"]')
    assert load_config(_write(tmp_path, good)).fleet_keys == (tmp_path / "fleet0.pub",)
    missing = GOOD.replace('batch_readings = 50',
                           'batch_readings = 50\nfleet_keys = ["fleet0.pub", "gone.pub"]')
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, missing))
    assert "gateway.fleet_keys[1]" in str(e.value) and "gone.pub" in str(e.value)
    for bad in ("fleet_keys = \"fleet0.pub\"", "fleet_keys = [\"f\"]"):
        text = GOOD.replace('batch_readings = 50', 'batch_readings = 50\n' + bad)
        with pytest.raises(ConfigError) as e:
            load_config(_write(tmp_path, text))
        assert "gateway.fleet_keys" in str(e.value)
    many = 'fleet_keys = [%s]' % ", ".join(['"fleet0.pub"'] * 5)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, GOOD.replace('batch_readings = 50',
                                                  'batch_readings = 50\n' + many)))
    assert "at most 4" in str(e.value)


def test_root_cert_is_an_existing_file_beside_fleet_keys(tmp_path: Path) -> None:
    (tmp_path / "fleet0.pub").write_text("x")
    (tmp_path / "root.crt").write_text("x")
    keys = 'batch_readings = 50\nfleet_keys = ["fleet0.pub"]\n'
    cfg = load_config(_write(tmp_path, GOOD.replace(
        'batch_readings = 50', keys + 'root_cert = "root.crt"')))
    assert cfg.root_cert == tmp_path / "root.crt"
    assert load_config(_write(tmp_path, GOOD.replace('batch_readings = 50', keys))
                       ).root_cert is None
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, GOOD.replace(
            'batch_readings = 50', keys + 'root_cert = "gone.crt"')))
    assert "gateway.root_cert" in str(e.value) and "gone.crt" in str(e.value)
    with pytest.raises(ConfigError) as e:  # nothing for it to check
        load_config(_write(tmp_path, GOOD.replace(
            'batch_readings = 50', 'batch_readings = 50\nroot_cert = "root.crt"')))
    assert "gateway.root_cert" in str(e.value) and "fleet_keys" in str(e.value)


BROKER = """
[broker]
host = "127.0.0.1"
ca_file = "ca.pem"
cert_file = "gw.crt"
key_file = "gw.key"
"""


def test_identity_dir_takes_the_broker_files_as_the_initial_identity(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "gw.crt").write_text("x")
    slots = GOOD.replace('key_file = "gw.key"\n', 'identity_dir = "identity"\n') + BROKER
    cfg = load_config(_write(tmp_path, slots))
    assert cfg.identity_dir == tmp_path / "identity"
    assert cfg.key_file == tmp_path / "gw.key"  # the broker's: one key signs and connects
    # once the slots hold the identity, the initial files may be gone (moved)
    (tmp_path / "identity").mkdir()
    (tmp_path / "identity" / "current").write_text("0\n")
    (tmp_path / "gw.crt").unlink()
    p = _write(tmp_path, slots)
    (tmp_path / "gw.key").unlink()
    assert load_config(p).identity_dir == tmp_path / "identity"
    # not before: a missing initial identity is named; identity_dir needs [broker]
    (tmp_path / "identity" / "current").unlink()
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "broker.cert_file" in str(e.value) and "broker.key_file" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, GOOD.replace('key_file = "gw.key"\n',
                                                  'identity_dir = "identity"\n')))
    assert "gateway.identity_dir: needs [broker]" in str(e.value)


BUS = """
[[serial]]
name = "bus"
port = "/dev/ttyUSB2"
protocol = "modbus"
baud = 2400
parity = "even"
timeout_s = 0.5
poll_interval_s = 30

[[serial.slaves]]
name = "meter"
unit = 1
max_registers = 40
registers = [
  { name = "voltage", address = 0, unit = "V", table = "input", type = "f32" },
  { name = "energy", address = 0x48, unit = "kWh", table = "input", type = "f32", order = "ABCD" },
]

[[serial.slaves]]
name = "env"
unit = 2
registers = [
  { name = "temp", address = 0, unit = "Cel", type = "s16", scale = 0.1 },
  { name = "count", address = 4, unit = "1", type = "u32", order = "CDAB" },
  { name = "legacy", address = 6, unit = "1", words = 2, signed = true },
]
"""


def test_several_slaves_on_one_port_load(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD + BUS))
    bus = cfg.serial[2]
    assert (bus.baud, bus.parity, bus.timeout_s, bus.poll_interval_s) == (2400, "even", 0.5, 30)
    meter, env = bus.modbus_slaves()
    assert (meter.name, meter.unit, meter.max_registers) == ("meter", 1, 40)
    assert [(r.name, r.table, r.type, r.order) for r in meter.registers] == [
        ("voltage", "input", "f32", "ABCD"), ("energy", "input", "f32", "ABCD")]
    assert (env.unit, env.max_registers) == (2, 125)
    assert [(r.name, r.table, r.type, r.order) for r in env.registers] == [
        ("temp", "holding", "s16", "ABCD"), ("count", "holding", "u32", "CDAB"),
        ("legacy", "holding", "s32", "ABCD")]  # words = 2, signed = true: an s32
    single = cfg.serial[1]  # the single-slave form: one slave without a name
    [only] = single.modbus_slaves()
    assert (only.name, only.unit, single.parity, single.timeout_s) == ("", 3, "none", 1.0)


@pytest.mark.parametrize(
    ("old", "new", "where", "what"),
    [
        ('parity = "even"', 'parity = "mark"', "serial[2].parity", '"none", "even"'),
        ("timeout_s = 0.5", "timeout_s = 60", "serial[2].timeout_s", "out of range"),
        ("max_registers = 40", "max_registers = 126", "serial[2].slaves[0].max_registers",
         "out of range"),
        ('table = "input", type = "f32" }', 'table = "coil", type = "f32" }',
         "serial[2].slaves[0].registers[0].table", '"holding" (function 3) or "input"'),
        ('type = "s16"', 'type = "i16"', "serial[2].slaves[1].registers[0].type",
         '"u16", "s16", "u32", "s32" or "f32"'),
        ('order = "CDAB"', 'order = "ACBD"', "serial[2].slaves[1].registers[1].order",
         '"CDAB" (words swapped)'),
        ('type = "s16",', 'type = "s16", order = "BADC",',
         "serial[2].slaves[1].registers[0].order", "two-register types"),
        ("words = 2, signed = true", 'words = 2, signed = true, type = "s32"',
         "serial[2].slaves[1].registers[2]", "use type alone"),
        ("words = 2, signed = true", "words = 3", "serial[2].slaves[1].registers[2].words",
         "out of range"),
        ('name = "count"', 'name = "temp"', "serial[2].slaves[1].registers[1].name",
         "used twice"),
        ("address = 4,", "address = 65535,", "serial[2].slaves[1].registers[1].address",
         "past register 65535"),
        ('name = "env"\nunit = 2', 'name = "meter"\nunit = 2', "serial[2].slaves[1].name",
         "used by serial[2].slaves[0]"),
        ('name = "env"\nunit = 2', 'name = "env"\nunit = 1', "serial[2].slaves[1].unit",
         "address of serial[2].slaves[0]"),
        ('name = "env"\nunit = 2', 'name = "Env"\nunit = 2', "serial[2].slaves[1].name",
         "lowercase"),
        ('name = "env"\nunit = 2', 'name = "env"\nunit = 2\naddr = 3',
         "serial[2].slaves[1].addr", "unknown key"),
        ("poll_interval_s = 30\n", "poll_interval_s = 30\nunit = 4\n", "serial[2]",
         "not both"),
    ],
)
def test_each_modbus_mistake_is_named(tmp_path: Path, old: str, new: str, where: str,
                                      what: str) -> None:
    text = GOOD + BUS
    assert old in BUS
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text.replace(old, new, 1)))
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(where + ":"), e.value.problems
    assert what in e.value.problems[0]


def test_slave_lists_are_bounded_and_modbus_keys_belong_to_modbus(tmp_path: Path) -> None:
    head = BUS[: BUS.index("[[serial.slaves]]")]
    slave = '[[serial.slaves]]\nname = "s%d"\nunit = %d\nregisters = [{ name = "x", ' \
            'address = 0, unit = "1" }]\n'
    many = head + "".join(slave % (i, i) for i in range(1, 34))
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, GOOD + many))
    assert e.value.problems == ["serial[2].slaves: 33 slaves; at most 32 on one port"]
    empty = head + "slaves = []\n"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, GOOD + empty))
    assert e.value.problems == ["serial[2].slaves: must be a non-empty array of tables "
                                "[[serial.slaves]]"]
    regs = ", ".join('{ name = "r%d", address = %d, unit = "1" }' % (i, i) for i in range(65))
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, GOOD + head + (slave % (1, 1)).replace(
            'registers = [{ name = "x", address = 0, unit = "1" }]', "registers = [%s]" % regs)))
    assert e.value.problems == ["serial[2].slaves[0].registers: 65 registers; at most 64 per "
                                "slave"]
    sds = GOOD.replace('protocol = "sds011"', 'protocol = "sds011"\nslaves = []\ntimeout_s = 1')
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, sds))
    assert e.value.problems == ['serial[0]: slaves, timeout_s apply to protocol = "modbus" '
                                "only; remove them"]
