"""A key rotation campaign over a thousand devices, end to end over the real broker.

Real Mosquitto of the test's own (mTLS on a free port, the fleet's CRL, dynamic security:
``support.fastfleet.real_fleet``), the real fleet on SQLite (API, ingest worker, command
publisher, campaign runner), ``N`` fast CPython devices (``cityedge.fastdevice``: the
shared core over aiomqtt mTLS) and ``AGENTS`` MicroPython agents on the
unix port (the firmware from ROMFS, rebooting as a board does: ``fw_harness``). The agents
are enrolled through the API; the fast devices are registered in bulk as enrollment
leaves them (``fastfleet.register_fast_many``: the fleet's CA signs their certificates,
the broker grants them) and run in one asyncio loop of a child process
(``support.fastswarm``: beside the fleet, not sharing its interpreter lock), their
connections spread over ``STAGGER_S``. Every key is 70 days old in the registry. The
campaign is created as ``cityedge keys rotate --select 'site=harbour,key-age>60d' --wave
100 --max-failures 5%`` creates it (``POST /campaigns``). A tenth of the fast devices is
away while it runs; they connect once the online ones are done and rotate then.

Wall times are printed (``-s``); the test asserts what the fleet guarantees, not them
(``bench/campaign.py`` measures the campaign). ``CE_CAMPAIGN_DEVICES`` changes ``N``.

Checked: every online device ends ``old-revoked`` while the campaign waits for the away
ones (reported ``offline``), these rotate when they return, the campaign ends ``done``
with exact counts; no batch refused by the ingest, one chain per device across the key
change; every device on its new key (one key on its flash, reconnected with the new
certificate) and, for a sample, the old certificate refused by the broker.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fw_harness import RebootingDevice
from mp_fleet import ROTATION_HEAP, enroll_mp, mp_config
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, func, select, update

from cityedge_core import chain
from cityedge_fleet import campaign_store, command_key, rotation_ingest
from cityedge_fleet.campaign import CampaignLimits, CampaignState
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.campaign_store import RotationCampaign
from cityedge_fleet.models import (
    ChainStateRow,
    Credential,
    CredentialStatus,
    DeviceState,
    IngestEvent,
    KeyRotation,
    Reading,
    Role,
    RotationState,
)

from support.fastfleet import Fleet, real_fleet, refused_at_the_broker, register_fast_many
from support.fastswarm import Swarm, raise_fd_limit
from support.mosquitto import TestPKI

N = int(os.environ.get("CE_CAMPAIGN_DEVICES", "1000"))  # fast devices
AGENTS = 2  # MicroPython agents on the unix port, in the same campaign
WAVE = 100
AWAY_EVERY = 10  # every tenth fast device is away during the campaign
INTERVAL_S = 20.0  # seconds between a fast device's batches (the proof goes at once)
STAGGER_S = 10.0  # seconds over which the fast devices' first connections are spread
RUNNER_S = 0.5  # seconds between the campaign runner's rounds (5 in fleet serve)
CAMPAIGN_S = 600.0  # seconds the test waits for each phase at most (a busy machine)
POLL_S = 1.0

pytestmark = pytest.mark.timeout(1200)  # about 3 minutes here; a busy machine takes longer


@pytest.fixture
def fleet(tmp_path: Path, pki: TestPKI) -> Iterator[Fleet]:
    raise_fd_limit(2 * (N + AGENTS) + 256)  # before the broker starts: it inherits it
    with real_fleet("sqlite:///%s" % (tmp_path / "fleet.sqlite3"), pki,
                    command_absent_retry_s=2.0) as f:
        yield f


def poll(pred: Any, timeout: float, what: Any) -> None:
    """Wait for ``pred``, asking every ``POLL_S``. A look that finds SQLite's write lock
    held past its busy timeout (a wave's hundred rotations start in one transaction, on
    a machine whose other core plays the devices) is a look that saw nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OperationalError:
            pass
        time.sleep(POLL_S)
    raise AssertionError(what())


def state(f: Fleet, cid: int) -> str:
    """The campaign's state as the runner recorded it (a cheap look, while it runs)."""
    with Session(f.api.engine) as s:
        camp = s.get(RotationCampaign, cid)
        return str(camp.state) if camp is not None else "-"


def progress(f: Fleet, cid: int) -> dict[str, Any]:
    """The campaign's status as the API computes it (``campaign_store.status``)."""
    with Session(f.api.engine) as s:
        return dict(campaign_store.status(s, cid))


def campaign(f: Fleet, cid: int) -> dict[str, Any]:
    r = f.api.client.get("/campaigns/%d" % cid, headers=f.api.headers(Role.security))
    assert r.status_code == 200, r.text
    return dict(r.json())


def count(f: Fleet, query: Any) -> int:
    with Session(f.api.engine) as s:
        return int(s.exec(query).one())


def events(f: Fleet) -> dict[str, int]:
    with Session(f.api.engine) as s:
        rows = s.exec(select(IngestEvent.status, func.count()).group_by(
            col(IngestEvent.status))).all()
    return {str(k): int(v) for k, v in rows}


def chains(f: Fleet) -> dict[str, tuple[int, int, int]]:
    """Device -> (distinct batches stored, last seq on its chain, gaps still missing)."""
    with Session(f.api.engine) as s:
        stored = dict(s.exec(select(Reading.device_id, func.count(func.distinct(
            Reading.batch_seq))).group_by(col(Reading.device_id))).all())
        return {r.device_id: (int(stored.get(r.device_id, 0)), r.last_seq, r.missing)
                for r in s.exec(select(ChainStateRow))}


def active_kids(f: Fleet) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with Session(f.api.engine) as s:
        for c in s.exec(select(Credential).where(
                col(Credential.status) == CredentialStatus.active)):
            out.setdefault(c.device_id, []).append(c.kid)
    return out


@pytest.fixture
def device_flash(tmp_path: Path) -> Iterator[Path]:
    """Where the fast devices keep their files: in memory where the machine has a tmpfs.
    Each device syncs every write (``write_atomic``) as a board must; a thousand of them
    on one disk would wait for it in turn, on one event loop."""
    shm = Path("/dev/shm")
    d = Path(tempfile.mkdtemp(prefix="cityedge-flash-", dir=shm if shm.is_dir() else tmp_path))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_thousand_devices_rotated_with_a_tenth_away(fleet: Fleet, mpy_dir: Path,
                                                      tmp_path: Path,
                                                      device_flash: Path) -> None:
    f = fleet
    t0 = time.monotonic()
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=70)
    dirs = register_fast_many(f, 1, N, not_before=old, state=DeviceState.active,
                              base=device_flash)
    mps = [enroll_mp(f, N + 1 + k, _mkdir(tmp_path / ("mp%d" % k))) for k in range(AGENTS)]
    with Session(f.api.engine) as s:  # the agents' keys are as old
        s.exec(update(Credential).where(  # type: ignore[call-overload]
            col(Credential.device_id).in_([m.id for m in mps])).values(not_before=old))
        s.commit()
    print("\nregistered %d in %.1f s" % (N + AGENTS, time.monotonic() - t0))
    away = dirs[AWAY_EVERY // 2::AWAY_EVERY]
    online = [d for d in dirs if d not in set(away)]
    t1 = time.monotonic()
    first = Swarm(online, f.broker.port, interval_s=INTERVAL_S, stagger_s=STAGGER_S).start()
    agents = []
    for k, dev in enumerate(mps):
        work = tmp_path / ("mp%d" % k)
        agents.append(RebootingDevice(mpy_dir, mp_config(f, dev, work,
                                                         {"file": str(work / "stop")}),
                                      work / "stop", ROTATION_HEAP).start())
    runner = back = None
    stats: dict[str, dict[str, Any]] = {}
    try:
        streaming = select(func.count()).select_from(ChainStateRow).where(
            col(ChainStateRow.last_seq) > 0)
        poll(lambda: count(f, streaming) == len(online) + AGENTS, CAMPAIGN_S,  # active
             lambda: "streaming: %d; %s" % (count(f, streaming), first.tail()))
        print("streaming in %.1f s" % (time.monotonic() - t1))
        runner = CampaignRunner(f.api.engine, f.settings, command_key.from_settings(f.settings),
                                wake_publisher=f.publisher.wake,
                                clim=CampaignLimits(runner_every_s=RUNNER_S),
                                renew=False).start()
        f.api.client.app.state.campaign_runner = runner  # type: ignore[attr-defined]
        t2 = time.monotonic()
        r = f.api.client.post("/campaigns", json={  # as `cityedge keys rotate` sends it
            "select": "site=harbour,key-age>60d", "wave": WAVE, "max_failures": "5%",
            "confirm": True}, headers=f.api.headers(Role.security))
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        total = N + AGENTS
        assert campaign(f, cid)["allowed_failures"] == total * 5 // 100
        settled = total - len(away)
        revoked = select(func.count()).select_from(KeyRotation).where(
            col(KeyRotation.state) == RotationState.old_revoked)
        poll(lambda: count(f, revoked) == settled, CAMPAIGN_S, lambda: progress(f, cid))
        online_s = time.monotonic() - t2
        got = campaign(f, cid)
        assert got["state"] == "running" and got["wave"] == -(-total // WAVE), got
        assert got["counts"] == {"waiting": 0, "offline": len(away), "active": 0,
                                 "retry": 0, "done": settled, "failed": 0}, got
        assert got["rotations"] == {"old-revoked": settled, "sent": len(away)}, got
        away_ids = {_device_id(d) for d in away}
        assert set(got["offline"]) == away_ids
        # they come back: their rotate commands reach them now
        t3 = time.monotonic()
        back = Swarm(away, f.broker.port, interval_s=INTERVAL_S,
                     stagger_s=STAGGER_S * len(away) / N).start()
        poll(lambda: count(f, revoked) == total and state(f, cid) == CampaignState.done,
             CAMPAIGN_S, lambda: progress(f, cid))
        back_s = time.monotonic() - t3
        print("campaign: %d online rotated in %.1f s; %d back rotated in %.1f s"
              % (settled, online_s, len(away), back_s))
        got = campaign(f, cid)
        assert got["counts"] == {"waiting": 0, "offline": 0, "active": 0, "retry": 0,
                                 "done": total, "failed": 0}, got
        assert got["failed"] == [] and got["offline"] == []
    finally:
        if runner is not None:
            runner.stop()
        for a in agents:
            a.stop(120)
        for swarm in (back, first):
            if swarm is not None:
                stats.update(swarm.stop())
    kids = active_kids(f)
    assert len(stats) == N
    for dev, st in stats.items():
        assert (st["rotations"], st["erased"], st["refused"], st["forged"]) == (1, 1, 0, 0), \
            (dev, st)
        # one key left on its disk, the one the fleet holds active, and in use: the
        # device connected again with it after the switch
        assert list(st["slots"].values()) == [st["kid"]] == kids[dev], (dev, st, kids[dev])
        assert st["connects"] >= 2 and st["connect_failures"] == 0, (dev, st)
    # no batch refused by the ingest, nothing lost, one chain per device across its keys
    assert set(events(f)) <= {chain.DUPLICATE, rotation_ingest.CSR_TAKEN}, events(f)
    assert events(f)[rotation_ingest.CSR_TAKEN] == N + AGENTS
    held = chains(f)
    for dev, st in stats.items():
        # every batch the broker acknowledged is stored, seqs 1..last with no gap (one
        # in flight when the device stopped may be stored too)
        stored, last, missing = held[dev]
        assert st["published"] <= stored == last <= st["signed"] and missing == 0, \
            (dev, held[dev], st)
    # locked out: none; the old certificate is refused by the broker (a sample)
    for d in dirs[:3] + away[:2]:
        assert refused_at_the_broker(f, d / "first"), d
    for k, (a, dev) in enumerate(zip(agents, mps, strict=True)):
        log = a.log()
        assert "Traceback" not in log and "MemoryError" not in log, log
        assert sorted(p.name for p in dev.files.iterdir()) == [
            "cert.der.1", "fleet0.pub", "key.der.1", "key.der.slot"], (k, log)
        assert refused_at_the_broker(f, dev.first)
        assert kids[dev.id] == [_current_kid(dev)]


def _device_id(d: Path) -> str:
    return str(json.loads((d / "identity.json").read_text())["device_id"])


def _current_kid(dev: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    from cityedge_host.crypto import EcSigner

    key = serialization.load_der_private_key((dev.files / "key.der.1").read_bytes(), None)
    return EcSigner(key).kid.hex()  # type: ignore[arg-type]


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p
