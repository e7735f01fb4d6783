"""ESP32 gateway board: Ethernet (LAN8720 PHY, e.g. Olimex ESP32-POE) for the fibre drop,
Wi-Fi as fallback, hardware watchdog, NTP. Constants and wiring only (see ``mcu.McuBoard``).

Checked by compiling only (no hardware here): pins, PHY type and the RMII clock must be
confirmed on the city's board revision.
"""

import time

import machine
import network

from .mcu import McuBoard

ETH_MDC = 23  # GPIO of the PHY's MDC line
ETH_MDIO = 18  # GPIO of the PHY's MDIO line
ETH_POWER = 12  # GPIO that powers the PHY on the ESP32-POE (None if always on)
ETH_PHY_ADDR = 0
LINK_TIMEOUT_MS = 10000  # ms to wait for an Ethernet link / Wi-Fi association
WDT_TIMEOUT_MS = 30000  # ms without a feed before the watchdog resets the board
NVS_NAMESPACE = "cityedge"  # esp32.NVS namespace of the board's own keys


class Board(McuBoard):
    name = "esp32"
    model = "ce-gw-esp32"  # Olimex ESP32-POE class: Ethernet, Wi-Fi fallback

    def __init__(self, config=None):
        super().__init__(config)
        self._wdt = None

    def mac(self):
        return machine.unique_id()[:6]  # the base MAC from eFuse

    def _wait(self, nic):
        t0 = time.ticks_ms()
        while not nic.isconnected():
            if time.ticks_diff(time.ticks_ms(), t0) > LINK_TIMEOUT_MS:
                return False
            time.sleep_ms(100)
        return True

    def connect_network(self):
        try:
            lan = network.LAN(
                mdc=machine.Pin(ETH_MDC),
                mdio=machine.Pin(ETH_MDIO),
                power=machine.Pin(ETH_POWER) if ETH_POWER is not None else None,
                phy_type=network.PHY_LAN8720,
                phy_addr=ETH_PHY_ADDR,
            )
            lan.active(True)
            up = self._wait(lan)
        except (OSError, ValueError):
            up = False
        if not up:
            wifi = self.config.get("wifi")
            if not wifi:
                return False
            sta = network.WLAN(network.STA_IF)
            sta.active(True)
            sta.connect(wifi["ssid"], wifi.get("password", ""))
            up = self._wait(sta)
        if up:
            self.sync_time()
        return up

    def partition(self):
        """Label of the running app partition (the OTA slot this image booted from)."""
        import esp32

        return esp32.Partition(esp32.Partition.RUNNING).info()[4]

    def nvs(self):
        """The board's non-volatile key/value store (``esp32.NVS``): integers and blobs
        that outlive a re-made file system (the OTA work keeps its slot state there)."""
        import esp32

        return esp32.NVS(NVS_NAMESPACE)

    def wdt_feed(self):
        if self._wdt is None:  # started on the first feed: the boot itself is not watched
            self._wdt = machine.WDT(timeout=WDT_TIMEOUT_MS)
        self._wdt.feed()
