"""Collect the interpreter-neutral frame tests under pytest (they also run on MicroPython)."""

from shared.test_frame_shared import *  # noqa: F403
