"""cityedge device agent (MicroPython): sensors, durable batch buffer, MQTT uplink, board HAL.

Runs on ESP32, Raspberry Pi Pico W and the MicroPython unix port; imports the shared sans-IO
core ``cityedge_core`` for every wire format.
"""
