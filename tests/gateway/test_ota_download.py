"""The update download (``ota_download``) against a real HTTPS server on loopback: resumes
where it stopped (the server's log shows the ``Range`` asked), and refuses endless data,
slow retrieval, a wrong ``Content-Range``, a wrong digest and a certificate from another CA.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityedge_gateway.ota_download import (
    DownloadInterrupted,
    DownloadLimits,
    DownloadRefused,
    download,
    progress_path,
)
from cityedge_gateway.ota_release import VerifiedRelease

from support.artifact_server import ArtifactServer
from support.mosquitto import TestPKI

BODY = os.urandom(300_000)
# one request may fail and the call gives up: these tests resume across calls (a reboot,
# a killed process); retries within a call: test_ota_download_retry.py
SMALL = DownloadLimits(sync_every_bytes=16_384, read_timeout_s=5,
                       connect_timeout_s=5, deadline_s=60, attempts_max=1)


def release(url: str, body: bytes = BODY, seq: int = 7) -> VerifiedRelease:
    return VerifiedRelease("gateway", "2.0.0", seq, len(body), hashlib.sha256(body).digest(),
                           url)


@pytest.fixture
def server(pki: TestPKI) -> Iterator[ArtifactServer]:
    with ArtifactServer(pki, BODY) as s:
        yield s


def test_a_whole_download_is_hashed_and_leaves_no_progress_record(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    part = tmp_path / "7.part"
    assert download(release(server.url), part, ca_file=pki.ca_pem, bounds=SMALL) == part
    assert part.read_bytes() == BODY
    assert server.log == [None]
    assert not progress_path(part).exists()


def test_an_interrupted_download_resumes_from_where_it_stopped(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    part = tmp_path / "7.part"
    rel = release(server.url)
    server.cut_after = 120_000
    with pytest.raises(DownloadInterrupted) as e:
        download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert e.value.reason == "connection"
    record = json.loads(progress_path(part).read_bytes())
    assert record["durable_bytes"] == 120_000 == part.stat().st_size
    download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)  # the link is back
    assert part.read_bytes() == BODY
    assert server.log == [None, "bytes=120000-"]


def test_after_a_power_cut_the_torn_tail_is_dropped_and_fetched_again(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    """The record vouches for 50,000 bytes; the file has more, the last of them garbage
    (written but never fsynced). The resume cuts back to the record and re-hashes."""
    part = tmp_path / "7.part"
    rel = release(server.url)
    part.write_bytes(BODY[:50_000] + b"\xff" * 9000)
    progress_path(part).write_text(json.dumps({
        "sequence": 7, "size": len(BODY), "sha256": rel.sha256.hex(), "url": rel.url,
        "durable_bytes": 50_000}))
    download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert part.read_bytes() == BODY
    assert server.log == ["bytes=50000-"]


def test_a_progress_record_of_another_release_starts_from_zero(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    part = tmp_path / "7.part"
    rel = release(server.url)
    part.write_bytes(b"\x01" * 50_000)
    progress_path(part).write_text(json.dumps({
        "sequence": 6, "size": len(BODY), "sha256": rel.sha256.hex(), "url": rel.url,
        "durable_bytes": 50_000}))
    download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert part.read_bytes() == BODY
    assert server.log == [None]


def test_a_server_that_ignores_range_is_read_from_byte_zero(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    part = tmp_path / "7.part"
    rel = release(server.url)
    server.cut_after = 100_000
    with pytest.raises(DownloadInterrupted):
        download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    server.mode = "ignore-range"
    download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert part.read_bytes() == BODY
    assert server.log == [None, "bytes=100000-"]


def test_a_content_range_that_is_not_what_was_asked_is_refused(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    part = tmp_path / "7.part"
    rel = release(server.url)
    server.cut_after = 100_000
    with pytest.raises(DownloadInterrupted):
        download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    server.mode = "wrong-range"
    with pytest.raises(DownloadRefused) as e:
        download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert e.value.reason == "bad-content-range"
    assert part.stat().st_size == 100_000  # what was good is kept: a fixed server resumes
    server.mode = "normal"
    download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert part.read_bytes() == BODY


def test_a_server_whose_artifact_is_longer_than_the_release_is_refused(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    """The release says 200,000 bytes; the server's file is longer: refused from the
    ``Content-Length`` of a whole response, and from the total of a ``Content-Range``."""
    part = tmp_path / "7.part"
    rel = release(server.url, BODY[:200_000])
    with pytest.raises(DownloadRefused) as e:
        download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert e.value.reason == "endless-data"
    part.write_bytes(BODY[:50_000])
    progress_path(part).write_text(json.dumps({
        "sequence": 7, "size": 200_000, "sha256": rel.sha256.hex(), "url": rel.url,
        "durable_bytes": 50_000}))
    with pytest.raises(DownloadRefused) as e:
        download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert e.value.reason == "bad-content-range" and "300000 bytes" in str(e.value)
    assert server.log == [None, "bytes=50000-"]


@pytest.mark.parametrize("mode", ["endless-declared", "endless-stream"])
def test_endless_data_is_refused_and_the_partial_file_removed(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path, mode: str) -> None:
    part = tmp_path / "7.part"
    server.mode = mode
    with pytest.raises(DownloadRefused) as e:
        download(release(server.url), part, ca_file=pki.ca_pem, bounds=SMALL)
    assert e.value.reason == "endless-data"
    assert not part.exists() and not progress_path(part).exists()


def test_a_trickling_server_is_refused_for_slow_retrieval(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    """16 bytes every 20 ms (800 B/s): every read is quick, the rate is not."""
    part = tmp_path / "7.part"
    server.mode = "trickle"
    bounds = DownloadLimits(read_timeout_s=5, rate_window_s=0.3,
                            min_rate_bytes_s=10_000, attempts_max=1)
    with pytest.raises(DownloadRefused) as e:
        download(release(server.url), part, ca_file=pki.ca_pem, bounds=bounds)
    assert e.value.reason == "slow-retrieval" and "below the minimum" in str(e.value)
    assert 0 < part.stat().st_size < len(BODY)  # kept: a later call may resume


def test_a_trickle_fast_enough_for_the_rate_still_meets_the_deadline(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    server.mode = "trickle"
    bounds = DownloadLimits(read_timeout_s=5, deadline_s=0.3,
                            min_rate_bytes_s=1, attempts_max=1)
    with pytest.raises(DownloadRefused) as e:
        download(release(server.url), tmp_path / "7.part", ca_file=pki.ca_pem, bounds=bounds)
    assert e.value.reason == "slow-retrieval" and "longer than" in str(e.value)


def test_a_stalled_server_is_bounded_by_the_read_timeout(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    server.mode = "stall"
    bounds = DownloadLimits(read_timeout_s=0.3, attempts_max=1)
    with pytest.raises(DownloadInterrupted) as e:
        download(release(server.url), tmp_path / "7.part", ca_file=pki.ca_pem, bounds=bounds)
    assert e.value.reason == "slow-retrieval"


def test_a_wrong_digest_is_refused_and_the_partial_file_removed(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    part = tmp_path / "7.part"
    rel = VerifiedRelease("gateway", "2.0.0", 7, len(BODY), hashlib.sha256(b"other").digest(),
                          server.url)
    with pytest.raises(DownloadRefused) as e:
        download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert e.value.reason == "hash-mismatch"
    assert not part.exists() and not progress_path(part).exists()


def test_a_server_certificate_from_another_ca_is_refused(
        server: ArtifactServer, tmp_path: Path) -> None:
    other = TestPKI(tmp_path / "other-pki", "another CA")
    with pytest.raises(DownloadRefused) as e:
        download(release(server.url), tmp_path / "7.part", ca_file=other.ca_pem, bounds=SMALL)
    assert e.value.reason == "tls"
    assert server.log == []  # no request was sent


def test_a_release_must_name_an_https_url_and_a_plain_version() -> None:
    digest = hashlib.sha256(BODY).digest()
    with pytest.raises(ValueError, match="https"):
        VerifiedRelease("gateway", "2.0.0", 7, 10, digest, "http://127.0.0.1/a")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(ValueError, match="version"):
            VerifiedRelease("gateway", bad, 7, 10, digest, "https://127.0.0.1/a")


def test_a_partial_file_shorter_than_its_record_resumes_from_what_it_holds(
        server: ArtifactServer, pki: TestPKI, tmp_path: Path) -> None:
    """The record says 80,000 bytes, the file system kept 30,000 (never padded)."""
    part = tmp_path / "7.part"
    rel = release(server.url)
    part.write_bytes(BODY[:30_000])
    progress_path(part).write_text(json.dumps({
        "sequence": 7, "size": len(BODY), "sha256": rel.sha256.hex(), "url": rel.url,
        "durable_bytes": 80_000}))
    download(rel, part, ca_file=pki.ca_pem, bounds=SMALL)
    assert part.read_bytes() == BODY
    assert server.log == ["bytes=30000-"]
