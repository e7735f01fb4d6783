"""Raspberry Pi Pico W board: Wi-Fi (CYW43), hardware watchdog, NTP. Constants and wiring
only (see ``mcu.McuBoard``). Checked by compiling only: confirm on a real Pico W.
"""

import time

import machine
import network

from .mcu import McuBoard

LINK_TIMEOUT_MS = 15000  # ms to wait for Wi-Fi association
WDT_TIMEOUT_MS = 8388  # ms: the RP2040 watchdog's maximum


class Board(McuBoard):
    name = "rp2"
    model = "ce-gw-picow"  # Raspberry Pi Pico W: provisioning on UART0 (GP0/GP1)

    def __init__(self, config=None):
        super().__init__(config)
        self._wdt = None

    def mac(self):
        return network.WLAN(network.STA_IF).config("mac")  # CYW43 MAC (6 bytes)

    def connect_network(self):
        wifi = self.config.get("wifi")
        if not wifi:
            return False
        sta = network.WLAN(network.STA_IF)
        sta.active(True)
        sta.connect(wifi["ssid"], wifi.get("password", ""))
        t0 = time.ticks_ms()
        while not sta.isconnected():
            if time.ticks_diff(time.ticks_ms(), t0) > LINK_TIMEOUT_MS:
                return False
            time.sleep_ms(100)
        self.sync_time()
        return True

    def wdt_feed(self):
        if self._wdt is None:
            self._wdt = machine.WDT(timeout=WDT_TIMEOUT_MS)
        self._wdt.feed()
