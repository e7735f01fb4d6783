"""``/ready``: is this fleet process able to do its work, component by component.

``/health`` is liveness only (the process answers; a supervisor restarts it when it does
not). ``/ready`` is what a load balancer or an operator asks before sending traffic, and
it answers 503 unless every component it can judge is ready:

- ``database``: a ``SELECT 1`` on the service's engine answers;
- ``ca``: the CA directory loads (root certificate, the signing intermediate and its key);
- ``crl``: the published CRL file parses and every CRL in it is current (now before its
  nextUpdate); its age (seconds since the oldest thisUpdate) and the seconds left are
  reported, so an alert can fire before devices and the broker see a stale CRL;
- ``ingest``: the ingest worker of this process is connected and subscribed; ``null`` when
  this process runs none (``--no-ingest``, tests): not known here, so not a failure.

Nothing secret is in the answer: no paths, URLs or error texts (the log has those), only
each component's ``ok`` and a short fixed ``detail``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import Engine, text

from cityedge_fleet.ca import ROOT_CERT, CaError, load_current
from cityedge_fleet.config import Settings

log = logging.getLogger(__name__)
Component = dict[str, Any]


def database(engine: Engine) -> Component:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # any driver failure means: not ready
        log.warning("ready: database not answering: %s", str(e).splitlines()[0] if str(e)
                    else type(e).__name__)
        return {"ok": False, "detail": "not answering"}
    return {"ok": True}


def ca_and_crl(settings: Settings, now: dt.datetime | None = None) -> tuple[Component,
                                                                           Component]:
    now = now or dt.datetime.now(dt.UTC)
    if not (settings.ca_dir / ROOT_CERT).is_file():
        return {"ok": False, "detail": "missing"}, {"ok": False, "detail": "no CA"}
    try:
        ca = load_current(settings.ca_dir)
    except CaError as e:
        log.warning("ready: CA not loadable: %s", e)
        return {"ok": False, "detail": "incomplete"}, {"ok": False, "detail": "no CA"}
    crls = ca.published_crls()
    if crls is None:
        return {"ok": True}, {"ok": False, "detail": "missing"}
    oldest = min(c.last_update_utc for c in crls)
    nexts = [c.next_update_utc for c in crls]
    first_next = min(n for n in nexts if n is not None) if any(nexts) else None
    crl: Component = {"ok": first_next is not None and now < first_next,
                      "age_s": int((now - oldest).total_seconds()),
                      "expires_in_s": (int((first_next - now).total_seconds())
                                       if first_next is not None else None)}
    if not crl["ok"]:
        crl["detail"] = "expired"
    return {"ok": True}, crl


def ingest(worker: Any) -> Component:
    if worker is None:
        return {"ok": None, "detail": "not run by this process"}
    if worker.subscribed.is_set():
        return {"ok": True}
    return {"ok": False, "detail": "not connected to the broker"}


def check(engine: Engine, settings: Settings, worker: Any) -> tuple[bool, dict[str, Any]]:
    """(ready, the answer's body)."""
    ca, crl = ca_and_crl(settings)
    components = {"database": database(engine), "ca": ca, "crl": crl,
                  "ingest": ingest(worker)}
    ready = all(c["ok"] is not False for c in components.values())
    return ready, {"status": "ready" if ready else "not ready", "components": components}
