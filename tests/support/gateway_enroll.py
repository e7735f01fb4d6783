"""A Pi gateway enrolled through the fleet's API as a technician does it, with its
config written for the test's broker, and the answer's trust statement installed as
``cityedge gateway install-trust`` installs it: what the gateway's end-to-end tests
share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cityedge_fleet.models import Role
from cityedge_gateway.config import load_config
from cityedge_gateway.enroll_trust import install_enrollment
from cityedge_host.crypto import EcSigner

from support.fleet import Api, csr_for, device_body
from support.gateway import GW

_CONFIG = """
[gateway]
device = "%s"
fleet_keys = ["fleet0.pub"]
%s

[store]
path = "buffer.sqlite"

[broker]
host = "127.0.0.1"
port = %d
ca_file = "%s"
cert_file = "gateway.crt"
key_file = "gateway.key"
keepalive_s = 5
"""


def enroll_gateway(api: Api, gw_dir: Path, number: int, broker_port: int, ca_pem: Path,
                   gateway_lines: str, root_crt: bytes | None = None,
                   answer: Any = None) -> tuple[Path, EcSigner, dict[str, Any]]:
    """Register the gateway (device number ``number``), enroll it with a new key, and
    write into ``gw_dir`` its chain, key, the fleet's command key, ``root.crt`` (when
    ``root_crt`` is given; ``gateway_lines`` then names it as ``root_cert``) and
    ``gateway.toml`` (``gateway_lines``: more of its ``[gateway]`` section), then install
    the answer's trust statement (``answer``: a function that may change the answer
    first, as a thief between the fleet and the gateway would). Returns the config path,
    the enrolled key and the fleet's enrollment answer."""
    body = device_body(number, id=GW, hardware_class="rpi4", model="ce-gw-1")
    tech = api.headers(Role.technician)
    assert api.client.post("/devices", json=body, headers=tech).status_code == 201
    token = api.client.post("/enrollment/tokens", json={"serial": body["serial"]},
                            headers=tech).json()["token"]
    key = EcSigner.generate()
    r = api.client.post("/enroll", json={"serial": body["serial"], "token": token,
                                         "csr_pem": csr_for(key, GW)})
    assert r.status_code == 200, r.text
    enrolled: dict[str, Any] = r.json()
    gw_dir.mkdir()
    (gw_dir / "gateway.crt").write_text(enrolled["chain_pem"])
    key.save(gw_dir / "gateway.key")
    (gw_dir / "fleet0.pub").write_text(enrolled["fleet_keys"][0] + "\n")
    config = gw_dir / "gateway.toml"
    config.write_text(_CONFIG % (GW, gateway_lines, broker_port, ca_pem))
    if root_crt is not None:
        (gw_dir / "root.crt").write_bytes(root_crt)
    install_enrollment(load_config(config), answer(enrolled) if answer else enrolled)
    return config, key, enrolled
