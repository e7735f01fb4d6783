"""What the gateway tests share: the gateway and node ids, records, and a watcher of
what reaches the city broker."""

from __future__ import annotations

import asyncio
import ssl

import aiomqtt

from cityedge_core import senml

from support.mosquitto import OBSERVER, TestPKI

GW = "urn:dev:mac:b827ebfffe123456"
NODE = "urn:dev:mac:0024befffe804ff1"


def recs(n: int, k: int) -> list[dict[int, object]]:
    """``n`` SenML records of value ``k``, a second apart."""
    return [{senml.N: "t", senml.U: "Cel", senml.V: k, senml.T: 1.7e9 + i} for i in range(n)]


async def subscriber(
    pki: TestPKI, port: int, got: list[tuple[str, bytes]], up: asyncio.Event
) -> None:
    """Watch every ``up/`` topic on the broker at ``port`` (a persistent session, as the
    fleet holds one), appending ``(topic, payload)`` to ``got``; ``up`` while subscribed."""
    creds = pki.service(OBSERVER)
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    ctx.load_cert_chain(str(creds.cert_pem), str(creds.key_pem))
    while True:
        try:
            async with aiomqtt.Client(
                "127.0.0.1", port, identifier="fleet-ingest-test", clean_session=False,
                tls_context=ctx, keepalive=5,
            ) as c:  # fmt: skip
                await c.subscribe("ce/v1/+/up/#", qos=1)
                up.set()
                async for msg in c.messages:
                    got.append((str(msg.topic), bytes(msg.payload)))  # type: ignore[arg-type]
        except aiomqtt.MqttError:
            up.clear()
            await asyncio.sleep(0.1)
