"""The fleet command keys a device obeys: the root's trust statement, checked at boot.

A ``trust-update`` command (``cityedge_core.trust_statement``: the offline root's signed
statement of the complete set of fleet command keys, inside a command the *current*
command key signed, which the gate checked) is taken by the running agent (``answers``,
a few lines: no module of its own, whose names would be interned while the agent runs):
it keeps the statement on flash (none: arguments that cannot hold one) and resets. The
check runs here, at the next boot before the agent is built (``main.main``, through
``update_check.run``), for the reason the update's manifest is checked at boot: the
statement's
module, the COSE decoder and a P-256 verification take about 20 KiB (the core module's
doc), which a 64 KiB heap has at boot and not beside a streaming agent.

Files beside the agent's state file ``S`` (``config.json`` ``store.state``), each written
by ``files.write_atomic`` (a power cut leaves the old file or the new one):

``S.trust.new``  the statement to check: ``[len, device, seq 8, now 8, statement]``
                 (``now``: the trusted time the gate took the command at)
``S.trust``      the installed set: ``b"CET1"``, version (8), count (1), per key its
                 65-byte point and ``until`` (5 bytes; ``NO_END``: none), then the
                 statement itself (to know a resend of it)

The rules are the core's ``check_statement`` (the root is the last certificate the device
trusts, ``tls.ca``: the offline root that signs the fleet's intermediates; the version
must be above the installed one: no rollback), then:

0. no statement (arguments that are not a map with bytes of at most 1 KiB): ``refused``;
1. the statement installed already, sent again (the answer was lost, or a power cut came
   between installing and answering): ``ok``, nothing changes;
2. ``S.trust`` is written (the new set), then the signed result is kept with the
   device's other answers (``answers``: the fleet's resend of the command gets it), then
   ``S.trust.new`` is removed (``boot_answer.run`` runs these steps at boot: this
   module stays free of the agent's modules, so provisioning can use it). A cut before
   the last step checks again: rule 1. An answer the check left no heap to sign is
   signed at the next boot (``boot_answer.run``).

Refusals (forged, signed by another key than the root, a retired root, the wrong AAD,
truncated or garbage CBOR, not valid now, not newer) are answered ``refused`` with the
reason; nothing is written but the answer.

At boot ``keys.load_fleet_keys`` takes the keys of ``S.trust`` (each until its ``until``,
by the board's clock at boot; without a clock a key with an end is not trusted) instead
of the provisioned ``fleet_keys``, which are only the seed. Enrollment
(``provision.Provisioner.finish_enrollment``) installs the statement the fleet's answer
carries with ``install_checked``.
"""

from .files import write_atomic

MAGIC = b"CET1"
NO_END = 0xFFFFFFFFFF  # ``until`` of a key with no end (``trust_statement.TIME_MAX``)
_OID_EC = b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"  # ecPublicKey
_OID_P256 = b"\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07"  # prime256v1


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _tlv(b, i, tag):
    """(content start, content end) of the DER element at ``i`` with ``tag``."""
    if i + 2 > len(b) or b[i] != tag:
        raise ValueError("root certificate: expected tag 0x%02x at %d" % (tag, i))
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k <= 3 or i + k > len(b):
            raise ValueError("root certificate: bad length at %d" % i)
        n = int.from_bytes(b[i:i + k], "big")
        i += k
    if i + n > len(b):
        raise ValueError("root certificate: truncated")
    return i, i + n


def root_point(cert):
    """The P-256 point (65 bytes) of an X.509 certificate's subject public key (DER)."""
    i, _ = _tlv(cert, 0, 0x30)  # Certificate
    i, _ = _tlv(cert, i, 0x30)  # TBSCertificate
    if i < len(cert) and cert[i] == 0xA0:  # [0] version
        i = _tlv(cert, i, 0xA0)[1]
    i = _tlv(cert, i, 0x02)[1]  # serialNumber
    for _ in range(4):  # signature, issuer, validity, subject
        i = _tlv(cert, i, 0x30)[1]
    i, end = _tlv(cert, i, 0x30)  # SubjectPublicKeyInfo
    a, b = _tlv(cert, i, 0x30)  # its AlgorithmIdentifier
    if cert[a:b] != _OID_EC + _OID_P256:
        raise ValueError("root certificate: not a P-256 key")
    s, e = _tlv(cert, b, 0x03)
    if e - s != 66 or cert[s] != 0 or cert[s + 1] != 4 or e != end:
        raise ValueError("root certificate: not an uncompressed P-256 point")
    return bytes(cert[s + 1:e])


def installed(path):
    """``(version, [(point, until or None)], statement)`` of the installed set in
    ``path``, or None when there is none (or it is not one: a file only this firmware
    writes, atomically)."""
    raw = _read(path)
    if raw is None or len(raw) < 13 or raw[:4] != MAGIC:
        return None
    n = raw[12]
    i = 13 + 70 * n
    if not 0 < n <= 4 or len(raw) < i:
        return None
    keys = []
    for j in range(13, i, 70):
        until = int.from_bytes(raw[j + 65:j + 70], "big")
        keys.append((bytes(raw[j:j + 65]), None if until == NO_END else until))
    return int.from_bytes(raw[4:12], "big"), keys, bytes(raw[i:])


def install_checked(path, ca_der, data, now):
    """Check statement ``data`` against the root in ``ca_der`` and the set installed in
    ``path`` (its version; ``now``: trusted UNIX seconds) and install it. Returns the
    version installed, or 0 when ``data`` is the one installed already. Raises the core's
    ``PeerError`` (refused) or ``ValueError``/``OSError`` (our own files)."""
    from cityedge_core import cose, p256
    from cityedge_core import trust_statement as ts

    held = installed(path)
    if held is not None and held[2] == data:
        return 0
    point = root_point(ca_der)
    st = ts.check_statement(data, p256.PublicKey.from_sec1(point),
                            cose.kid_for_public_key(point), held[0] if held else 0, now)
    parts = [MAGIC + st.version.to_bytes(8, "big") + bytes([len(st.keys)])]
    for p, until in st.keys:
        parts.append(p + (NO_END if until is None else until).to_bytes(5, "big"))
    parts.append(data)
    write_atomic(path, tuple(parts))
    return st.version
