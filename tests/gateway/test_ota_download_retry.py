"""The gateway's download retries within one call (``ota_download``), against a real HTTPS
server on loopback that misbehaves on cue (``support.flaky_artifact_server``): a link cut
mid-body, a stalled server, 503 and 429 with ``Retry-After``, a server that ignores
``Range``, and servers that lie in ``Content-Range``. Each test asserts on the download's
events (the requests and the byte each resumed from, the retries and their reasons, the
final SHA-256) and on the ``Range`` headers the server logged, never on how long it took.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cityedge_gateway.ota_download import (
    DONE,
    GAVE_UP,
    REQUEST,
    RESTART,
    RETRY,
    DownloadEvent,
    DownloadInterrupted,
    DownloadLimits,
    DownloadRefused,
    download,
    progress_path,
    retry_after_s,
)
from cityedge_gateway.ota_release import VerifiedRelease

from support.flaky_artifact_server import (
    Cut,
    FlakyArtifactServer,
    LengthLie,
    Mode,
    Overlong,
    Shifted,
    Stall,
    Status,
    Step,
)
from support.mosquitto import TestPKI

BODY = os.urandom(300_000)
DIGEST = hashlib.sha256(BODY).hexdigest()
# quick retries; a read timeout no loaded loopback link reaches unless a server stalls
FAST = DownloadLimits(sync_every_bytes=16_384, read_timeout_s=10, connect_timeout_s=10,
                      deadline_s=120, retry_first_s=0.05, retry_max_s=0.2, attempts_max=4)


def release(url: str) -> VerifiedRelease:
    return VerifiedRelease("gateway", "2.0.0", 7, len(BODY), bytes.fromhex(DIGEST), url)


def fetch(pki: TestPKI, tmp_path: Path, script: list[Step],
          bounds: DownloadLimits = FAST) -> tuple[FlakyArtifactServer, list[DownloadEvent],
                                                   BaseException | None]:
    """One download call against a server running ``script``: the server, the events
    and the error the call ended with (None: it completed)."""
    events: list[DownloadEvent] = []
    error: BaseException | None = None
    with FlakyArtifactServer(pki, BODY, script) as server:
        try:
            download(release(server.url), tmp_path / "7.part", ca_file=pki.ca_pem,
                     bounds=bounds, observe=events.append)
        except (DownloadInterrupted, DownloadRefused) as e:
            error = e
    return server, events, error


def of(kind: str, events: list[DownloadEvent]) -> list[DownloadEvent]:
    return [e for e in events if e.kind == kind]


def test_a_link_cut_twice_mid_body_resumes_each_time_in_the_same_call(
        pki: TestPKI, tmp_path: Path) -> None:
    server, events, error = fetch(pki, tmp_path, [Cut(100_000), Cut(210_000)])
    assert error is None
    assert [e.offset for e in of(REQUEST, events)] == [0, 100_000, 210_000]
    assert [(e.reason, e.offset) for e in of(RETRY, events)] == [
        ("connection", 100_000), ("connection", 210_000)]
    done = of(DONE, events)
    assert [(d.sha256, d.offset, d.attempt) for d in done] == [(DIGEST, len(BODY), 3)]
    assert server.log == [None, "bytes=100000-", "bytes=210000-"]
    assert (tmp_path / "7.part").read_bytes() == BODY
    assert not progress_path(tmp_path / "7.part").exists()


def test_a_stalled_server_is_left_after_the_read_timeout_and_the_rest_asked_for(
        pki: TestPKI, tmp_path: Path) -> None:
    bounds = replace(FAST, read_timeout_s=1.5)
    server, events, error = fetch(pki, tmp_path, [Stall(120_000)], bounds)
    assert error is None
    assert [(e.reason, e.offset) for e in of(RETRY, events)][:1] == [
        ("slow-retrieval", 120_000)]
    assert server.log[:2] == [None, "bytes=120000-"]
    assert of(DONE, events)[0].sha256 == DIGEST
    assert (tmp_path / "7.part").read_bytes() == BODY


def test_503_and_429_are_retried_no_sooner_than_their_retry_after(
        pki: TestPKI, tmp_path: Path) -> None:
    """A busy server's 503, then the fleet's download budget's 429, each with
    ``Retry-After: 1``; the third request is served."""
    server, events, error = fetch(pki, tmp_path, [Status(503, "1"), Status(429, "1")])
    assert error is None
    retries = of(RETRY, events)
    assert [e.reason for e in retries] == ["http-status", "rate-limited"]
    assert all(e.wait_s >= 1.0 for e in retries)
    assert server.statuses == [503, 429, 200]
    assert of(DONE, events)[0].sha256 == DIGEST


def test_a_5xx_without_retry_after_backs_off_doubling_within_the_cap(
        pki: TestPKI, tmp_path: Path) -> None:
    bounds = replace(FAST, retry_first_s=0.05, retry_max_s=0.1, attempts_max=5)
    server, events, error = fetch(pki, tmp_path, [Status(500)] * 4, bounds)
    assert error is None
    waits = [e.wait_s for e in of(RETRY, events)]
    assert len(waits) == 4
    # jitter: each wait within [0.5, 1.5] of 0.05, 0.1, 0.1, 0.1 (doubling, capped)
    for wait, base in zip(waits, (0.05, 0.1, 0.1, 0.1), strict=True):
        assert 0.5 * base <= wait <= 1.5 * base
    assert server.statuses == [500, 500, 500, 500, 200]


def test_the_attempt_limit_counts_failures_in_a_row(pki: TestPKI, tmp_path: Path) -> None:
    server, events, error = fetch(pki, tmp_path, [Status(503)] * 5,
                                  replace(FAST, attempts_max=3))
    assert isinstance(error, DownloadInterrupted) and error.reason == "http-status"
    assert "3 failed requests in a row" in str(error)
    assert server.statuses == [503, 503, 503]
    assert len(of(RETRY, events)) == 2 and of(GAVE_UP, events)[0].reason == "http-status"
    assert not of(DONE, events)


def test_a_request_that_brought_bytes_starts_the_count_again(
        pki: TestPKI, tmp_path: Path) -> None:
    """Three failed requests in a row give up; each cut delivered bytes, so it starts a
    new run: four failures in all (counted together they would end the call at the third),
    and the download completes."""
    script: list[Step] = [Cut(60_000), Status(503), Cut(150_000), Status(503)]
    server, events, error = fetch(pki, tmp_path, script, replace(FAST, attempts_max=3))
    assert error is None
    assert [e.offset for e in of(REQUEST, events)] == [0, 60_000, 60_000, 150_000, 150_000]
    assert server.statuses == [200, 503, 206, 503, 206]
    assert of(DONE, events)[0].sha256 == DIGEST


def test_a_retry_after_beyond_the_limit_gives_up_at_once(pki: TestPKI,
                                                          tmp_path: Path) -> None:
    server, events, error = fetch(pki, tmp_path, [Status(429, "7200")])
    assert isinstance(error, DownloadInterrupted) and error.reason == "rate-limited"
    assert error.retry_after == 7200 and "asks to wait 7200 s" in str(error)
    assert server.statuses == [429] and not of(RETRY, events)


def test_a_wait_that_would_pass_the_deadline_gives_up_at_once(pki: TestPKI,
                                                               tmp_path: Path) -> None:
    """Retry-After as an HTTP date, 10 minutes ahead; the deadline is 2 minutes."""
    when = email.utils.formatdate(time.time() + 600, usegmt=True)
    server, events, error = fetch(pki, tmp_path, [Status(503, when)])
    assert isinstance(error, DownloadInterrupted) and error.reason == "deadline"
    assert "deadline of 120 s" in str(error)
    assert server.statuses == [503] and not of(RETRY, events)


def test_a_server_that_ignores_range_after_a_cut_is_read_from_byte_zero(
        pki: TestPKI, tmp_path: Path) -> None:
    server, events, error = fetch(pki, tmp_path, [Cut(100_000), Mode("ignore-range")])
    assert error is None
    assert [(e.attempt, e.offset) for e in of(RESTART, events)] == [(2, 0)]
    assert server.log == [None, "bytes=100000-"] and server.statuses == [200, 200]
    assert of(DONE, events)[0].sha256 == DIGEST
    assert (tmp_path / "7.part").read_bytes() == BODY


@pytest.mark.parametrize("lie", [Mode("wrong-range"), LengthLie(1000), Overlong(5000)],
                         ids=["range-from-zero", "length-short", "body-past-range"])
def test_a_content_range_lie_is_refused_and_the_image_is_not_corrupted(
        pki: TestPKI, tmp_path: Path, lie: Step) -> None:
    """After a cut at 100,000 the server answers the resume with a lie in its headers:
    refused, not retried; what the file holds is still a prefix of the artifact, and the
    server telling the truth again completes it from there."""
    part = tmp_path / "7.part"
    events: list[DownloadEvent] = []
    with FlakyArtifactServer(pki, BODY, [Cut(100_000), lie]) as server:
        with pytest.raises(DownloadRefused) as e:
            download(release(server.url), part, ca_file=pki.ca_pem, bounds=FAST,
                     observe=events.append)
        assert e.value.reason == "bad-content-range"
        assert len(server.log) == 2 and of(GAVE_UP, events)[0].reason == "bad-content-range"
        held = part.read_bytes()
        assert 100_000 <= len(held) < len(BODY) and held == BODY[:len(held)]
        events.clear()
        download(release(server.url), part, ca_file=pki.ca_pem, bounds=FAST,
                 observe=events.append)
        assert server.log[2:] == ["bytes=%d-" % len(held)]
    assert part.read_bytes() == BODY and of(DONE, events)[0].sha256 == DIGEST


def test_a_resume_labelled_right_with_the_wrong_bytes_fails_the_digest(
        pki: TestPKI, tmp_path: Path) -> None:
    """206 with the Content-Range asked for, but the bytes of another offset: nothing in
    the headers shows it; the final SHA-256 does, and the file is removed."""
    part = tmp_path / "7.part"
    server, events, error = fetch(pki, tmp_path, [Cut(100_000), Shifted()])
    assert isinstance(error, DownloadRefused) and error.reason == "hash-mismatch"
    assert server.log == [None, "bytes=100000-"]
    assert not of(DONE, events) and of(GAVE_UP, events)[0].reason == "hash-mismatch"
    assert not part.exists() and not progress_path(part).exists()


def test_a_stop_ends_a_long_retry_after_wait_and_keeps_the_bytes(
        pki: TestPKI, tmp_path: Path) -> None:
    """The gateway stops (SIGTERM) while its download waits out a 600 s Retry-After: the
    call ends ``stopped`` once the stop is set, with what it fetched kept for a resume."""
    part = tmp_path / "7.part"
    events: list[DownloadEvent] = []
    waiting, stop = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def observe(e: DownloadEvent) -> None:
        events.append(e)
        if e.kind == RETRY and e.wait_s >= 600:
            waiting.set()

    def run() -> None:
        try:
            download(release(server.url), part, ca_file=pki.ca_pem, observe=observe,
                     bounds=replace(FAST, deadline_s=3600), stop=stop)
        except BaseException as e:
            outcome.append(e)

    with FlakyArtifactServer(pki, BODY, [Cut(100_000), Status(503, "600")]) as server:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert waiting.wait(60), events
        stop.set()
        t.join(60)
        assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DownloadInterrupted)
    assert outcome[0].reason == "stopped"
    assert [e.reason for e in of(GAVE_UP, events)] == ["stopped"]
    assert part.read_bytes() == BODY[:100_000]
    assert '"durable_bytes": 100000' in progress_path(part).read_text()


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = 1_800_000_000.0
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5"):
        assert retry_after_s(bad, now) is None
