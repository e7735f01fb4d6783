"""``/health`` (liveness) and ``/ready`` (each component: database, CA, CRL and its age,
the ingest worker): a missing CA, a missing or expired CRL and an ingest that cannot reach
its broker are not ready (503), while the process stays alive (``/health`` 200). Before,
``/health`` said ok with the CA directory gone."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from cityedge_fleet import readiness
from cityedge_fleet.ca import CRL_FILE
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.ingest_mqtt import MqttIngestWorker

from support.fleet import Api
from support.mosquitto import TestPKI, free_port


def test_a_fleet_with_everything_in_place_is_ready(api: Api) -> None:
    r = api.client.get("/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    c = body["components"]
    assert c["database"] == {"ok": True} and c["ca"] == {"ok": True}
    assert c["crl"]["ok"] is True and c["crl"]["age_s"] >= 0
    assert 0 < c["crl"]["expires_in_s"] <= api.settings.limits.crl_validity_s
    assert c["ingest"] == {"ok": None, "detail": "not run by this process"}
    assert str(api.settings.ca_dir) not in r.text  # no paths in a public answer


def test_a_missing_ca_is_alive_but_not_ready(api: Api) -> None:
    shutil.rmtree(api.settings.ca_dir)
    assert api.client.get("/health").json() == {"status": "ok"}
    r = api.client.get("/ready")
    assert r.status_code == 503
    assert r.json()["status"] == "not ready"
    assert r.json()["components"]["ca"] == {"ok": False, "detail": "missing"}
    assert r.json()["components"]["database"] == {"ok": True}


def test_a_missing_crl_is_not_ready(api: Api) -> None:
    (api.settings.ca_dir / CRL_FILE).unlink()
    r = api.client.get("/ready")
    assert r.status_code == 503
    assert r.json()["components"]["crl"] == {"ok": False, "detail": "missing"}
    assert r.json()["components"]["ca"] == {"ok": True}


def test_a_crl_past_its_next_update_is_not_ready(api: Api) -> None:
    """Judged at a time after the CRL's nextUpdate (the clock is the caller's: no wait)."""
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=api.settings.limits.crl_validity_s
                                                     + 60)
    ca, crl = readiness.ca_and_crl(api.settings, now=later)
    assert ca == {"ok": True}
    assert crl["ok"] is False and crl["detail"] == "expired" and crl["expires_in_s"] < 0


def test_an_ingest_that_cannot_reach_its_broker_is_not_ready(api: Api, tmp_path: Path) -> None:
    """A real ingest worker pointed at a closed port: the process is alive, not ready."""
    pki = TestPKI(tmp_path / "pki")
    client = pki.issue_client("fleet-ingest")
    settings = api.settings.model_copy(update={
        "mqtt_port": free_port(), "mqtt_ca_file": pki.ca_pem,
        "mqtt_cert_file": client.cert_pem, "mqtt_key_file": client.key_pem})
    worker = MqttIngestWorker(Ingestor(api.engine, settings), settings).start()
    try:
        api.client.app.state.ingest_worker = worker  # type: ignore[attr-defined]
        r = api.client.get("/ready")
        assert r.status_code == 503
        assert r.json()["components"]["ingest"] == {"ok": False,
                                                    "detail": "not connected to the broker"}
        assert api.client.get("/health").status_code == 200
    finally:
        worker.stop()
