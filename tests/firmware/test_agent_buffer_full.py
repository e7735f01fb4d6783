"""Buffer full, end to end: the real agent on the unix port (the tests' 64 KiB heap) with
the smallest buffer budget (4 KiB, about a dozen batches) loses its link for longer than
the buffer holds. The oldest batches are dropped; once the link is back one signed drop
record says which and how many, it reaches the fleet through the real broker with the
batches that were kept, and the counts are exact: every sequence number arrived or is in
a drop record, and every reading taken arrived or is counted lost."""

from __future__ import annotations

import time
from pathlib import Path

from fw_harness import (
    DEVICE,
    Subscriber,
    Via,
    device_config,
    finish,
    start_device,
    verifier_for,
    wait_for,
)

from cityedge_core import batch as batchmod
from cityedge_core import chain

from support.linkproxy import LinkProxy
from support.mosquitto import Credentials, Mosquitto, TestPKI


def account(messages: list[bytes], creds: Credentials) -> dict[str, int]:
    """What the fleet can tell from what it received: batches and readings that arrived,
    and those the drop records it received report lost."""
    verifier = verifier_for(creds)
    out = {"batches": 0, "readings": 0, "lost_batches": 0, "lost_readings": 0, "records": 0}
    for data in messages:
        verdict = verifier.check(data)
        assert verdict.status in (*chain.ACCEPTED, chain.DUPLICATE), verdict
        if verdict.status == chain.DUPLICATE:
            continue
        b = verdict.batch
        out["batches"] += 1
        if b.kind == batchmod.KIND_DROP:
            first, last, batches, readings = b.dropped
            assert first <= last < b.seq
            out["records"] += 1
            out["lost_batches"] += batches
            out["lost_readings"] += readings
        else:
            out["readings"] += len(b.records)
    out["missing"] = verifier.states[DEVICE].missing_count() if DEVICE in verifier.states \
        else 0
    return out


def test_buffer_full_drops_oldest_and_a_signed_drop_record_reaches_the_fleet(
        broker: Mosquitto, link: LinkProxy, pki: TestPKI, mpy_dir: Path,
        tmp_path: Path) -> None:
    creds = pki.issue_client(DEVICE)
    sub = Subscriber(broker, pki)  # the fleet side is not behind the cut link
    try:
        config = device_config(tmp_path, Via(broker, link), pki, creds,  # type: ignore[arg-type]
                               {"batches": 40}, buffer_budget_bytes=4096)
        proc = start_device(mpy_dir, config)
        wait_for(lambda: len(sub.readings()) >= 2)
        link.cut(refuse=True)
        time.sleep(8)  # about 30 batches signed: more than 4 KiB of flash holds
        link.restore()
        result = finish(proc, timeout=120)
        assert result["drops"] > 0 and result["stored"] == 0, result
        got: dict[str, int] = {}

        def all_accounted() -> bool:
            got.update(account(sub.readings(), creds))
            return got["batches"] + got["lost_batches"] >= result["seq"]

        wait_for(all_accounted, timeout=40)
        assert got["batches"] + got["lost_batches"] == result["seq"], (got, result)
        assert got["lost_batches"] == result["drops"], (got, result)
        assert got["missing"] == 0, got  # every gap in the chain explained by a record
        assert 1 <= got["records"] <= 3, got  # one record per outage, not one per batch
        taken = result["readings"] - result["pending"]  # the unsealed rest never left
        assert got["readings"] + got["lost_readings"] == taken, (got, result)
        print("buffer full: %d batches signed, %d dropped (%d readings) in %d drop "
              "record(s), %d received" % (result["seq"], got["lost_batches"],
                                          got["lost_readings"], got["records"],
                                          got["batches"]))
    finally:
        sub.close()
