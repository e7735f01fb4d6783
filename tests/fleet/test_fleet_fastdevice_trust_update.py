"""The fast CPython device takes ``trust-update`` as the Pi gateway does (the same
``cityedge_host.fleet_trust``, its state in the device's ``state.json``): enrolled through
the fleet, provisioned with the fleet's root certificate, commands fed to it as its MQTT
loop feeds them (``on_command``; the answers it keeps for repeats are read back).

Provisioning installs the enrollment answer's statement with the same checks (a forged
one is refused and the device is left without an identity), and each start checks the
installed one again: a tampered or rolled-back ``state.json`` obeys no command."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cityedge.fastdevice import FastDevice, provision
from cityedge_core import command, command_decode, trust_statement
from cityedge_fleet import command_key
from cityedge_fleet.ca import ROOT_CERT, ROOT_KEY
from cityedge_host.crypto import EcSigner, load_signer, public_sec1
from cityedge_host.fleet_trust import EnrollmentTrustError

from support.fleet import Api, enroll_device


def _now() -> int:
    """Now, read when a test runs (a module constant would be collection time: a long
    suite's later tests would send commands already expired)."""
    return int(dt.datetime.now(dt.UTC).timestamp())


def _device(api: Api, tmp_path: Path, root_pem: str | None,
            statement: bytes | None = None) -> Path:
    enrolled = enroll_device(api, 1)
    chain_pem = str(enrolled.enrollment["chain_pem"])
    keys: Any = enrolled.enrollment["fleet_keys"]
    return provision(tmp_path / "dev", device_id=enrolled.id, signer=enrolled.signer,
                     chain_pem=chain_pem, ca_pem=chain_pem, fleet_keys=list(keys),
                     root_pem=root_pem,
                     statement=base64.b64encode(statement).decode() if statement else None)


def _send(dev: FastDevice, key: EcSigner, seq: int, name: str, args: Any = None
          ) -> command_decode.Result | None:
    data = command.encode_command(key, key.kid, name, dev.id, seq, _now() + 600, args)
    asyncio.run(dev.on_command(data))
    answer = dev.answers.get(seq)
    return None if answer is None else command_decode.decode_result(
        answer, dev.signer.verifier())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_fast_device_installs_the_roots_statement_and_refuses_a_thiefs(
        api: Api, ca_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    root = load_signer(ca_dirs[0] / ROOT_KEY)
    d = _device(api, tmp_path, (ca_dirs[1] / ROOT_CERT).read_text())
    old = command_key.load(api.settings.command_key_file)
    new = EcSigner.generate()
    dev = FastDevice(d, "127.0.0.1", 1)
    own = trust_statement.encode_statement(old, old.kid, 5, [(public_sec1(new.public_key),
                                                              None)], _now() - 60, _now() + 600)
    r = _send(dev, old, 1, trust_statement.TRUST_UPDATE, {1: own})
    assert r is not None and r.outcome == command.REFUSED and "not by the root" in r.detail
    now = _now()
    good = trust_statement.encode_statement(
        root, root.kid, 5, [(public_sec1(new.public_key), None),
                            (public_sec1(old.public_key), now + 3600)], now - 60, now + 600)
    r = _send(dev, old, 2, trust_statement.TRUST_UPDATE, {1: good})
    assert r is not None and r.outcome == command.OK, r
    r = _send(dev, new, 3, "status")
    assert r is not None and r.outcome == command.OK
    again = FastDevice(d, "127.0.0.1", 1)  # a reboot: the statement is kept
    assert again.fleet_keys.version == 5
    r = _send(again, new, 4, "status")
    assert r is not None and r.outcome == command.OK
    assert _send(again, EcSigner.generate(), 5, "status") is None  # an unknown key


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_fast_device_without_the_root_keeps_its_keys(api: Api, ca_dirs: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    root = load_signer(ca_dirs[0] / ROOT_KEY)
    d = _device(api, tmp_path, None)
    old = command_key.load(api.settings.command_key_file)
    dev = FastDevice(d, "127.0.0.1", 1)
    st = trust_statement.encode_statement(root, root.kid, 1, [(public_sec1(
        EcSigner.generate().public_key), None)], _now() - 60, _now() + 600)
    r = _send(dev, old, 1, trust_statement.TRUST_UPDATE, {1: st})
    assert r is not None and r.outcome == command.REFUSED and "root_cert" in r.detail
    assert dev.fleet_keys.version == 0
    shutil.rmtree(d)


def _statement(root: EcSigner, version: int, *keys: EcSigner, old: EcSigner | None = None
               ) -> bytes:
    now = _now()
    entries: list[tuple[bytes, int | None]] = [(public_sec1(k.public_key), None)
                                               for k in keys]
    if old is not None:
        entries.append((public_sec1(old.public_key), now + 3600))
    return trust_statement.encode_statement(root, root.kid, version, entries, now - 60,
                                            now + 600)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_fast_device_enrolled_after_a_rotation_obeys_the_new_key_at_once(
        api: Api, ca_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    root = load_signer(ca_dirs[0] / ROOT_KEY)
    old = command_key.load(api.settings.command_key_file)
    new = EcSigner.generate()
    d = _device(api, tmp_path, (ca_dirs[1] / ROOT_CERT).read_text(),
                _statement(root, 4, new, old=old))
    dev = FastDevice(d, "127.0.0.1", 1)
    assert dev.fleet_keys.version == 4 and not dev.fleet_keys.broken
    r = _send(dev, new, 1, "status")
    assert r is not None and r.outcome == command.OK
    assert (d / "trust-version").read_text() == "4\n"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("attack", ["command-key", "no-root"])
def test_a_forged_statement_at_provisioning_is_refused(
        api: Api, ca_dirs: tuple[Path, Path], tmp_path: Path, attack: str) -> None:
    old = command_key.load(api.settings.command_key_file)
    thief = EcSigner.generate()
    forged = _statement(old, 9, thief)  # the fleet's command key, not the root
    root_pem = None if attack == "no-root" else (ca_dirs[1] / ROOT_CERT).read_text()
    with pytest.raises(EnrollmentTrustError, match="root" if attack == "no-root"
                       else "not by the root"):
        _device(api, tmp_path, root_pem, forged)
    d = tmp_path / "dev"
    assert "trust_statement" not in json.loads((d / "state.json").read_text())
    assert not (d / "current").exists()  # no identity to run with


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("how", ["tampered", "older-copy"])
def test_a_tampered_or_rolled_back_state_at_start_obeys_no_command(
        api: Api, ca_dirs: tuple[Path, Path], tmp_path: Path, how: str) -> None:
    root = load_signer(ca_dirs[0] / ROOT_KEY)
    old = command_key.load(api.settings.command_key_file)
    new, thief = EcSigner.generate(), EcSigner.generate()
    v1 = _statement(root, 1, new, old=old)
    d = _device(api, tmp_path, (ca_dirs[1] / ROOT_CERT).read_text(), v1)
    copy = (d / "state.json").read_text()
    dev = FastDevice(d, "127.0.0.1", 1)
    r = _send(dev, old, 1, trust_statement.TRUST_UPDATE, {1: _statement(root, 2, new)})
    assert r is not None and r.outcome == command.OK  # v2 retires the old key
    state = json.loads((d / "state.json").read_text())
    if how == "tampered":
        state["trust_statement"] = state["trust_statement"].replace(
            public_sec1(new.public_key).hex(), public_sec1(thief.public_key).hex())
        (d / "state.json").write_text(json.dumps(state))
        why = "tampered"
    else:  # the state of v1 restored: v1 still lists the old key
        state["trust_statement"] = json.loads(copy)["trust_statement"]
        (d / "state.json").write_text(json.dumps(state))
        why = "rolled back"
    again = FastDevice(d, "127.0.0.1", 1)
    assert why in again.fleet_keys.broken and again.fleet_keys.trusted() == {}
    for n, k in enumerate((old, new, thief)):
        assert _send(again, k, 10 + n, "status") is None  # not taken
    assert again.stats.forged == 3
