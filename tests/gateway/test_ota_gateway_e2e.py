"""The gateway's update, end to end on CPython: real processes started as systemd starts
them (``support.systemd_sim`` runs the unit file's ``ExecStartPre`` boot guard and its
``ExecStart`` through ``current``, and restarts on failure), a real TLS Mosquitto, a
release fetched from a real HTTPS server.

- healthy: the new release reaches the broker with its certificate, its beacon batch is
  acknowledged, it commits and says so in its signed status;
- never healthy (the link to the broker is down during the trial): it rolls back at its
  deadline, exits 76, and systemd's restart runs the previous release, which reports the
  rollback and its reason in its signed status;
- a release that crashes at every start is rolled back by the boot guard after
  ``trial_max_starts`` starts.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cityedge_core import batch, cbor, cose, topics
from cityedge_gateway import ota_state as s
from cityedge_gateway.ota_health import BEACON_NAME
from cityedge_gateway.ota_install import EXIT_ROLLED_BACK, Installer

from support.artifact_server import ArtifactServer
from support.fleet import wait_for
from support.gateway import GW
from support.linkproxy import LinkProxy
from support.mosquitto import OBSERVER, Mosquitto, TestPKI, free_port
from support.mqtt_probe import Probe
from support.releases import artifact, copy_build, factory_image, release_of
from support.systemd_sim import ServiceSim

UNIT = Path(__file__).resolve().parents[2] / "gateway" / "cityedge-gateway.service"
WAIT_S = 30.0


@dataclass
class Site:
    root: Path
    config: Path
    starts: Path
    log: Path
    link: LinkProxy  # the gateway's way to the broker
    metrics_port: int

    def record(self) -> s.UpdateRecord:
        return Installer(self.root).record()

    def started(self) -> list[str]:
        """The release of each start, in order (``crash`` for a start that crashed)."""
        if not self.starts.exists():
            return []
        return [line.split()[0] + (" crash" if line.endswith("crash") else "")
                for line in self.starts.read_text().splitlines()]

    def current(self) -> str:
        return Path(os.readlink(self.root / "current")).name


@pytest.fixture
def site(tmp_path: Path, pki: TestPKI, mosquitto: Mosquitto) -> Iterator[Site]:
    creds = pki.issue_client(GW)
    creds.key_pem.chmod(0o600)
    mosquitto.grant(GW)
    root = tmp_path / "opt-cityedge"
    root.mkdir()
    starts = tmp_path / "starts.log"
    factory_image(root, "1.0.0", 1, starts)
    config = tmp_path / "gateway.toml"
    link = LinkProxy(mosquitto.port).start()
    metrics_port = free_port()
    config.write_text("""
[gateway]
device = "%s"
key_file = "%s"
batch_readings = 10
batch_max_age_s = 0.5

[store]
path = "buffer.sqlite"
budget_bytes = 10_000_000

[broker]
host = "127.0.0.1"
port = %d
ca_file = "%s"
cert_file = "%s"
key_file = "%s"
keepalive_s = 5

[metrics]
port = %d

[update]
root = "%s"
trial_deadline_s = 5
trial_max_starts = 2
""" % (GW, creds.key_pem, link.port, pki.ca_pem, creds.cert_pem, creds.key_pem, metrics_port,
       root))
    yield Site(root, config, starts, tmp_path / "service.log", link, metrics_port)
    link.close()


def install(site: Site, pki: TestPKI, crash: bool = False) -> None:
    """What the running release does when told to update: fetch, build, switch to trial."""
    body = artifact("2.0.0", site.starts, crash=crash)
    with ArtifactServer(pki, body) as server:
        rel = release_of(body, "2.0.0", 2, server.url)
        rec = Installer(site.root, build=copy_build, trial_max_starts=2).update(
            rel, ca_file=pki.ca_pem)
    assert (rec.state, site.current()) == (s.TRIAL, "2.0.0")


@pytest.fixture
def observer(pki: TestPKI, mosquitto: Mosquitto) -> Iterator[Probe]:
    probe = Probe(mosquitto, pki.service(OBSERVER), client_id="ota-observer")
    assert probe.subscribe("ce/v1/%s/up/#" % GW)
    yield probe
    probe.close()


@pytest.fixture
def service(site: Site) -> Iterator[list[ServiceSim]]:
    started: list[ServiceSim] = []
    yield started
    for sim in started:
        sim.stop()


def run_service(site: Site, started: list[ServiceSim]) -> ServiceSim:
    sim = ServiceSim(UNIT, {"/opt/cityedge": str(site.root),
                            "/etc/cityedge/gateway.toml": str(site.config)}, site.log)
    started.append(sim.start())
    return sim


def statuses(probe: Probe) -> list[dict[str, object]]:
    out = []
    for topic, payload in list(probe.messages):
        if topic == topics.up(GW, topics.STATUS):
            _kid, _prot, body, _sig = cose.split_sign1(payload, 8192)
            out.append(cbor.loads(bytes(body)))
    return out


def batches(probe: Probe) -> list[batch.Batch]:
    return [batch.Batch.decode(bytes(cose.split_sign1(p, 65536)[2]))
            for t, p in list(probe.messages) if t == topics.up(GW, topics.READINGS)]


def test_a_healthy_release_commits_and_says_so(
        site: Site, pki: TestPKI, observer: Probe, service: list[ServiceSim]) -> None:
    install(site, pki)
    sim = run_service(site, service)
    assert wait_for(lambda: site.record().state == s.COMMITTED, WAIT_S), site.log.read_text()
    rec = site.record()
    assert (rec.installed_version, rec.installed_sequence, rec.trial_starts) == ("2.0.0", 2, 1)
    assert site.started() == ["2.0.0"] and site.current() == "2.0.0"
    observer.wait_for(lambda: any(st.get("update", {}).get("state") == s.COMMITTED  # type: ignore[union-attr]
                                  for st in statuses(observer)), "a status saying committed")
    beacon = [r for b in batches(observer) for r in b.records if r.get(0) == BEACON_NAME]
    assert [r[2] for r in beacon] == [2]  # the beacon batch, value = the sequence
    url = "http://127.0.0.1:%d/metrics" % site.metrics_port
    metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'cityedge_gateway_update_state{state="committed",version="2.0.0"} 1.0' in metrics
    assert 'cityedge_gateway_update_installed_sequence{version="2.0.0"} 2.0' in metrics
    assert sim.exits == []  # still running: no restart


def test_a_release_that_never_gets_healthy_rolls_back_and_reports_why(
        site: Site, pki: TestPKI, observer: Probe, service: list[ServiceSim]) -> None:
    install(site, pki)
    site.link.cut(refuse=True)  # the new release cannot reach the broker
    sim = run_service(site, service)
    assert wait_for(lambda: len(site.started()) == 2, WAIT_S), site.log.read_text()
    # systemd's restart ran the previous one (the log says why when it did not)
    assert site.started() == ["2.0.0", "1.0.0"], (sim.exits, site.log.read_text())
    assert sim.exits == [EXIT_ROLLED_BACK]
    rec = site.record()
    assert rec.state == s.ROLLED_BACK and site.current() == "1.0.0"
    assert rec.reason.startswith("no health within 5 s: the broker was never reached")
    assert rec.installed_sequence == 1
    site.link.restore()  # the old release reaches the broker and tells the fleet why
    observer.wait_for(lambda: any(
        st.get("update", {}).get("state") == s.ROLLED_BACK  # type: ignore[union-attr]
        and "never reached" in st["update"]["reason"]  # type: ignore[index]
        for st in statuses(observer)), "a status saying rolled-back, with the reason")


def test_a_release_that_crashes_at_every_start_is_rolled_back_by_the_boot_guard(
        site: Site, pki: TestPKI, service: list[ServiceSim]) -> None:
    install(site, pki, crash=True)
    sim = run_service(site, service)
    assert wait_for(lambda: len(site.started()) == 3, WAIT_S), site.log.read_text()
    assert site.started() == ["2.0.0 crash", "2.0.0 crash", "1.0.0"]
    assert sim.exits == [3, 3]
    rec = site.record()
    assert (rec.state, rec.reason) == (s.ROLLED_BACK,
                                       "2 starts in trial without a commit (limit 2)")
    assert site.current() == "1.0.0"
