"""What boards with MicroPython's ``machine`` module share (ESP32, Pico W): the provisioning
UART, the chip's unique id (serial number, MAC), the reset, I2C, 1-Wire and ADC buses,
and the clock set by NTP. ``esp32.py`` and ``rp2.py`` subclass ``McuBoard``; the unix board
does not load this module (``hal/__init__.py``)."""

import time

from . import BaseBoard


def mac_urn(mac: bytes) -> str:
    """RFC 9039 device URN of a 6-byte MAC address: ``urn:dev:mac:`` + 12 lowercase hex.
    Here, not in ``hal``: the unix board (its URN from the configuration) never needs it."""
    if len(mac) != 6:
        raise ValueError("MAC address must be 6 bytes")
    return "urn:dev:mac:" + "".join("%02x" % b for b in mac)


UNIX_EPOCH_OFFSET_2000 = 946684800  # seconds from 1970-01-01 to 2000-01-01 (MicroPython epoch)
NTP_MIN_YEAR = 2024  # a clock before this was never set: report no time


def epoch_seconds(t: int) -> int:
    """``time.time()`` as UNIX seconds on ports whose epoch is 2000-01-01."""
    return t + UNIX_EPOCH_OFFSET_2000 if time.gmtime(0)[0] == 2000 else t


class McuBoard(BaseBoard):
    PROVISIONING_UART = 0  # machine.UART id of the provisioning line
    PROVISIONING_BAUD = 115200

    # -- boot (class methods: no configuration yet) -----------------------------

    @classmethod
    def provisioning_uart(cls) -> object:
        from machine import UART

        return UART(cls.PROVISIONING_UART, cls.PROVISIONING_BAUD)

    @classmethod
    def reset(cls) -> None:
        import machine

        machine.reset()

    @classmethod
    def unique_id(cls) -> bytes:
        import machine

        return machine.unique_id()

    @classmethod
    def info(cls, root: str) -> dict:
        """What provisioning reports: model, serial (the chip's unique id), the device URN
        (from the MAC), the firmware version (``cityedge_fw.VERSION``)."""
        from .. import VERSION

        uid = cls.unique_id()
        return {"model": cls.model, "serial": "".join("%02x" % b for b in uid),
                "device": mac_urn(uid[:6]), "firmware": VERSION}

    # -- identity, time -------------------------------------------------------

    def device_id(self) -> str:
        return self.config.get("device") or mac_urn(self.mac())

    def mac(self) -> bytes:
        import machine

        return machine.unique_id()[:6]

    def sync_time(self) -> bool:
        """Set the clock by NTP (once the network is up); False if no server answered."""
        try:
            import ntptime

            ntptime.settime()
        except (OSError, ImportError, OverflowError):
            return False
        self._clock_set = time.gmtime()[0] >= NTP_MIN_YEAR
        return self._clock_set

    def unix_time(self) -> int | None:
        if not self._clock_set:
            return None
        return epoch_seconds(int(time.time()))

    # -- buses ----------------------------------------------------------------

    def i2c(self, bus_id: int, sda: int, scl: int, freq: int) -> object:
        from machine import I2C, Pin

        return I2C(bus_id, sda=Pin(sda), scl=Pin(scl), freq=freq)

    def onewire(self, pin: int) -> object:
        from machine import Pin
        from onewire import OneWire

        return OneWire(Pin(pin))

    def adc(self, pin: int) -> object:
        from machine import ADC, Pin

        return ADC(Pin(pin))
