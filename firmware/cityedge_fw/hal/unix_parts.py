"""The unix board's simulated parts other than its usual SHT3x: the SCD4x on I2C, the
DS18B20 on its 1-Wire bus, the ADC. Loaded only for a sensor that needs one (``unix.py``):
every name of a loaded module stays interned ("Memory on the device" in
docs/ARCHITECTURE.md)."""


def onewire(clock):
    from ..sensors.sim_onewire import OneWireBus

    return OneWireBus(clock)


def adc():
    from ..sensors.sim_adc import SimADC

    return SimADC()


def attach(driver, spec, clock):
    """Put the part a (validated) configuration entry names on its driver's simulated bus."""
    if spec["type"] == "scd4x":
        from ..sensors.sim_scd4x import SCD4xDevice

        driver.i2c.attach(driver.address, SCD4xDevice(clock))
    else:  # ds18b20
        from ..sensors.sim_onewire import DS18B20Device

        rom = spec.get("rom")
        driver.ow.attach(DS18B20Device(clock, rom=bytes.fromhex(rom) if rom else None))
