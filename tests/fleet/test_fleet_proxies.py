"""Client addresses: X-Forwarded-For is believed only from CITYEDGE_TRUSTED_PROXIES, by our
``client_address`` (audit source, rate limits) and by uvicorn in ``fleet serve``. Run for
real: ``cityedge fleet serve`` in a subprocess, requests over loopback."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlmodel import Session, col, select

from cityedge_fleet.auth import forwarded_client
from cityedge_fleet.config import Settings
from cityedge_fleet.db import make_engine
from cityedge_fleet.models import AuditRecord

from support.fleet import wait_for
from support.mosquitto import free_port
from support.procs import stop

BAD = {"Authorization": "Bearer not-a-token"}
PROXY_NETS = [ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("127.0.0.1/32")]


class Fleet:
    def __init__(self, base: str, db: Path) -> None:
        self.base = base
        self.db = db

    def get(self, path: str, headers: dict[str, str]) -> int:
        return httpx.get(self.base + path, headers=headers, timeout=10).status_code

    def login_sources(self) -> list[str]:
        """The source of every audited failed login, oldest first."""
        engine = make_engine(Settings(mode="development", database_url="sqlite:///%s" % self.db,
                                      ca_dir=self.db.parent))
        with Session(engine) as s:
            rows = s.exec(select(AuditRecord).where(AuditRecord.action == "auth.login")
                          .order_by(col(AuditRecord.id))).all()
        engine.dispose()
        return [r.source for r in rows]


@contextmanager
def fleet_serve(tmp_path: Path, ca_dir: Path, **env: str) -> Iterator[Fleet]:
    """``cityedge fleet serve`` as an operator runs it, on a free loopback port."""
    db = tmp_path / "fleet.sqlite3"
    port = free_port()
    full_env = dict(os.environ, CITYEDGE_MODE="development",
                    CITYEDGE_DATABASE_URL="sqlite:///%s" % db, CITYEDGE_CA_DIR=str(ca_dir),
                    CITYEDGE_INGEST_WITH_SERVE="false", **env)
    proc = subprocess.Popen([sys.executable, "-m", "cityedge.cli", "fleet", "serve", "--init-db",
                             "--port", str(port)], env=full_env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fleet = Fleet("http://127.0.0.1:%d" % port, db)

    def up() -> bool:
        try:
            return fleet.get("/health", {}) == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(up, timeout=30), proc.stderr.read().decode() if proc.stderr else ""
        yield fleet
    finally:
        stop(proc, 10)


def test_without_trusted_proxies_a_client_cannot_choose_its_audit_source(
        tmp_path: Path, ca_dirs: tuple[Path, Path]) -> None:
    """uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: any process on
    the fleet's host (or an unconfigured proxy's clients) could write any source into the
    audit log and spread its failures over fresh rate-limit buckets."""
    with fleet_serve(tmp_path, ca_dirs[1], CITYEDGE_LIMITS__AUTH_FAIL_BURST="3",
                     CITYEDGE_LIMITS__AUTH_FAIL_PER_S="0.0001") as fleet:  # no refill
        codes = [fleet.get("/devices", {**BAD, "X-Forwarded-For": "203.0.113.%d" % i})
                 for i in range(5)]
        assert codes == [401, 401, 401, 429, 429]  # one bucket: the real address
        assert fleet.login_sources() == ["127.0.0.1"] * 3


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(
        tmp_path: Path, ca_dirs: tuple[Path, Path]) -> None:
    # a refill of one token in ~3 hours: however slow the requests on a busy machine, the
    # counts below are the limiter's rule, not what a timer allowed
    with fleet_serve(tmp_path, ca_dirs[1], CITYEDGE_LIMITS__AUTH_FAIL_BURST="3",
                     CITYEDGE_LIMITS__AUTH_FAIL_PER_S="0.0001",
                     CITYEDGE_TRUSTED_PROXIES="127.0.0.1") as fleet:
        a = {**BAD, "X-Forwarded-For": "198.51.100.7"}
        # a client of the proxy forges a hop; the proxy appends the address it saw
        b = {**BAD, "X-Forwarded-For": "198.51.100.7, 198.51.100.8"}
        assert [fleet.get("/devices", a) for _ in range(4)] == [401, 401, 401, 429]
        assert [fleet.get("/devices", b) for _ in range(4)] == [401, 401, 401, 429]
        assert fleet.get("/devices", a) == 429  # still limited: its own bucket
        assert fleet.login_sources() == ["198.51.100.7"] * 3 + ["198.51.100.8"] * 3


IPV4 = st.ip_addresses(v=4).map(str)


@given(forged=st.lists(st.text(max_size=20) | IPV4, max_size=4),
       client=IPV4.filter(lambda a: not a.startswith(("10.0.0.", "127.0.0.1"))),
       proxies=st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "127.0.0.1"]), min_size=1,
                        max_size=3))
def test_a_client_behind_trusted_proxies_cannot_forge_its_address(
        forged: list[str], client: str, proxies: list[str]) -> None:
    """The proxies append, right to left: the client's own address, then each proxy's but
    the last (the TCP peer). Whatever the client wrote itself stays on the left."""
    hops = [h for h in forged if "," not in h] + [client] + proxies[:-1]
    assert forwarded_client(proxies[-1], [", ".join(hops)], PROXY_NETS) == client


@given(peer=IPV4.filter(lambda a: not a.startswith(("10.0.0.", "127.0.0.1"))),
       forwarded=st.lists(st.text(max_size=30), max_size=3))
def test_an_untrusted_peer_is_the_client_whatever_it_forwards(
        peer: str, forwarded: list[str]) -> None:
    assert forwarded_client(peer, forwarded, PROXY_NETS) == peer
    assert forwarded_client(peer, forwarded, []) == peer


def test_a_chain_of_trusted_hops_names_its_first() -> None:
    assert forwarded_client("10.0.0.1", ["10.0.0.9, 10.0.0.2"], PROXY_NETS) == "10.0.0.9"
    assert forwarded_client("10.0.0.1", [], PROXY_NETS) == "10.0.0.1"
    assert forwarded_client("10.0.0.1", ["a" * 100], PROXY_NETS) == "a" * 64


@pytest.mark.parametrize("value", ["*", "proxy.example", "10.0.0.1/8"])
def test_only_addresses_and_networks_can_be_trusted(value: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYEDGE_TRUSTED_PROXIES", value)
    with pytest.raises(ValueError, match="is not an IP address or network"):
        Settings(mode="development")
