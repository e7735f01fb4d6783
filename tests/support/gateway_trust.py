"""The Pi gateway built from its TOML for the trust-store tests (real key files, the
real SQLite buffer, the offline root ``cityedge ca init`` makes), commands fed to its
responder as the forwarder feeds them from ``down/cmd``, with the test's clock: what
``tests/gateway/test_gateway_trust_*`` share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cityedge_core import command, command_decode, trust_statement
from cityedge_fleet.ca import ROOT_CERT, ROOT_KEY, init_ca
from cityedge_gateway.config import load_config
from cityedge_gateway.service import Gateway
from cityedge_host.crypto import EcSigner, load_signer, public_sec1

from support.gateway import GW
from support.mosquitto import TestPKI

T0 = int(time.time())


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def point(k: EcSigner) -> bytes:
    return public_sec1(k.public_key)


@pytest.fixture
def site(tmp_path: Path, pki: TestPKI) -> Iterator[dict[str, Any]]:
    init_ca(tmp_path / "offline", tmp_path / "ca")  # the operator's root, off the server
    root = load_signer(tmp_path / "offline" / ROOT_KEY)
    old = EcSigner.generate()  # the fleet's command key, as enrolled
    creds = pki.issue_client(GW)  # the broker is never reached: commands are fed in
    creds.key_pem.chmod(0o600)
    (tmp_path / "fleet0.pub").write_text(point(old).hex() + "\n")
    (tmp_path / "root.crt").write_bytes((tmp_path / "ca" / ROOT_CERT).read_bytes())
    toml = """
[gateway]
device = "%s"
key_file = "%s"
fleet_keys = ["fleet0.pub"]
%s
[store]
path = "buffer.sqlite"

[broker]
host = "127.0.0.1"
port = 1
ca_file = "%s"
cert_file = "%s"
key_file = "%s"
"""
    files = (pki.ca_pem, creds.cert_pem, creds.key_pem)
    (tmp_path / "gateway.toml").write_text(
        toml % (GW, creds.key_pem, 'root_cert = "root.crt"\n', *files))
    (tmp_path / "noroot.toml").write_text(toml % (GW, creds.key_pem, "", *files))
    yield {"dir": tmp_path, "root": root, "old": old, "config": tmp_path / "gateway.toml"}


class Gw:
    """The gateway built from its config, with the test's clock; ``send`` answers."""

    def __init__(self, config: Path, clock: Clock) -> None:
        self.gw = Gateway(load_config(config))
        assert self.gw.responder is not None and self.gw.fleet_trust is not None
        self.responder = self.gw.responder
        self.trust = self.gw.fleet_trust
        self.responder.gate.clock = clock
        self.trust.clock = clock
        self.seq = self.responder.state.get("cmd_seq", 0)

    def send(self, key: EcSigner, name: str, args: Any = None, seq: int | None = None,
             clock: Clock | None = None) -> command_decode.Result | None:
        if seq is None:
            self.seq += 1
            seq = self.seq
        now = clock.now if clock is not None else T0
        data = command.encode_command(key, key.kid, name, GW, seq, now + 600, args)
        answer = asyncio.run(self.responder.answer(data))
        if answer is None:
            return None
        return command_decode.decode_result(answer, self.gw.signer.verifier())

    def update(self, key: EcSigner, statement: bytes, **kw: Any
               ) -> command_decode.Result | None:
        return self.send(key, trust_statement.TRUST_UPDATE,
                         {trust_statement.A_STATEMENT: statement}, **kw)

    def obeys(self, key: EcSigner, clock: Clock | None = None) -> bool:
        """The gate takes a command signed by ``key`` (``ping`` has no handler: the answer
        is "not supported", which only an accepted command gets)."""
        r = self.send(key, "ping", clock=clock)
        if r is None:
            self.seq -= 1  # not taken
            return False
        assert r.outcome == command.REFUSED and "not supported" in r.detail, r
        return True

    def close(self) -> None:
        self.gw.store.close()


def statement(root: EcSigner, version: int, keys: list[tuple[bytes, int | None]],
              nbf: int = T0 - 60, exp: int = T0 + 7 * 86400) -> bytes:
    return trust_statement.encode_statement(root, root.kid, version, keys, nbf, exp)

