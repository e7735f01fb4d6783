"""Key rotation's wire formats (``cityedge_core.rotation``, ``rotation_decode``), on CPython
(pytest) and MicroPython (tests/mp/run.py): what a device writes with the core alone, the
fleet's reader takes back, and a message that is not exactly that is refused."""

import hashlib

from cityedge_core import cbor, cose, csr, limits, p256, rotation, rotation_decode
from cityedge_core.errors import LimitError, MalformedError, SignatureError

DEVICE = "urn:dev:mac:0024befffe804ff1"
OLD = p256.PrivateKey(0xD1CE5EED42)
OLD_KID = cose.kid_for_public_key(OLD.public_key().to_sec1())
NEW = p256.PrivateKey(0xBEEF5EED77)
_CSR = []


def _csr():
    if not _CSR:  # a pure-Python signature on MicroPython: made once
        _CSR.append(csr.build_csr(NEW, DEVICE))
    return _CSR[0]


def _refused(data, exc=MalformedError):
    try:
        rotation_decode.decode_csr_message(data)
    except exc as e:
        return str(e)
    raise AssertionError("accepted")


def test_the_fleet_reads_the_message_a_device_writes():
    der = _csr()
    data = rotation.csr_message(OLD, OLD_KID, DEVICE, 7, der)
    assert len(data) <= limits.CSR_MESSAGE_MAX_BYTES
    msg = rotation_decode.decode_csr_message(data)
    assert (msg.csr, msg.device, msg.rotation_id, msg.kid) == (der, DEVICE, 7, OLD_KID)
    assert msg.csr_sha256 == hashlib.sha256(der).digest() and msg.digest_matches()
    msg.verify(OLD.public_key())  # the current key signed it, with the rotation's AAD


def test_a_proof_by_another_key_or_without_the_aad_does_not_verify():
    der = _csr()
    msg = rotation_decode.decode_csr_message(rotation.csr_message(NEW, OLD_KID, DEVICE, 7,
                                                                  der))
    try:
        msg.verify(OLD.public_key())
        raise AssertionError("a proof by the new key passed as the old key's")
    except SignatureError:
        pass
    # the same payload signed without the AAD (as any other message of the key would be)
    plain = cose.encode_sign1(rotation.proof_payload(DEVICE, 7, der), OLD, OLD_KID)
    forged = cbor.dumps({rotation.M_CSR: der, rotation.M_PROOF: plain})
    try:
        rotation_decode.decode_csr_message(forged).verify(OLD.public_key())
        raise AssertionError("a proof without the rotation AAD verified")
    except SignatureError:
        pass


def test_a_proof_for_another_csr_is_seen():
    der = _csr()
    proof = cose.encode_sign1(rotation.proof_payload(DEVICE, 7, der + b"x"), OLD, OLD_KID,
                              rotation.PROOF_AAD)
    msg = rotation_decode.decode_csr_message(
        cbor.dumps({rotation.M_CSR: der, rotation.M_PROOF: proof}))
    assert not msg.digest_matches()


def test_shapes_that_are_refused():
    der = _csr()
    good = rotation.csr_message(OLD, OLD_KID, DEVICE, 7, der)
    proof = cbor.loads(good)[rotation.M_PROOF]
    assert "not a map" in _refused(cbor.dumps([der, proof]))
    assert "lacks key 2" in _refused(cbor.dumps({rotation.M_CSR: der}))
    assert "must not have" in _refused(cbor.dumps({1: der, 2: proof, 3: 0}))
    assert "CSR (1)" in _refused(cbor.dumps({1: "text", 2: proof}))
    assert "proof (2)" in _refused(cbor.dumps({1: der, 2: 5}))
    _refused(cbor.dumps({1: bytes(limits.CSR_MAX_BYTES + 1), 2: proof}), LimitError)
    _refused(bytes(limits.CSR_MESSAGE_MAX_BYTES + 1), LimitError)
    _refused(good + b"\x00")  # trailing bytes

    def signed(claims):
        p = cose.encode_sign1(cbor.dumps(claims), OLD, OLD_KID, rotation.PROOF_AAD)
        return cbor.dumps({1: der, 2: p})

    digest = hashlib.sha256(der).digest()
    assert "rotation id" in _refused(signed({1: DEVICE, 2: 0, 3: digest}))
    assert "rotation id" in _refused(signed({1: DEVICE, 2: True, 3: digest}))
    assert "rotation id" in _refused(signed({1: DEVICE, 2: limits.ROTATION_ID_MAX + 1,
                                             3: digest}))
    assert "hash (3)" in _refused(signed({1: DEVICE, 2: 7, 3: digest[:31]}))
    _refused(signed({1: "not a urn", 2: 7, 3: digest}))
    assert "lacks key 3" in _refused(signed({1: DEVICE, 2: 7}))


def test_the_device_reads_its_command_arguments():
    assert rotation.rotate_args({rotation.A_ROTATION: 3}) == 3
    cert = b"\x30\x82" + bytes(40)
    assert rotation.install_cert_args({1: 3, 2: cert}) == (3, cert)
    assert rotation.erase_key_args({1: 3, 2: OLD_KID}) == (3, OLD_KID)
    for bad in (None, [3], {}, {1: 0}, {1: -1}, {1: "3"}, {1: False},
                {1: limits.ROTATION_ID_MAX + 1}):
        try:
            rotation.rotate_args(bad)
            raise AssertionError("accepted %r" % (bad,))
        except MalformedError:
            pass
    for bad in ({1: 3}, {1: 3, 2: "pem"}, {1: 3, 2: b""}):
        try:
            rotation.install_cert_args(bad)
            raise AssertionError("accepted %r" % (bad,))
        except MalformedError:
            pass
    try:
        rotation.install_cert_args({1: 3, 2: bytes(limits.CERT_MAX_BYTES + 1)})
        raise AssertionError("accepted an oversized certificate")
    except LimitError:
        pass
    for bad in ({1: 3}, {1: 3, 2: b""}, {1: 3, 2: bytes(limits.KID_MAX_BYTES + 1)}):
        try:
            rotation.erase_key_args(bad)
            raise AssertionError("accepted %r" % (bad,))
        except MalformedError:
            pass


def test_a_certificate_holds_its_key_point_only():
    point = NEW.public_key().to_sec1()
    spki = csr.public_key_info(point)  # the same BIT STRING a certificate carries
    cert = b"\x30\x82\x01\x00" + spki + bytes(20)
    assert rotation.cert_holds_key(cert, point)
    assert not rotation.cert_holds_key(cert, OLD.public_key().to_sec1())


def test_the_csr_fits_its_limit_for_the_longest_device_id():
    long_id = "urn:dev:ops:" + "a" * (limits.DEVICE_ID_MAX_CHARS - 12)
    der = csr.build_csr(NEW, long_id)
    assert len(der) <= limits.CSR_MAX_BYTES
    data = rotation.csr_message(OLD, OLD_KID, long_id, limits.ROTATION_ID_MAX, der)
    assert len(data) <= limits.CSR_MESSAGE_MAX_BYTES
    assert rotation_decode.decode_csr_message(data).device == long_id
