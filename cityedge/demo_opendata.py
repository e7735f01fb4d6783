"""The last step of ``make demo``: the running city's web console and its open data.

The fleet the demo started publishes two of its three sites (``harbour`` and
``old-town``; ``ring-road`` stays private) and the demo devices' three reading kinds
through the public SensorThings API. This step checks that both answer, prints the
console's address with a token to sign in with and the SensorThings URL, and, when a
person is at the terminal, keeps the city running until Enter is pressed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

# the sites published (the demo's third site, ring-road, is not: its readings stay private)
SITES = {
    "harbour": {"name": "Harbour", "latitude": 59.3226542, "longitude": 18.0885131},
    "old-town": {"name": "Old Town", "latitude": 59.3251172, "longitude": 18.0710935},
}
# the simulated board's kinds (``cityedge.sim.DEFAULT_SENSORS``: an SHT3x named air, an ADC)
KINDS = {
    "air/temp": {"name": "Air temperature", "unit_name": "degree Celsius",
                 "unit_symbol": "Cel"},
    "air/humidity": {"name": "Relative humidity", "unit_name": "percent",
                     "unit_symbol": "%RH"},
    "noise": {"name": "Noise level", "unit_name": "decibel", "unit_symbol": "dB"},
}


class OpenDataDemoError(RuntimeError):
    """The console or the open data did not answer as the demo expects."""


def fleet_env(work: Path) -> dict[str, str]:
    """What the demo's fleet needs to publish open data: a new secret and the catalogue."""
    secret = work / "opendata.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    return {"CITYEDGE_OPENDATA_SECRET_FILE": str(secret),
            "CITYEDGE_OPENDATA_SITES": json.dumps(SITES),
            "CITYEDGE_OPENDATA_KINDS": json.dumps(KINDS)}


def _get(url: str, **params: Any) -> httpx.Response:
    resp = httpx.get(url, params=params, timeout=10)
    if resp.status_code != 200:
        raise OpenDataDemoError("GET %s answered %d: %s" % (url, resp.status_code,
                                                            resp.text[:200]))
    return resp


def main(con: Console, c: dict[str, Any], cityedge: Any) -> None:
    con.rule("[bold]the running city: its web console and its open data")
    url = c["url"]
    if "Sign in" not in _get(url + "/console/login").text:
        raise OpenDataDemoError("the console's sign-in page is not there")
    token = cityedge(["fleet", "create-token", "--name", "demo-console", "--role", "security"],
                     c["env"]).stdout.strip()
    sta = url + "/sta/v1.1"
    things = _get(sta + "/Things", **{"$count": "true"}).json()
    observations = _get(sta + "/Observations", **{"$count": "true", "$top": "3",
                                                  "$orderby": "phenomenonTime desc"}).json()
    if not observations.get("@iot.count"):
        raise OpenDataDemoError("the SensorThings API serves no observation of the demo's "
                                "readings")
    con.print("   SensorThings API: %d things at the public sites (%s), %d observations; "
              "ring-road's devices are not published" % (
                  things["@iot.count"], ", ".join(SITES), observations["@iot.count"]))
    for obs in observations["value"]:
        con.print("   %s  %s  (batch %s, signature %s)" % (
            obs["phenomenonTime"], obs["result"], obs["parameters"].get("batch"),
            obs["parameters"].get("signature")))
    con.print("\n[bold]web console[/bold]     %s/console/" % url)
    con.print("  sign in with     %s  (role security; made for this demo)" % token)
    con.print("[bold]SensorThings API[/bold] %s/Observations  (public, no token)" % sta)
    con.print("API docs         %s/docs" % url)
    if sys.stdin.isatty() and not os.environ.get("CI"):
        con.print("\nThe city keeps running for you: press Enter to stop it and clean up.")
        with contextlib.suppress(EOFError, KeyboardInterrupt):
            input()
    else:
        con.print("(not a terminal: the city is stopped now; run `make demo` in a terminal "
                  "to keep it running)")
