"""The link fails, not the broker: a router that is down, and a link that silently eats
every byte. Every batch accepted before and during the outage arrives afterwards, in order,
chain unbroken, none lost (the real agent on the unix port, a real Mosquitto behind a
proxy the test cuts)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fw_harness import (
    DEVICE,
    Subscriber,
    Via,
    check_chain,
    device_config,
    finish,
    start_device,
    wait_for,
)

from support.linkproxy import LinkProxy
from support.mosquitto import Mosquitto, TestPKI


@pytest.mark.parametrize("mode", ["router_down", "silent_blackhole"])
def test_link_cut_loses_nothing(mode: str, broker: Mosquitto, link: LinkProxy,
                                pki: TestPKI, mpy_dir: Path, tmp_path: Path) -> None:
    creds = pki.issue_client(DEVICE)
    sub = Subscriber(broker, pki)  # the fleet side is not behind the cut link
    try:
        config = device_config(tmp_path, Via(broker, link), pki, creds,  # type: ignore[arg-type]
                               {"batches": 14}, keepalive_s=10)
        proc = start_device(mpy_dir, config)
        wait_for(lambda: len(sub.readings()) >= 3)
        if mode == "router_down":
            link.cut(refuse=True)
            time.sleep(4)
        else:
            link.blackhole()  # only the MQTT keep-alive (10 s) can notice this
            time.sleep(16)
        before_restore = len(sub.readings())
        link.restore()
        result = finish(proc, timeout=120)
        assert result["connects"] >= 2, result  # it noticed and reconnected
        assert result["stored"] == 0 and result["drops"] == 0, result
        wait_for(lambda: len(set(sub.readings())) >= result["seq"], timeout=40)
        seqs = check_chain(sub.readings(), creds)
        assert seqs == list(range(1, result["seq"] + 1)), seqs
        assert before_restore < result["seq"]  # some batches really waited for the link
    finally:
        sub.close()
