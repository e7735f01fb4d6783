"""Rotating the fleet's command key on the Pi gateway: the gateway as ``cityedge gateway
run`` builds it from its TOML (real key files, the real SQLite buffer, the offline root
that ``cityedge ca init`` makes), commands fed to its responder as the forwarder feeds
them from ``down/cmd``; the clock the gate and the trust store read is the test's.

A stolen fleet server holds the command key but not the root key: whatever it signs, the
set of keys the gateway obeys stays the root's, every refusal is answered with its
reason and counted. A proper rotation moves the gateway to the new key (kept across a
restart), and after the overlap the old key is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cityedge_core import command, cose, trust_statement
from cityedge_fleet.ca import ROOT_CERT, ROOT_KEY, init_ca
from cityedge_gateway.config import load_config
from cityedge_gateway.metrics import metrics_text, registry_for
from cityedge_gateway.service import Gateway
from cityedge_gateway.status import status_map
from cityedge_host.crypto import EcSigner, load_signer
from cityedge_host.fleet_trust import STATE_KEY, TrustStoreError

from support.gateway_trust import T0, Clock, Gw, point, site, statement

__all__ = ["site"]  # the fixture, used by name


def test_a_proper_rotation_moves_the_gateway_to_the_new_key(site: dict[str, Any]) -> None:
    root, old, clock = site["root"], site["old"], Clock()
    new = EcSigner.generate()
    gw = Gw(site["config"], clock)
    assert gw.obeys(old, clock) and not gw.obeys(new, clock)
    overlap_end = T0 + 3600
    r = gw.update(old, statement(root, 1, [(point(new), None), (point(old), overlap_end)]))
    assert r is not None and r.outcome == command.OK, r
    assert r.data == {"version": 1, "kids": [new.kid.hex(), old.kid.hex()]}
    assert gw.trust.stats.installed == 1
    assert gw.obeys(new, clock) and gw.obeys(old, clock)  # the overlap: both
    # the fleet resends it (its answer was lost): ok again, nothing changes
    again = gw.update(old, statement(root, 1, [(point(new), None), (point(old), overlap_end)]))
    assert again is not None and again.outcome == command.REFUSED  # another signature...
    first = bytes.fromhex(gw.responder.state.get(STATE_KEY))
    same = gw.update(old, first)  # ...but the very bytes installed are taken
    assert same is not None and same.outcome == command.OK
    assert "already installed" in same.detail and gw.trust.stats.installed == 1
    gw.close()

    gw = Gw(site["config"], clock)  # a restart: the installed statement holds
    assert gw.trust.version == 1
    assert gw.obeys(new, clock) and gw.obeys(old, clock)
    clock.now = overlap_end  # the overlap is over: the old key is refused, not answered
    assert gw.obeys(new, clock) and not gw.obeys(old, clock)
    assert gw.responder.stats.rejected == 1
    gw.close()


def test_a_stolen_fleet_server_cannot_install_its_own_key(site: dict[str, Any]) -> None:
    """The thief has the command key (and so the gate takes its trust-update) but not
    the root key."""
    old, clock = site["old"], Clock()
    thief = EcSigner.generate()
    gw = Gw(site["config"], clock)
    # signed by the command key itself, named as what it is
    own = trust_statement.encode_statement(old, old.kid, 9, [(point(thief), None)],
                                           T0 - 60, T0 + 3600)
    r = gw.update(old, own)
    assert r is not None and r.outcome == command.REFUSED
    assert "not by the root" in r.detail
    # signed by the command key, claiming to be the root's
    forged = trust_statement.encode_statement(old, site["root"].kid, 9,
                                              [(point(thief), None)], T0 - 60, T0 + 3600)
    r = gw.update(old, forged)
    assert r is not None and r.outcome == command.REFUSED and "signature" in r.detail
    # no statement at all: a bare key list
    r = gw.send(old, trust_statement.TRUST_UPDATE, {1: [point(thief)]})
    assert r is not None and r.outcome == command.REFUSED and "statement" in r.detail
    # a trust-update signed by the thief's own key is not even taken
    assert gw.update(thief, own) is None
    s = gw.trust.stats
    assert (s.not_root, s.bad_signature, s.malformed, s.installed) == (1, 1, 1, 0)
    assert gw.trust.version == 0 and gw.responder.state.get(STATE_KEY) is None
    assert gw.obeys(old, clock) and not gw.obeys(thief, clock)
    gw.close()


def test_a_statement_by_another_root_is_refused(site: dict[str, Any], tmp_path: Path) -> None:
    init_ca(tmp_path / "other-offline", tmp_path / "other-ca")
    other = load_signer(tmp_path / "other-offline" / ROOT_KEY)
    gw = Gw(site["config"], Clock())
    r = gw.update(site["old"], statement(other, 5, [(point(EcSigner.generate()), None)]))
    assert r is not None and r.outcome == command.REFUSED
    assert "not by the root %s" % site["root"].kid.hex() in r.detail
    assert gw.trust.stats.not_root == 1 and gw.trust.version == 0
    gw.close()


def test_a_replayed_older_statement_is_refused(site: dict[str, Any]) -> None:
    """v1 listed the old key; v2 dropped it (say, it was stolen). The thief still holds
    v1 and a key the gateway trusted under v1: replaying v1 does not bring it back."""
    root, old, clock = site["root"], site["old"], Clock()
    new = EcSigner.generate()
    v1 = statement(root, 1, [(point(old), None), (point(new), None)])
    v2 = statement(root, 2, [(point(new), None)])
    gw = Gw(site["config"], clock)
    assert gw.update(old, v1).outcome == command.OK  # type: ignore[union-attr]
    assert gw.update(new, v2).outcome == command.OK  # type: ignore[union-attr]
    assert not gw.obeys(old, clock)  # dropped at once: v2 gives it no overlap
    r = gw.update(new, v1)
    assert r is not None and r.outcome == command.REFUSED
    assert "replay or rollback" in r.detail
    v2_again = statement(root, 2, [(point(old), None)])  # same version, another set
    r = gw.update(new, v2_again)
    assert r is not None and r.outcome == command.REFUSED
    assert "replay or rollback" in r.detail
    assert gw.trust.stats.rollback == 2 and gw.trust.version == 2
    assert not gw.obeys(old, clock) and gw.obeys(new, clock)
    gw.close()


def test_an_expired_or_early_statement_is_refused(site: dict[str, Any]) -> None:
    root, old = site["root"], site["old"]
    keys = [(point(EcSigner.generate()), None)]
    gw = Gw(site["config"], Clock())
    r = gw.update(old, statement(root, 1, keys, nbf=T0 - 7200, exp=T0 - 1))
    assert r is not None and r.outcome == command.REFUSED and "expired" in r.detail
    r = gw.update(old, statement(root, 1, keys, nbf=T0 + 600, exp=T0 + 7200))
    assert r is not None and r.outcome == command.REFUSED and "not valid before" in r.detail
    assert gw.trust.stats.outside_window == 2 and gw.trust.version == 0
    gw.close()


@pytest.mark.parametrize("cut", ["empty", "truncated", "garbage", "oversized"])
def test_a_truncated_or_garbage_statement_is_refused_with_the_reason(
        site: dict[str, Any], cut: str) -> None:
    good = statement(site["root"], 1, [(point(EcSigner.generate()), None)])
    data, why = {
        "empty": (b"", "the statement (1) must be bytes"),
        "truncated": (good[:-7], "truncated"),
        "garbage": (b"\xd2\x84" + bytes(range(60)), "COSE"),
        "oversized": (good + bytes(trust_statement.STATEMENT_MAX_BYTES),
                      "statement over %d bytes" % trust_statement.STATEMENT_MAX_BYTES),
    }[cut]
    gw = Gw(site["config"], Clock())
    r = gw.update(site["old"], data)
    assert r is not None and r.outcome == command.REFUSED and why in r.detail, r
    assert gw.trust.stats.malformed == 1 and gw.trust.version == 0
    gw.close()


def test_without_a_root_certificate_the_keys_never_change(site: dict[str, Any]) -> None:
    gw = Gw(site["dir"] / "noroot.toml", Clock())
    r = gw.update(site["old"], statement(site["root"], 1, [(point(EcSigner.generate()),
                                                            None)]))
    assert r is not None and r.outcome == command.REFUSED and "root_cert" in r.detail
    assert gw.trust.stats.no_root == 1
    gw.close()


def test_a_store_whose_statement_the_root_does_not_sign_obeys_no_command(
        site: dict[str, Any], tmp_path: Path) -> None:
    """Fail closed: the gateway starts (readings go on) but trusts no fleet key, and says
    why in its status and metrics."""
    clock = Clock()
    gw = Gw(site["config"], clock)
    assert gw.update(site["old"], statement(site["root"], 1, [
        (point(site["old"]), None)])).outcome == command.OK  # type: ignore[union-attr]
    gw.close()
    init_ca(tmp_path / "o2", tmp_path / "c2")  # root_cert swapped for another root
    (site["dir"] / "root.crt").write_bytes((tmp_path / "c2" / ROOT_CERT).read_bytes())
    gw = Gw(site["config"], clock)
    assert "root_cert" in gw.trust.broken and gw.trust.trusted() == {}
    assert not gw.obeys(site["old"], clock)
    trust = status_map(gw.gw)["commands"]["trust"]
    assert trust["broken"] == gw.trust.broken and trust["kids"] == []
    assert "cityedge_gateway_fleet_trust_broken 1.0" in metrics_text(registry_for(gw.gw))
    gw.close()
    with pytest.raises(TrustStoreError, match="root_cert"):  # a configuration to fix
        Gateway(load_config(site["dir"] / "noroot.toml"))
    assert cose.kid_for_public_key(point(site["old"])) == site["old"].kid
