"""A bystander for ``bench.city``'s stage timings: a plain MQTT subscriber (the test
broker's ``OBSERVER`` identity, its own process so the simulator's interpreter lock does
not delay it) that writes ``<wall clock> <device id>`` for every batch the broker
delivers on ``ce/v1/+/up/readings``, so the bench can tell the broker's delivery time
from the ingest workers'.

``python bench/city_watch.py HOST PORT CA CERT KEY OUT`` runs until SIGTERM."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any


def main(host: str, port: int, ca: str, cert: str, key: str, out_path: str) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    out = open(out_path, "w", buffering=1)  # noqa: SIM115 - lines until SIGTERM
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-observer",
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)

    def on_connect(c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        c.subscribe("ce/v1/+/up/readings", qos=0)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        out.write("%.6f %s\n" % (time.time(), msg.topic.split("/")[2]))

    client.on_connect = on_connect
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_a: client.disconnect())
    client.connect(host, port, keepalive=30)
    client.loop_forever()
    out.close()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), a[2], a[3], a[4], a[5])
