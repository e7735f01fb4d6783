"""The Pi gateway's trust store at enrollment and at start, attacked: the gateway as
``cityedge gateway run`` builds it from its TOML (real key files, the real SQLite buffer,
the offline root ``cityedge ca init`` makes), the enrollment answer installed as
``cityedge gateway install-trust`` installs it (``enroll_trust``), commands fed to its
responder (``support.gateway_trust``).

Enrollment: the fleet's newest statement is installed before the first start (the new
key obeyed at once); a forged, not-the-root's, garbage, rolled-back or out-of-window one
is refused with the reason and nothing is written. Start: a tampered statement, a
rolled-back or emptied state, or a garbage version mark makes the gateway obey no fleet
command (fail closed), said in its status and metrics; a technician mends it by
installing the fleet's statement again; ``cityedge gateway run --check`` says so first.
A key whose end passed while the gateway was off is not obeyed."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cityedge_core import cbor, command, trust_statement
from cityedge_fleet.ca import ROOT_KEY, init_ca
from cityedge_gateway.config import load_config
from cityedge_gateway.enroll_trust import GatewayEnrollmentError, install_enrollment
from cityedge_gateway.metrics import metrics_text, registry_for
from cityedge_gateway.preflight import check
from cityedge_gateway.status import status_map
from cityedge_host.crypto import EcSigner, load_signer
from cityedge_host.fleet_trust import STATE_KEY

from support.fleet import wait_for
from support.gateway_trust import T0, Clock, Gw, point, site, statement
from support.procs import stop

__all__ = ["site"]  # the fixture, used by name

ROW = "cmd:" + STATE_KEY  # the statement's row in the buffer's meta table


def answer(data: bytes | None) -> dict[str, Any]:
    """The fields of a fleet's enrollment answer the install reads."""
    return {"trust_statement": None if data is None else base64.b64encode(data).decode()}


def enroll(site: dict[str, Any], data: bytes | None) -> str:
    return install_enrollment(load_config(site["config"]), answer(data))


def buffer(site: dict[str, Any]) -> Path:
    return Path(site["dir"]) / "buffer.sqlite"


def stored(site: dict[str, Any]) -> Any:
    with sqlite3.connect(buffer(site)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (ROW,)).fetchone()
    return None if row is None else cbor.loads(bytes(row[0]))


def assert_broken(gw: Gw, why: str, clock: Clock, *keys: EcSigner) -> None:
    """Fail closed: no key trusted, no command obeyed, the reason in status and metrics."""
    assert why in gw.trust.broken, gw.trust.broken
    assert gw.trust.trusted() == {}
    for k in keys:
        assert not gw.obeys(k, clock)
    trust = status_map(gw.gw)["commands"]["trust"]
    assert trust["broken"] == gw.trust.broken and trust["kids"] == []
    assert "cityedge_gateway_fleet_trust_broken 1.0" in metrics_text(registry_for(gw.gw))


def test_a_gateway_enrolled_after_a_rotation_obeys_the_new_key_at_once(
        site: dict[str, Any]) -> None:
    root, old, clock = site["root"], site["old"], Clock()
    new = EcSigner.generate()
    v1 = statement(root, 1, [(point(new), None), (point(old), T0 + 3600)])
    said = enroll(site, v1)
    assert said == "trust statement v1 installed: fleet keys %s, %s" % (new.kid.hex(),
                                                                         old.kid.hex())
    gw = Gw(site["config"], clock)  # the first start
    assert gw.trust.version == 1 and not gw.trust.broken
    assert gw.obeys(new, clock) and gw.obeys(old, clock)  # the overlap, as the fleet's
    assert "cityedge_gateway_fleet_trust_broken 0.0" in metrics_text(registry_for(gw.gw))
    gw.close()
    assert enroll(site, v1).startswith("trust statement v1 already installed")  # again: ok
    assert enroll(site, None).startswith("no trust statement")  # before any rotation
    assert (Path(site["dir"]) / "buffer.sqlite.trust").read_text() == "1\n"


def test_the_install_trust_command_says_what_it_installed(
        site: dict[str, Any], tmp_path: Path) -> None:
    new = EcSigner.generate()
    saved = tmp_path / "enrolled.json"
    saved.write_text(json.dumps(answer(statement(site["root"], 3, [(point(new), None)]))))
    run = subprocess.run([sys.executable, "-m", "cityedge.cli", "gateway", "install-trust",
                          str(saved), "--config", str(site["config"])],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "trust statement v3 installed: fleet keys %s\n" % new.kid.hex()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cityedge.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_install_trust_refuses_while_the_gateway_runs_on_the_buffer(
        site: dict[str, Any], tmp_path: Path) -> None:
    """``cityedge gateway run`` (a real process) holds its buffer: ``install-trust`` on it
    is refused, naming the process and saying to stop the service, and writes nothing; a
    second ``gateway run`` on it is refused too. Once the service is stopped the install
    goes through."""
    new = EcSigner.generate()
    saved = tmp_path / "enrolled.json"
    saved.write_text(json.dumps(answer(statement(site["root"], 1, [(point(new), None)]))))
    config = str(site["config"])
    log = tmp_path / "gateway.log"
    with log.open("w") as err:
        running = subprocess.Popen([sys.executable, "-m", "cityedge.cli", "gateway", "run",
                                    "--config", config], stdout=err, stderr=err)
    try:
        assert wait_for(lambda: " running: " in log.read_text() or running.poll() is not None,
                        60), log.read_text()
        assert running.poll() is None, log.read_text()
        refused = _cli("gateway", "install-trust", str(saved), "--config", config)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stderr.startswith("cityedge: the buffer %s is in use by a running "
                                          "gateway (process %d)" % (buffer(site), running.pid)
                                          ), refused.stderr
        assert "stop the gateway service first" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert stored(site) is None  # nothing written under the running gateway
        assert not (Path(site["dir"]) / "buffer.sqlite.trust").exists()
        second = _cli("gateway", "run", "--config", config)
        assert second.returncode == 1 and "process %d" % running.pid in second.stderr, (
            second.stderr)
        assert running.poll() is None  # the first runs on
    finally:
        stop(running)
    assert running.returncode == 0, log.read_text()
    done = _cli("gateway", "install-trust", str(saved), "--config", config)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "trust statement v1 installed: fleet keys %s\n" % new.kid.hex()
    assert stored(site) is not None


@pytest.mark.parametrize("attack", ["other-root", "command-key", "forged-kid", "garbage",
                                    "not-base64", "expired"])
def test_a_forged_statement_at_enrollment_is_refused(
        site: dict[str, Any], tmp_path: Path, attack: str) -> None:
    """A thief on the fleet server (its database, its answers) hands a gateway being
    enrolled a statement of its own: refused, nothing written, the seed key alone."""
    old, thief = site["old"], EcSigner.generate()
    keys = [(point(thief), None)]
    init_ca(tmp_path / "other-offline", tmp_path / "other-ca")
    other = load_signer(tmp_path / "other-offline" / ROOT_KEY)
    data, why = {
        "other-root": (statement(other, 9, keys), "not by the root"),
        "command-key": (statement(old, 9, keys), "not by the root"),
        "forged-kid": (trust_statement.encode_statement(old, site["root"].kid, 9, keys,
                                                        T0 - 60, T0 + 600), "signature"),
        "garbage": (b"\xd2\x84" + bytes(range(60)), "COSE"),
        "not-base64": (None, "not base64"),
        "expired": (statement(site["root"], 9, keys, nbf=T0 - 7200, exp=T0 - 1), "expired"),
    }[attack]
    ans = answer(data) if data is not None else {"trust_statement": "!!not base64!!"}
    with pytest.raises(GatewayEnrollmentError, match=why) as e:
        install_enrollment(load_config(site["config"]), ans)
    assert "refused" in str(e.value) or "not base64" in str(e.value)
    assert stored(site) is None
    assert not (Path(site["dir"]) / "buffer.sqlite.trust").exists()
    clock = Clock()
    gw = Gw(site["config"], clock)
    assert gw.trust.version == 0 and not gw.trust.broken
    assert gw.obeys(old, clock) and not gw.obeys(thief, clock)
    gw.close()


def test_without_a_root_certificate_an_enrollment_statement_is_refused(
        site: dict[str, Any]) -> None:
    v1 = statement(site["root"], 1, [(point(EcSigner.generate()), None)])
    with pytest.raises(GatewayEnrollmentError, match="root_cert"):
        install_enrollment(load_config(Path(site["dir"]) / "noroot.toml"), answer(v1))
    assert stored(site) is None


def test_a_rolled_back_statement_at_enrollment_is_refused(site: dict[str, Any]) -> None:
    """Re-enrolling a gateway that holds v2 with an answer carrying v1 (which still lists
    the key v2 retired) is refused; v2 stays."""
    root, old, clock = site["root"], site["old"], Clock()
    new = EcSigner.generate()
    v1 = statement(root, 1, [(point(old), None), (point(new), None)])
    v2 = statement(root, 2, [(point(new), None)])
    enroll(site, v2)
    with pytest.raises(GatewayEnrollmentError, match="replay or rollback"):
        enroll(site, v1)
    assert stored(site) == v2.hex()
    gw = Gw(site["config"], clock)
    assert gw.trust.version == 2 and gw.obeys(new, clock) and not gw.obeys(old, clock)
    gw.close()


def test_a_tampered_statement_at_start_obeys_no_command_until_mended(
        site: dict[str, Any]) -> None:
    root, old, clock = site["root"], site["old"], Clock()
    new, thief = EcSigner.generate(), EcSigner.generate()
    v1 = statement(root, 1, [(point(new), None)])
    enroll(site, v1)
    # the thief with write access to the buffer swaps its own key into the statement
    tampered = v1.replace(point(new), point(thief))
    assert tampered != v1
    with sqlite3.connect(buffer(site)) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = ?",
                   (cbor.dumps(tampered.hex()), ROW))
    fails = [f.what for f in check(load_config(site["config"])) if f.level == "fail"]
    assert len(fails) == 1 and "trust store" in fails[0] and "tampered" in fails[0], fails
    gw = Gw(site["config"], clock)
    assert_broken(gw, "tampered with", clock, thief, new, old)
    assert "signature" in gw.trust.broken
    gw.close()
    with sqlite3.connect(buffer(site)) as db:  # not even hex
        db.execute("UPDATE meta SET value = ? WHERE key = ?", (cbor.dumps("zz"), ROW))
    gw = Gw(site["config"], clock)
    assert_broken(gw, "not hex", clock, new, old)
    gw.close()
    # the technician installs the fleet's newest statement again: the gateway is mended
    assert enroll(site, v1).startswith("trust statement v1 installed")
    assert "trust store: statement v1 installed, 1 fleet keys trusted now" in [
        f.what for f in check(load_config(site["config"])) if f.level == "ok"]
    gw = Gw(site["config"], clock)
    assert not gw.trust.broken and gw.obeys(new, clock) and not gw.obeys(old, clock)
    gw.close()


@pytest.mark.parametrize("how", ["older-copy", "statement-removed", "mark-garbage"])
def test_a_rolled_back_state_at_start_obeys_no_command(site: dict[str, Any], tmp_path: Path,
                                                       how: str) -> None:
    """v1 trusted the old key; v2 retired it (stolen). A buffer restored from a copy made
    under v1 (or one whose statement is deleted, back to the seed: the old key) would
    bring it back: the version mark beside the buffer says v2 was held."""
    root, old, clock = site["root"], site["old"], Clock()
    new = EcSigner.generate()
    enroll(site, statement(root, 1, [(point(old), None), (point(new), None)]))
    copy = tmp_path / "copy.sqlite"
    with sqlite3.connect(buffer(site)) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    gw = Gw(site["config"], clock)
    r = gw.update(old, statement(root, 2, [(point(new), None)]))
    assert r is not None and r.outcome == command.OK
    gw.close()
    mark = Path(site["dir"]) / "buffer.sqlite.trust"
    assert mark.read_text() == "2\n"
    if how == "older-copy":
        with sqlite3.connect(copy) as src, sqlite3.connect(buffer(site)) as dst:
            src.backup(dst)
        why = "version 1 but version 2 was installed before"
    elif how == "statement-removed":
        with sqlite3.connect(buffer(site)) as db:
            db.execute("DELETE FROM meta WHERE key = ?", (ROW,))
        why = "no trust statement is installed but version 2 was"
    else:
        mark.write_text("two\n")
        why = "is not a version"
    before = mark.read_bytes()
    fails = [f.what for f in check(load_config(site["config"])) if f.level == "fail"]
    assert len(fails) == 1 and why in fails[0], fails  # said by --check, nothing changed
    assert mark.read_bytes() == before
    gw = Gw(site["config"], clock)
    assert_broken(gw, why, clock, old, new)
    gw.close()


def test_a_key_whose_end_passed_while_the_gateway_was_off_is_not_obeyed(
        site: dict[str, Any]) -> None:
    root, old = site["root"], site["old"]
    new = EcSigner.generate()
    end = int(time.time()) + 2  # the old key's overlap ends 2 s from now
    enroll(site, statement(root, 1, [(point(new), None), (point(old), end)],
                           nbf=end - 60, exp=end + 3600))
    assert wait_for(lambda: time.time() >= end, 30)  # the gateway is off meanwhile
    clock = Clock()
    clock.now = int(time.time())
    gw = Gw(site["config"], clock)  # the start reads the real clock, as in service
    assert gw.trust.dropped == [old.kid.hex()] and not gw.trust.broken
    assert status_map(gw.gw)["commands"]["trust"]["dropped"] == [old.kid.hex()]
    assert gw.obeys(new, clock) and not gw.obeys(old, clock)
    gw.close()
