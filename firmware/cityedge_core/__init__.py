"""cityedge shared core: wire formats and trust decisions, no I/O, no dependencies.

Runs unchanged on MicroPython (ESP32, Pico W, unix port) and on CPython. Every module here
uses only the language subset both interpreters share: no ``typing`` at run time, no
dataclasses, no f-string ``=`` specifiers, ints and bytes only for cryptography.
"""

VERSION = "0.1.0"
