"""Bus-level tests of the sensor drivers against simulated parts that speak each datasheet.

Each driver must produce the datasheet's values, respect its conversion delay (the simulated
part NACKs an early read), check its CRC and raise ``SensorFault`` for a missing part or
garbage, never anything else.
"""

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware"))

from cityedge_fw.sensors import SensorFault, crc8_sensirion
from cityedge_fw.sensors.adc import ADCChannel
from cityedge_fw.sensors.ds18b20 import DS18B20, crc8_maxim
from cityedge_fw.sensors.scd4x import SCD4x
from cityedge_fw.sensors.sht3x import SHT3x

import simbus


def test_crc8_datasheet_examples() -> None:
    assert crc8_sensirion(b"\xbe\xef") == 0x92  # SHT3x / SCD4x datasheet example
    # Maxim application note 27 example: family 0x02, serial 0x00000001B81C, CRC 0xA2
    rom = bytes.fromhex("021cb801000000a2")
    assert crc8_maxim(rom, 7) == rom[7]
    assert crc8_maxim(rom) == 0


def _sht() -> tuple[simbus.SimClock, simbus.SHT3xDevice, SHT3x]:
    clock = simbus.SimClock()
    bus = simbus.I2CBus(clock)
    dev = bus.attach(0x44, simbus.SHT3xDevice(clock, temp=23.4, humidity=51.2))
    return clock, dev, SHT3x("air", bus, sleep=clock.sleep_ms)


def test_sht3x_reads_temperature_and_humidity() -> None:
    clock, dev, sensor = _sht()
    assert sensor.read() == [("air/temp", "Cel", 23.4), ("air/humidity", "%RH", 51.2)]
    assert dev.last_command == b"\x24\x00"
    assert clock.ms >= 15  # waited for the conversion


@given(temp=st.floats(-40, 125), humidity=st.floats(0, 100))
def test_sht3x_conversion_over_the_range(temp: float, humidity: float) -> None:
    _, dev, sensor = _sht()
    dev.temp, dev.humidity = temp, humidity
    (_, _, t), (_, _, rh) = sensor.read()
    assert abs(t - temp) < 0.01 and abs(rh - humidity) < 0.01


def test_sht3x_early_read_is_nacked() -> None:
    _, _, sensor = _sht()
    sensor._sleep = lambda ms: None  # a driver that does not wait gets a NACK -> fault
    with pytest.raises(SensorFault, match="no answer"):
        sensor.read()


def test_sht3x_garbage_and_missing_are_faults() -> None:
    _, dev, sensor = _sht()
    dev.mode = "garbage"
    with pytest.raises(SensorFault, match="CRC"):
        sensor.read()
    dev.mode = "missing"
    with pytest.raises(SensorFault, match="no answer"):
        sensor.read()
    dev.mode = "ok"
    assert len(sensor.read()) == 2  # recovers when the part is back


def _scd() -> tuple[simbus.SimClock, simbus.SCD4xDevice, SCD4x]:
    clock = simbus.SimClock()
    bus = simbus.I2CBus(clock)
    dev = bus.attach(0x62, simbus.SCD4xDevice(clock, co2=845, temp=21.0, humidity=38.5))
    return clock, dev, SCD4x("room", bus, sleep=clock.sleep_ms)


def test_scd4x_periodic_measurement_every_5_s() -> None:
    clock, dev, sensor = _scd()
    assert sensor.read() == []  # started, nothing ready yet
    clock.sleep_ms(5000)
    assert sensor.read() == [
        ("room/co2", "ppm", 845),
        ("room/temp", "Cel", 21.0),
        ("room/humidity", "%RH", 38.5),
    ]
    assert sensor.read() == []  # the same period is not read twice
    clock.sleep_ms(5000)
    dev.co2 = 1200
    assert sensor.read()[0] == ("room/co2", "ppm", 1200)


def test_scd4x_faults() -> None:
    clock, dev, sensor = _scd()
    sensor.read()
    clock.sleep_ms(5000)
    dev.mode = "garbage"
    with pytest.raises(SensorFault, match="CRC"):
        sensor.read()
    dev.mode = "ok"
    dev.co2 = 65000
    clock.sleep_ms(5000)
    with pytest.raises(SensorFault, match="out of range"):
        sensor.read()
    dev.mode = "missing"
    with pytest.raises(SensorFault, match="no answer"):
        sensor.read()
    # power-cycled part: the driver starts periodic measurement again
    dev.mode = "ok"
    dev.started_at = None
    dev.co2 = 700
    assert sensor.read() == []
    clock.sleep_ms(5000)
    assert sensor.read()[0] == ("room/co2", "ppm", 700)


def _ds(temp: float = 12.5) -> tuple[simbus.SimClock, simbus.DS18B20Device, DS18B20]:
    clock = simbus.SimClock()
    ow = simbus.OneWireBus(clock)
    dev = ow.attach(simbus.DS18B20Device(clock, temp=temp))
    return clock, dev, DS18B20("water", ow, sleep=clock.sleep_ms)


@given(st.integers(-55 * 16, 125 * 16).filter(lambda r: r != 0x0550))
def test_ds18b20_reads_scratchpad(raw: int) -> None:
    _, _, sensor = _ds(raw / 16)
    assert sensor.read() == [("water/temp", "Cel", raw / 16)]


def test_ds18b20_match_rom_addresses_one_part() -> None:
    clock = simbus.SimClock()
    ow = simbus.OneWireBus(clock)
    a = ow.attach(simbus.DS18B20Device(clock, temp=4.0, rom=b"\x28\xaa\x00\x00\x00\x00\x01"))
    ow.attach(simbus.DS18B20Device(clock, temp=9.0, rom=b"\x28\xbb\x00\x00\x00\x00\x02"))
    sensor = DS18B20("tank", ow, rom=a.rom, sleep=clock.sleep_ms)
    assert sensor.read() == [("tank/temp", "Cel", 4.0)]


def test_ds18b20_faults() -> None:
    _, dev, sensor = _ds()
    sensor._sleep = lambda ms: None  # no wait: the part still holds its power-on 85.0
    with pytest.raises(SensorFault, match="power-on"):
        sensor.read()
    _, dev, sensor = _ds()
    dev.mode = "garbage"
    with pytest.raises(SensorFault, match="CRC"):
        sensor.read()
    dev.mode = "missing"
    with pytest.raises(SensorFault, match="presence"):
        sensor.read()


def test_adc_scaling_and_range() -> None:
    adc = simbus.SimADC(raw=65535 // 2)
    ch = ADCChannel("noise", adc, "dB", scale=100.0, offset=20.0, low=25.0, high=110.0)
    assert ch.read() == [("noise", "dB", 69.999)]
    adc.raw = 0  # a broken wire reads as the rail
    with pytest.raises(SensorFault, match="out of range"):
        ch.read()
    adc.mode = "missing"
    with pytest.raises(SensorFault, match="read failed"):
        ch.read()
