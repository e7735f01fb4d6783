"""A gateway part that fails is started again, counted and reported at once — not found
dead at shutdown — and what it was doing is not lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cityedge_core import chain
from cityedge_gateway.config import load_config
from cityedge_gateway.metrics import metrics_text, registry_for
from cityedge_gateway.readings import Reading
from cityedge_gateway.service import Gateway
from cityedge_gateway.status import status_map
from cityedge_gateway.supervisor import Supervisor
from cityedge_host.crypto import EcSigner

GW = "urn:dev:mac:b827ebfffe123456"
WAIT_S = 30.0  # seconds: a restart waits 0.25-0.75 s; a busy machine may take longer


async def _until(cond: object) -> None:
    async with asyncio.timeout(WAIT_S):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def test_a_task_that_fails_is_restarted_and_counted() -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise RuntimeError("sensor bus wedged (%d)" % len(runs))
        await asyncio.Event().wait()  # then it runs for good

    async def scenario() -> None:
        sup = Supervisor()
        sup.keep("flaky", flaky)
        await _until(lambda: len(runs) == 3 and sup.health["flaky"].running)
        h = sup.health["flaky"]
        assert (h.restarts, h.last_error) == (2, "RuntimeError: sensor bus wedged (2)")
        await sup.stop()
        assert not sup.health["flaky"].running

    asyncio.run(scenario())


def test_a_committer_that_fails_keeps_its_readings_and_comes_back(tmp_path: Path) -> None:
    """The buffer refuses writes (a real SQLite failure); the committer fails, is restarted,
    reported in the status and metrics, and commits the waiting batches once it can."""
    key = tmp_path / "gw.key"
    signer = EcSigner.generate()
    signer.save(key)
    (tmp_path / "gateway.toml").write_text(
        '[gateway]\ndevice = "%s"\nkey_file = "%s"\nbatch_readings = 2\n'
        '[store]\npath = "buffer.sqlite"\nbudget_bytes = 10_000_000\n' % (GW, key))
    gw = Gateway(load_config(tmp_path / "gateway.toml"))
    gw.store._db.execute("CREATE TRIGGER full BEFORE INSERT ON batches "
                         "BEGIN SELECT RAISE(ABORT, 'disk full'); END")

    async def scenario() -> None:
        ready = asyncio.Event()
        run = asyncio.create_task(gw.run(ready))
        await ready.wait()
        gw.add_readings([Reading("pm25", "ug/m3", 12.0), Reading("pm10", "ug/m3", 20.0)],
                        1.7e9)
        health = gw.supervisor.health["committer"]
        await _until(lambda: health.restarts >= 2)
        assert "disk full" in health.last_error
        st = status_map(gw)
        assert st["tasks"]["committer"]["restarts"] >= 2
        text = metrics_text(registry_for(gw))
        assert 'cityedge_gateway_task_restarts_total{task="committer"}' in text
        assert gw.store.depth() == 0
        gw.store._db.execute("DROP TRIGGER full")
        await _until(lambda: gw.store.depth() == 1)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    asyncio.run(scenario())
    from cityedge_gateway.store import Store

    s = Store(tmp_path / "buffer.sqlite", 10_000_000)
    v = chain.BatchVerifier({signer.kid: chain.KeyEntry(GW, signer.verifier())})
    verdicts = [v.check(r.data) for r in s.oldest(10)]
    assert [x.status for x in verdicts] == ["ok"]
    assert [r[2] for r in verdicts[0].batch.records] == [12.0, 20.0]


def test_stop_cancels_twice_a_task_whose_clean_up_waits_for_a_silent_peer() -> None:
    """aiomqtt's exit waits for the broker to close the socket after DISCONNECT; a broker
    that never does must not hold the gateway's shutdown (and its last commit) forever."""
    cleaned: list[str] = []

    async def waits_in_clean_up() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            try:
                await asyncio.Event().wait()  # the DISCONNECT nobody answers
            finally:
                cleaned.append("second cancel")

    async def scenario() -> list[str]:
        sup = Supervisor()
        sup.keep("forwarder", waits_in_clean_up)
        sup.keep("committer", lambda: asyncio.Event().wait())
        await asyncio.sleep(0)
        return await sup.stop(grace_s=0.05)

    left = asyncio.run(scenario())
    assert left == []
    assert cleaned == ["second cancel"]


def test_stop_leaves_a_task_that_ignores_every_cancel_and_says_so() -> None:
    obey = asyncio.Event()

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if obey.is_set():
                    raise
                # swallows the cancel: a bug, the shutdown must still end

    async def scenario() -> tuple[list[str], str]:
        sup = Supervisor()
        sup.keep("stubborn", stubborn)
        sup.keep("quiet", lambda: asyncio.Event().wait())
        await asyncio.sleep(0)
        left = await sup.stop(grace_s=0.05)
        error = sup.health["stubborn"].last_error
        obey.set()  # let the test end cleanly
        for task in sup.tasks:
            task.cancel()
        await asyncio.gather(*sup.tasks, return_exceptions=True)
        return left, error

    left, error = asyncio.run(scenario())
    assert left == ["stubborn"]
    assert error == "did not stop"
