"""From a signed release to the gateway's installer: the release manager's tools sign a
gateway artifact under a 2-of-3 root set (``cityedge_host.release``), the gateway checks
the manifest with the core's rules (``update_manifest.UpdatePolicy``), and only the
release the verdict accepted reaches the installer, which downloads it over HTTPS from a
real server on loopback and hashes it against the signed size and digest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cityedge_core import update_manifest
from cityedge_gateway import ota_state as s
from cityedge_gateway.ota_install import Installer
from cityedge_gateway.ota_release import from_verdict
from cityedge_host.crypto import EcSigner
from cityedge_host.release import (
    CertifiedKey,
    RootSet,
    certify,
    public_sec1,
    sec1_verifier,
    sign_release,
)

from support.artifact_server import ArtifactServer
from support.mosquitto import TestPKI
from support.releases import artifact, copy_build, factory_image

HW = "rpi4"


def _policy(roots: RootSet) -> update_manifest.UpdatePolicy:
    return update_manifest.UpdatePolicy(roots.verifiers, roots.threshold, "gateway", HW,
                                        500 * 1024 * 1024, sec1_verifier)


def test_a_signed_gateway_release_is_checked_then_installed(tmp_path: Path,
                                                            pki: TestPKI) -> None:
    root_keys = [EcSigner.generate() for _ in range(3)]
    roots = RootSet(2, [public_sec1(k.public_key) for k in root_keys])
    release_key = EcSigner.generate()
    now = int(time.time())
    key_list = certify(roots, root_keys[:2], [CertifiedKey(
        public_sec1(release_key.public_key), ["gateway"], now + 86400)], version=1)
    body = artifact("2.0.0", tmp_path / "starts.log")
    (tmp_path / "gw.tar.gz").write_bytes(body)
    manifest = sign_release(release_key, tmp_path / "gw.tar.gz", "gateway", "2.0.0", 2,
                            [HW], now + 3600)

    opt = tmp_path / "opt-cityedge"
    opt.mkdir()
    factory_image(opt, "1.0.0", 1, tmp_path / "starts.log")
    inst = Installer(opt, build=copy_build)
    installed = inst.record()
    verdict = _policy(roots).check(manifest, key_list, 0, installed.installed_sequence,
                                   installed.installed_version, now)
    assert verdict.ok, verdict
    with ArtifactServer(pki, body) as server:
        rec = inst.update(from_verdict(verdict, server.url), ca_file=pki.ca_pem)
    assert (rec.state, rec.version) == (s.TRIAL, "2.0.0")
    assert inst.commit().installed_sequence == 2
    # the same manifest again: the sequence is now installed (replay / rollback)
    again = _policy(roots).check(manifest, key_list, 1, 2, "2.0.0", now)
    assert not again.ok
    with pytest.raises(ValueError, match=again.reason):
        from_verdict(again, "https://127.0.0.1/x")


def test_a_release_for_another_hardware_class_never_reaches_the_installer(
        tmp_path: Path) -> None:
    root_key = EcSigner.generate()
    roots = RootSet(1, [public_sec1(root_key.public_key)])
    release_key = EcSigner.generate()
    now = int(time.time())
    key_list = certify(roots, [root_key], [CertifiedKey(
        public_sec1(release_key.public_key), ["gateway"], now + 86400)], version=1)
    (tmp_path / "a").write_bytes(b"x" * 100)
    manifest = sign_release(release_key, tmp_path / "a", "gateway", "2.0.0", 2,
                            ["esp32s3"], now + 3600)
    verdict = _policy(roots).check(manifest, key_list, 0, 1, "1.0.0", now)
    assert verdict.reason == update_manifest.WRONG_HW_CLASS, verdict
    with pytest.raises(ValueError, match="not accepted"):
        from_verdict(verdict, "https://127.0.0.1/x")
