"""The production ``boot.py`` that ``make firmware`` writes (``cityedge.build_firmware``).

It lives here, in the host library, because two parts read the same text: the firmware
build writes it, and the hardware checker's REPL rule (``cityedge_hardware.image_rules``)
takes the REPL slots it detaches as the reference a vendor's ``boot.py`` is held to.
"""

from __future__ import annotations

BOOT_PY = '''"""Production boot: no interactive REPL on the UART (the serial line is for framed
provisioning messages only). Written by ``make firmware``."""

import os
import sys

if sys.platform == "esp32":
    os.dupterm(None, 1)  # detach the REPL from the UART
# rp2 (Pico W): dupterm cannot detach the built-in REPL at run time; a production image is
# built with MICROPY_HW_ENABLE_UART_REPL=0 (and without the USB CDC REPL). The same build
# flag is the stronger choice on ESP32 too: then no REPL exists before boot.py runs.
'''
