"""The gateway keeps the release-key list version it accepted, as the device keeps it in
its boot pointer: ``take_update`` (the fleet's ``update`` command, manifest and key list
fetched over TLS from a real server on loopback) records the list version with the
release, the commit makes it the floor beside the installed sequence (in ``state.json``,
atomically), and the next check passes it to ``check_update``.

The attack: the root holders certified list 2, which drops release key A (stolen) and
adds key B. Whoever holds A replays list 1, still validly root-signed, with a new release
signed by A under it. Once a release under list 2 was committed the gateway refuses it
(``keys_rollback``), also after a restart; a gateway that had not stored the version would
take it (checked below with the same bytes), which is why the floor is kept. Then the
retries through the same path: the fleet's 429 with ``Retry-After`` (for the artifact, the
manifest or the key list) and a 503 do not fail the update.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cityedge_core import update_manifest as um
from cityedge_gateway import ota_state as s
from cityedge_gateway.ota_command import UpdateFailed, UpdateRefused, take_update
from cityedge_gateway.ota_download import DONE, RETRY, DownloadEvent, DownloadLimits
from cityedge_gateway.ota_install import CURRENT, STATE, Installer
from cityedge_host.crypto import EcSigner
from cityedge_host.release import CertifiedKey, RootSet, certify, public_sec1, sec1_verifier
from cityedge_host.release import sign_release as sign

from support.flaky_artifact_server import Cut, FlakyArtifactServer, Status
from support.mosquitto import TestPKI
from support.releases import artifact, copy_build, factory_image

HW = "rpi4"
FAST = DownloadLimits(retry_first_s=0.05, retry_max_s=0.2, read_timeout_s=10,
                      connect_timeout_s=10, deadline_s=120)


class Holders:
    """The release manager's side: 2 of 3 root keys, release keys A and B."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.roots = [EcSigner.generate() for _ in range(3)]
        self.root_set = RootSet(2, [public_sec1(r.public_key) for r in self.roots])
        self.root_file = tmp / "release-roots.json"
        self.root_file.write_bytes(self.root_set.to_json())
        self.a, self.b = EcSigner.generate(), EcSigner.generate()
        self.expires = int(time.time()) + 86400

    def key_list(self, version: int, *keys: EcSigner) -> bytes:
        return certify(self.root_set, self.roots[:2], [CertifiedKey(
            public_sec1(k.public_key), ["gateway"], self.expires) for k in keys], version)

    def release(self, key: EcSigner, version: str, seq: int) -> tuple[bytes, bytes]:
        """(artifact, manifest) of a gateway release signed by ``key``."""
        body = artifact(version, self.tmp / "starts.log")
        path = self.tmp / ("gw-%s.tar.gz" % version)
        path.write_bytes(body)
        return body, sign(key, path, "gateway", version, seq, [HW], self.expires)


def command(server: FlakyArtifactServer, manifest: bytes) -> dict[int, Any]:
    folder = "https://127.0.0.1:%d/rel/" % server.port
    return {um.A_URL: folder, um.A_MANIFEST_SHA256: hashlib.sha256(manifest).digest()}


def serve(pki: TestPKI, body: bytes, manifest: bytes, keys: bytes,
          script: list[Any] | None = None,
          file_script: dict[str, list[Status]] | None = None) -> FlakyArtifactServer:
    return FlakyArtifactServer(pki, body, script, files={"manifest": manifest, "keys": keys},
                               file_script=file_script)


def installer(tmp: Path) -> Installer:
    root = tmp / "opt"
    if not root.exists():
        root.mkdir()
        factory_image(root, "1.0.0", 1, tmp / "starts.log")
    return Installer(root, build=copy_build)


def test_a_key_list_older_than_the_committed_one_is_refused(pki: TestPKI,
                                                            tmp_path: Path) -> None:
    h = Holders(tmp_path)
    inst = installer(tmp_path)
    assert inst.record().installed_keys_version == 0  # the factory image: none yet
    # release 2.0.0, key B under list 2 (A revoked): installed, committed
    body, manifest = h.release(h.b, "2.0.0", 2)
    with serve(pki, body, manifest, h.key_list(2, h.b)) as server:
        rec = take_update(command(server, manifest), inst, roots_file=h.root_file,
                          hw_class=HW, ca_file=pki.ca_pem, bounds=FAST)
    assert (rec.state, rec.keys_version, rec.installed_keys_version) == (s.TRIAL, 2, 0)
    rec = inst.commit()
    assert (rec.installed_sequence, rec.installed_keys_version) == (2, 2)
    on_disk = json.loads((inst.root / STATE).read_bytes())
    assert (on_disk["installed_sequence"], on_disk["installed_keys_version"]) == (2, 2)

    # the attack: list 1 replayed (root-signed, still naming A) with a release A signed
    old_keys = h.key_list(1, h.a)
    body, manifest = h.release(h.a, "3.0.0", 3)
    after_restart = Installer(inst.root, build=copy_build)  # read back from state.json
    with serve(pki, body, manifest, old_keys) as server:
        with pytest.raises(UpdateRefused) as e:
            take_update(command(server, manifest), after_restart, roots_file=h.root_file,
                        hw_class=HW, ca_file=pki.ca_pem, bounds=FAST)
        assert e.value.reason == "keys_rollback"
        assert [p.rsplit("/", 1)[-1] for p in server.paths] == ["manifest", "keys"]
    assert after_restart.link(CURRENT) == "2.0.0"
    assert after_restart.record().state == s.COMMITTED
    # what the stored version prevented: the same bytes pass a check that starts from 0
    unprotected = um.check_update(manifest, old_keys, h.root_set.verifiers, 2, 0,
                                  "gateway", HW, 2, "2.0.0", int(time.time()),
                                  make_verifier=sec1_verifier)
    assert unprotected.ok, unprotected

    # a newer list (3, still without A) is taken and raises the floor at its commit
    body, manifest = h.release(h.b, "3.0.0", 3)
    with serve(pki, body, manifest, h.key_list(3, h.b)) as server:
        rec = take_update(command(server, manifest), after_restart, roots_file=h.root_file,
                          hw_class=HW, ca_file=pki.ca_pem, bounds=FAST)
    assert (rec.state, rec.keys_version) == (s.TRIAL, 3)
    assert after_restart.commit().installed_keys_version == 3


def test_a_rolled_back_release_does_not_raise_the_key_list_floor(pki: TestPKI,
                                                                 tmp_path: Path) -> None:
    h = Holders(tmp_path)
    inst = installer(tmp_path)
    body, manifest = h.release(h.b, "2.0.0", 2)
    with serve(pki, body, manifest, h.key_list(4, h.b)) as server:
        take_update(command(server, manifest), inst, roots_file=h.root_file,
                    hw_class=HW, ca_file=pki.ca_pem, bounds=FAST)
    rec = inst.roll_back("health: nothing acknowledged")
    assert (rec.state, rec.keys_version, rec.installed_keys_version) == (s.ROLLED_BACK, 4, 0)


def test_the_fleets_429_with_retry_after_does_not_fail_the_update(pki: TestPKI,
                                                                  tmp_path: Path) -> None:
    """The artifact server answers the artifact's first request 429 ``Retry-After: 1``
    (the fleet's download budget), the second with a link cut mid-body: the update still
    reaches its trial, and the events show the wait, the resume and the digest."""
    h = Holders(tmp_path)
    inst = installer(tmp_path)
    body, manifest = h.release(h.b, "2.0.0", 2)
    events: list[DownloadEvent] = []
    cut = len(body) // 2
    with serve(pki, body, manifest, h.key_list(1, h.b), [Status(429, "1"), Cut(cut)]) as srv:
        rec = take_update(command(srv, manifest), inst, roots_file=h.root_file, hw_class=HW,
                          ca_file=pki.ca_pem, bounds=FAST, observe=events.append)
        artifact_ranges = [r for p, r in zip(srv.paths, srv.log, strict=True)
                           if p.endswith("artifact")]
    assert (rec.state, inst.link(CURRENT)) == (s.TRIAL, "2.0.0")
    retries = [e for e in events if e.kind == RETRY]
    assert [(e.reason, e.offset) for e in retries] == [("rate-limited", 0),
                                                       ("connection", cut)]
    assert retries[0].wait_s >= 1.0
    assert artifact_ranges == [None, None, "bytes=%d-" % cut]
    assert [e.sha256 for e in events if e.kind == DONE] == [hashlib.sha256(body).hexdigest()]


def test_the_manifest_and_key_list_fetches_are_retried_too(pki: TestPKI,
                                                            tmp_path: Path) -> None:
    """A 503 for the manifest, a 429 with ``Retry-After: 1`` for the key list: both asked
    again, the update reaches its trial. Five 503s in a row for the manifest with three
    tries allowed: ``UpdateFailed``, nothing downloaded."""
    h = Holders(tmp_path)
    inst = installer(tmp_path)
    body, manifest = h.release(h.b, "2.0.0", 2)
    script = {"manifest": [Status(503)], "keys": [Status(429, "1")]}
    with serve(pki, body, manifest, h.key_list(1, h.b), file_script=script) as srv:
        rec = take_update(command(srv, manifest), inst, roots_file=h.root_file, hw_class=HW,
                          ca_file=pki.ca_pem, bounds=FAST)
        names = [p.rsplit("/", 1)[-1] for p in srv.paths]
    assert (rec.state, inst.link(CURRENT)) == (s.TRIAL, "2.0.0")
    assert names == ["manifest", "manifest", "keys", "keys", "artifact"]

    (tmp_path / "other").mkdir()
    other = installer(tmp_path / "other")
    with serve(pki, body, manifest, h.key_list(1, h.b),
               file_script={"manifest": [Status(503)] * 5}) as srv:
        with pytest.raises(UpdateFailed, match=r"manifest: HTTP 503 \(3 tries, the limit\)"):
            take_update(command(srv, manifest), other, roots_file=h.root_file, hw_class=HW,
                        ca_file=pki.ca_pem, bounds=replace(FAST, attempts_max=3))
        assert [p.rsplit("/", 1)[-1] for p in srv.paths] == ["manifest"] * 3
    assert other.record().state == s.COMMITTED  # the factory release, untouched
