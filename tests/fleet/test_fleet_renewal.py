"""Automatic renewal (``cityedge_fleet.renewal``) with an injected clock: the due date at
about 2/3 of the lifetime with per-certificate jitter (a fleet enrolled in one day renews
over days, not in one minute), rounds bounded, a device offline at renewal renews when it
returns (by the ordinary rotation: a new key), one whose certificate expired is flagged
once, audited and never renewed by the fleet, and the key report shows it all."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlmodel import Session, col, select

from cityedge_fleet import command_key, renewal
from cityedge_fleet.campaign_runner import CampaignRunner
from cityedge_fleet.config import Settings
from cityedge_fleet.models import AuditRecord, Credential, CredentialStatus, KeyRotation
from cityedge_fleet.renewal import RenewalLimits

from support.campaign_sim import SimFleet

DAY = dt.timedelta(days=1)
T0 = dt.datetime(2026, 9, 1, 8, 0, tzinfo=dt.UTC)  # the day the fleet was enrolled


def cred(serial: str, days: int = 90) -> Credential:
    return Credential(device_id="d", serial=serial, kid="00", public_key="00",
                      not_before=T0, not_after=T0 + days * DAY, cert_pem="")


def test_due_dates_spread_around_two_thirds_of_the_lifetime() -> None:
    dues = [renewal.due_at(cred("%032x" % (i * 7919 + 1))) for i in range(1000)]
    offsets = sorted((d - T0).total_seconds() / 86400 for d in dues)
    assert offsets[0] >= 60 - 7.5 and offsets[-1] < 60 + 7.5  # 2/3 of 90 days, ±1/12
    assert offsets[-1] - offsets[0] > 14  # spread over about 15 days
    per_day = [sum(1 for o in offsets if k <= o < k + 1) for k in range(52, 68)]
    assert max(per_day) < 120  # ~67 a day: no day gets the fleet
    assert renewal.due_at(cred("abc")) == renewal.due_at(cred("abc"))  # fixed per cert
    assert renewal.due_at(cred("abc", days=30)) - T0 < 30 * DAY * 0.75


@pytest.fixture
def sim(api_settings_engine: tuple[Settings, Any]) -> SimFleet:
    settings, engine = api_settings_engine
    return SimFleet(engine, settings)


def rotations(sim: SimFleet) -> list[tuple[str, str, str]]:
    with Session(sim.engine) as s:
        return [(r.device_id, str(r.state), r.created_by) for r in s.exec(
            select(KeyRotation).order_by(col(KeyRotation.id)))]


def test_renewal_rounds_offline_devices_and_expired_certificates(sim: SimFleet) -> None:
    now = dt.datetime.now(dt.UTC)
    fresh = sim.add_devices(3, issued=now - 10 * DAY)  # due in ~50 days
    due = sim.add_devices(5, issued=now - 80 * DAY, first=10)  # due (at ≤ 67.5 days)
    gone = sim.add_devices(1, issued=now - 95 * DAY, first=20)  # expired while away
    away = due[4]
    sim.devices[away].online = False
    run = CampaignRunner(sim.engine, sim.settings, command_key.from_settings(sim.settings),
                         rlim=RenewalLimits(round_max=3))
    first = run.round(now, renewal_due=True).renewal
    assert first is not None
    assert (first.due, len(first.started), first.flagged) == (5, 3, gone)
    second = run.round(now, renewal_due=True).renewal
    assert second is not None and second.due == 2 and len(second.started) == 2
    third = run.round(now, renewal_due=True).renewal
    assert third is not None and (third.due, third.started, third.flagged) == (0, [], [])
    assert {d for d, _, by in rotations(sim)} == set(due) and \
        {by for _, _, by in rotations(sim)} == {"renewal"}
    for _ in range(4):
        sim.step()
    states = {d: st for d, st, _ in rotations(sim)}
    assert states == {**{d: "old-revoked" for d in due if d != away}, away: "sent"}
    for d in due[:4]:
        assert sim.devices[d].rotations == 1  # a new key
    # the device comes back: its rotate command is sent again and it renews
    sim.come_back([away])
    for _ in range(4):
        sim.step()
    assert {d: st for d, st, _ in rotations(sim)}[away] == "old-revoked"
    assert all(sim.devices[d].rotations == 0 for d in fresh + gone)
    # a renewed device is not due again before 2/3 of its new certificate's life
    assert run.round(now + 40 * DAY, renewal_due=True).renewal.due == 0  # type: ignore[union-attr]
    with Session(sim.engine) as s:
        flags = renewal.expired_flags(s)
        assert [(f.device_id, f.serial) for f in flags] == [(gone[0], "ca%030x" % 20)]
        rows = s.exec(select(AuditRecord).where(AuditRecord.action == "renewal.expired")).all()
        assert [(r.target, r.outcome, r.actor) for r in rows] == [(gone[0], "refused",
                                                                    "renewal")]
        assert "technician" in rows[0].detail
        got = renewal.key_report(s, now=now)
        by_id = {d["device_id"]: d for d in got["devices"]}
        assert by_id[gone[0]]["status"] == "expired"
        assert {by_id[d]["status"] for d in due} == {"ok"}
        assert got["summary"]["expired"] == 1 and got["summary"]["overdue"] == 0
        creds = s.exec(select(Credential).where(col(Credential.device_id).in_(due))).all()
        assert sum(c.status == CredentialStatus.revoked for c in creds) == 5


def test_a_failed_renewal_waits_before_the_next(sim: SimFleet) -> None:
    now = dt.datetime.now(dt.UTC)
    dev = sim.add_devices(1, issued=now - 80 * DAY)[0]
    sim.devices[dev].refuse = True
    run = CampaignRunner(sim.engine, sim.settings, command_key.from_settings(sim.settings))
    assert run.round(now, renewal_due=True).renewal.started == [dev]  # type: ignore[union-attr]
    sim.step()
    assert rotations(sim) == [(dev, "failed", "renewal")]
    assert run.round(now, renewal_due=True).renewal.due == 0  # type: ignore[union-attr]
    later = now + 1.01 * DAY
    assert run.round(later, renewal_due=True).renewal.started == [dev]  # type: ignore[union-attr]


def test_the_report_lists_overdue_devices(sim: SimFleet) -> None:
    now = dt.datetime.now(dt.UTC)
    sim.add_devices(2, issued=now - 5 * DAY)
    late = sim.add_devices(1, issued=now - 85 * DAY, first=9)
    with Session(sim.engine) as s:
        got = renewal.key_report(s, now=now)
    assert got["summary"] == {"devices": 3, "no_certificate": 0, "overdue": 1, "expired": 0,
                              "rotating": 0, "due_30d": 0}
    row = next(d for d in got["devices"] if d["device_id"] == late[0])
    assert row["status"] == "overdue" and row["key_age_days"] == 85.0
    assert row["expires_in_days"] == 5.0


def test_renewal_leaves_a_device_to_the_campaign_that_will_rotate_it(sim: SimFleet) -> None:
    from cityedge_fleet import campaign_store

    now = dt.datetime.now(dt.UTC)
    ids = sim.add_devices(4, issued=now - 80 * DAY)  # all due
    with Session(sim.engine) as s:
        camp, _ = campaign_store.create(s, selector_text="all", wave_size=2,
                                        max_failures="0", by="test", confirmed=False)
        s.commit()
        got = renewal.renewal_round(s, signer=command_key.from_settings(sim.settings),
                                    lim=sim.settings.limits, now=now)
        s.commit()
        assert (got.due, got.started) == (0, [])  # the campaign's, waiting for their wave
        campaign_store.act(s, camp.id or 0, "abort", by="test")
        s.commit()
        got = renewal.renewal_round(s, signer=command_key.from_settings(sim.settings),
                                    lim=sim.settings.limits, now=now)
        assert sorted(got.started) == ids  # an aborted campaign rotates nothing more
