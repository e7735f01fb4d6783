"""The device's topics come from the core's topic scheme under the configured
``topic_prefix`` (``topics.device_topics``, worked out at boot by ``main.build``).

The fleet's broker rules, ingest and commands serve only the core's prefix
(``topics.PREFIX``), so the configuration refuses any other (``config.validate``,
``tests/firmware/test_config.py``): the broker acknowledges a publish its rules refuse and
drops it, and a device under another prefix would delete every batch as delivered. The
device side is ready for another prefix all the same: here a device built from the
board's boot (``main.build``, the same configuration file) with ``lab/v1`` in place of the
default streams its signed batches under ``lab/v1/`` to a real mTLS Mosquitto whose rules
grant that prefix (a test-only identity), subscribes to its ``lab/v1/.../down/`` topics,
and publishes nothing under ``ce/v1/``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fw_harness import (
    DEVICE,
    Subscriber,
    check_chain,
    device_argv,
    device_config,
    device_env,
    finish,
    wait_for,
)

from cityedge_core import topics
from cityedge_fleet.broker_acl import Acl

from support.mosquitto import OBSERVER, Mosquitto, TestPKI

PREFIX = "lab/v1"

# the board's boot with the configured prefix replaced after ``config.load`` (which
# refuses it): what a fleet serving ``lab/v1`` would let the file say
PROGRAM = """
import os
import mp_device
from cityedge_fw import config, main
cfg = config.load(os.getenv("CITYEDGE_FLASH") + "/config.json", agent=False)
cfg["topic_prefix"] = %r
mp_device._BOARD.append({"device": cfg["device"]})
mp_device.supervised(main.build(cfg, board_class=mp_device.Board), {"batches": 3})
""" % PREFIX


@pytest.fixture
def lab_broker(pki: TestPKI) -> Iterator[Mosquitto]:
    """A broker whose rules grant the device the ``lab/v1`` topics of its own (as the
    production rules grant ``ce/v1``'s) and let the observer watch every topic."""
    b = Mosquitto(pki)
    own_down = [topics.down(DEVICE, k, PREFIX) for k in topics.DOWN_KINDS]
    b.grant_custom(DEVICE, [Acl("publishClientSend", topics.up(DEVICE, "+", PREFIX)),
                            Acl("publishClientReceive", topics.down(DEVICE, "+", PREFIX)),
                            *(Acl("subscribeLiteral", f) for f in own_down)])
    b.grant_custom(OBSERVER, [Acl("subscribePattern", "#"),
                              Acl("publishClientReceive", "#")])
    b.start()
    yield b
    b.cleanup()


def test_a_device_publishes_and_subscribes_under_its_configured_prefix(
        mpy_dir: Path, lab_broker: Mosquitto, pki: TestPKI, tmp_path: Path) -> None:
    creds = pki.issue_client(DEVICE)
    path = device_config(tmp_path, lab_broker, pki, creds, {"batches": 3})
    env = device_env(mpy_dir, path)
    del env["CE_CONFIG"]  # ``mp_device`` then leaves the boot to ``PROGRAM``
    sub = Subscriber(lab_broker, pki, topic_filter="#")
    proc = subprocess.Popen(device_argv(mpy_dir, PROGRAM, "96k"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = finish(proc)
        wait_for(lambda: len([t for t, _ in sub.messages if t.endswith("/up/readings")]) >= 3)
    finally:
        sub.close()
    readings = topics.up(DEVICE, topics.READINGS, PREFIX)
    with sub.lock:
        seen = list(sub.messages)
    assert (r["published"], r["boot"]) == (3, 1), r  # one boot, the one under test
    assert check_chain([p for t, p in seen if t == readings], creds)[:3] == [1, 2, 3]
    assert {t for t, _ in seen} <= set(topics.device_topics(DEVICE, PREFIX)), seen
    assert not [t for t, _ in seen if t.startswith(topics.PREFIX + "/")], seen
    # its command topics: the broker logged both subscriptions under the prefix
    log = lab_broker.read_log()
    for kind in topics.DOWN_KINDS:
        assert topics.down(DEVICE, kind, PREFIX) in log, log[-2000:]
