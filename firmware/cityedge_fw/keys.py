"""The device's keys: its P-256 private key from the DER file on flash, and the trust
store of fleet public keys that may sign commands.

Used at boot (``main.build``) and by provisioning (the key for the CSR and the self-test,
the trust store for an unlock command); a boot-only module, unloaded with ``main``.
Measured (unix port, ROMFS): 0.5 KiB of heap for the module while it is loaded.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from cityedge_core import cose, p256
from cityedge_core.errors import LocalError

# ECPrivateKey: version 1, privateKey OCTET STRING(32)
_SEC1_PREFIX = const(b"\x02\x01\x01\x04\x20")


def read_file(path):
    """The bytes of ``path``; ``LocalError`` naming the file if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LocalError("cannot read %s: %s" % (path, e)) from e


def private_key_from_der(data):
    """The P-256 private scalar of a SEC1 (RFC 5915) or PKCS#8 (RFC 5958) DER key.

    Both wrap the same ``ECPrivateKey`` structure; its version and 32-byte key octets
    have a fixed encoding, so finding that prefix is enough (the curve is checked by
    deriving the public key, which must match the certificate's for TLS to work)."""
    i = data.find(_SEC1_PREFIX)
    if i < 0 or i + len(_SEC1_PREFIX) + 32 > len(data):
        raise LocalError("device key: not a P-256 SEC1 or PKCS#8 DER key")
    start = i + len(_SEC1_PREFIX)
    return p256.PrivateKey(int.from_bytes(data[start:start + 32], "big"))


def load_fleet_keys(paths, path=None):
    """The trust store: ``{kid: p256.PublicKey}`` of the fleet keys in ``paths`` (65-byte
    SEC1 points), each keyed by its COSE ``kid`` as the fleet's commands name it; or, once
    the root's statement is installed in the file ``path`` (``trust_check``: it replaces
    the provisioned seed), the keys it lists, each until its end by the clock now (a key
    with an end is not trusted without a clock). Only names interned anyway: each new
    one costs the boot's heap."""
    keys = [read_file(i) for i in paths]
    try:
        data = read_file(path) if path else None
    except LocalError:
        data = None
    if data is not None and data[:4] == b"CET1" and len(data) > 12:
        import time

        start = int(time.time())
        keys = []
        for i in range(13, 13 + 70 * data[12], 70):
            e = int.from_bytes(data[i + 65:i + 70], "big")  # the key's end
            if e == 0xFFFFFFFFFF or 1600000000 < start < e:
                keys.append(data[i:i + 65])
    data = {}
    for pub in keys:
        pub = p256.PublicKey.from_sec1(pub)
        data[cose.kid_for_public_key(pub.to_sec1())] = pub
    return data
