"""Boot entry of the device agent: read the configuration, load keys, start the agent.

On a board, the frozen ``main.py`` calls ``cityedge_fw.main.main(uart, info)``: while the
device is not locked, provisioning mode runs on ``uart`` (``provision_main.board_boot``,
which also retries a pending offline enrollment); after a fresh lock the board resets so
the agent starts from a clean heap; a locked device starts the agent at once. The
simulator calls ``build(cfg, board)`` itself. The configuration is a JSON map (checked by
``config.load``):

``broker``     ``{"host": ..., "port": 8883, "server_hostname": ...}``
``tls``        paths of DER files: ``{"cert": ..., "key": ..., "ca": ...}``; the key is the
               device's P-256 key (SEC1 or PKCS#8 DER), used for TLS *and* batch signing
``fleet_keys`` paths of fleet public keys (65-byte SEC1 points) trusted for commands
``store``      ``{"dir": "/buffer", "state": "/state.cbor"}``
``agent``      agent settings (``settings.DEFAULTS``); ``device`` overrides the board's URN

Errors that stop the boot (no key, no certificate) are printed and re-raised: the board
then resets through its watchdog and the technician sees the message on the console.
"""

import gc

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio  # type: ignore[no-redef]

from cityedge_core import cose, p256
from cityedge_core.errors import LocalError

CONFIG_PATH = "/config.json"
_SEC1_PREFIX = b"\x02\x01\x01\x04\x20"  # ECPrivateKey: version 1, privateKey OCTET STRING(32)


def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LocalError("cannot read %s: %s" % (path, e)) from e


def private_key_from_der(der):
    """The P-256 private scalar of a SEC1 (RFC 5915) or PKCS#8 (RFC 5958) DER key.

    Both wrap the same ``ECPrivateKey`` structure; its version and 32-byte key octets
    have a fixed encoding, so finding that prefix is enough (the curve is checked by
    deriving the public key, which must match the certificate's for TLS to work)."""
    i = der.find(_SEC1_PREFIX)
    if i < 0 or i + len(_SEC1_PREFIX) + 32 > len(der):
        raise LocalError("device key: not a P-256 SEC1 or PKCS#8 DER key")
    start = i + len(_SEC1_PREFIX)
    return p256.PrivateKey(int.from_bytes(der[start:start + 32], "big"))


def load_fleet_keys(paths):
    keys = {}
    for path in paths:
        pub = p256.PublicKey.from_sec1(read_file(path))
        keys[cose.kid_for_public_key(pub.to_sec1())] = pub
    return keys


def build(cfg, board):
    """Make the ``Agent`` described by ``cfg`` on ``board`` (keys loaded, store opened).

    The boot-only modules it loads (``settings``, ``config``) and the CBOR decoder
    (reading the state file) are unloaded before it returns (``cityedge_fw.unload``)."""
    from .mqtt_async import tls_context

    tls = cfg["tls"]
    key_der = read_file(tls["key"])
    # The TLS context first, before the agent's modules: mbedTLS parses the certificates
    # in blocks of up to 3 KB, which a 64 KiB heap has in one piece only this early.
    gc.collect()
    ssl_ctx = tls_context(read_file(tls["cert"]), key_der, read_file(tls["ca"]))
    key = private_key_from_der(key_der)
    del key_der
    kid = cose.kid_for_public_key(key.public_key().to_sec1())
    gc.collect()
    from . import ON_DEMAND, agent, settings, store, unload

    checked = settings.check(cfg.get("agent", {}))
    del settings
    st = cfg.get("store", {})
    broker = cfg["broker"]
    device = cfg.get("device") or board.device_id()
    budget = checked["buffer_budget_bytes"]
    a = agent.Agent(
        board, device, key, kid, store.RingBuffer(st.get("dir", "/buffer"), budget),
        store.State(st.get("state", "/state.cbor")),
        checked, broker["host"], broker.get("port", 8883), ssl_ctx,
        broker.get("server_hostname"), load_fleet_keys(cfg.get("fleet_keys", ())),
        board.sensors(cfg))
    unload("cityedge_fw.settings", "cityedge_fw.config", *ON_DEMAND)
    return a


def start(cfg, board):
    """Build the agent and run it forever (returns only if a task fails)."""
    a = build(cfg, board)
    board.connect_network()
    asyncio.run(a.run())


def _machine_reset():
    import machine  # type: ignore[import-not-found]

    machine.reset()


def main(uart=None, info=None, root="/", reset=_machine_reset, agent=start):
    """Boot: provisioning mode while not locked (given the board's ``uart`` and ``info``
    ``{"model", "serial", "device", "firmware"}``), then the agent.

    Returns False if the provisioning line closed without a lock (only a test's UART
    does that), True after ``reset()`` returned (a real reset never does)."""
    from . import config, hal

    if uart is not None:
        from . import provision, provision_main

        fresh = not provision.is_locked(root)
        if not provision_main.board_boot(uart, root, info, reset=reset):
            return False
        if fresh:
            gc.collect()
            reset()  # the agent starts on the next boot, from a clean heap
            return True
    path = CONFIG_PATH if root == "/" else root.rstrip("/") + CONFIG_PATH
    cfg = config.load(path)
    agent(cfg, hal.get_board(cfg))
