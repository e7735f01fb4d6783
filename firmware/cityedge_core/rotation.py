"""Device key rotation with overlap: the one home of the protocol, and the device's half.

The fleet moves a device from its current key (certificate A) to a new one (certificate
B) without a moment in which the device has no valid identity, and revokes A only after
it has *seen* B in use. The steps, and who checks what:

1. **rotate.** The fleet queues the signed command ``rotate`` (``command``; target, seq
   and expiry checked by the device's gate) with args ``{1: rotation_id}``.
2. **CSR.** The device generates a new P-256 key into its *other* key slot (never the one
   its certificate A holds), builds a PKCS#10 CSR with it (``csr.build_csr``: CN and SAN =
   the device) and publishes on ``ce/v1/<device>/up/csr`` (QoS 1) the CBOR map
   ``{1: csr_der, 2: proof}`` (``csr_message``): the proof is a COSE_Sign1 (ES256, the
   ``kid`` of the CURRENT key A) over ``{1: device, 2: rotation_id, 3: sha256(csr_der)}``,
   with external AAD ``PROOF_AAD`` (see "changes" below). It then answers ``rotate`` with
   a signed ``ok`` result (``command.encode_result``).
3. **Fleet checks** (``cityedge_fleet.rotation``, in order; the first failure refuses and
   is audited): size and shape (``rotation_decode.decode_csr_message``); the topic's
   device = the proof's device; the proof verifies with an *active* credential of that
   device (not a suspended or revoked one); a rotation of this device is open (``sent``)
   with that rotation_id; the device is active; the CSR's self-signature holds, its key
   is P-256, its CN is the device, its key is no key the fleet knows (kid unique); the
   proof's hash is the CSR's SHA-256. Then the CA issues certificate B, the fleet stores
   it as a second *active* credential (A stays active: the overlap), grants nothing new
   at the broker (CN = client id = the device: the same role), and queues the signed
   command ``install-cert`` with args ``{1: rotation_id, 2: cert_der}``.
4. **Switch.** The device checks that the certificate holds the public key of its pending
   slot (``cert_holds_key``), stores it beside that key, makes that slot current
   (one atomic write of the slot pointer: the last step), answers ``ok``, reconnects with
   key B and certificate B, and signs its next batch with B: that batch's ``prev`` is the
   hash of the last batch signed with A (the chain does not restart).
5. **Proven.** The ingest takes a batch signed with B because B is a credential the fleet
   issued to that device (``cityedge_fleet.acceptance``: any of a device's active keys).
   The first such batch stored makes the rotation ``proven``; the fleet then revokes A
   and any other certificate of the device but B (one an earlier, interrupted rotation
   issued and the device never installed), re-signs the CRL, reloads the broker, and
   queues ``erase-key`` with args ``{1: rotation_id, 2: old_kid}``, ``old_kid`` being the
   key that signed the proof (the device's current key when it asked). The device erases the key
   whose kid that is (only if it is not the current one) and answers ``ok``: the rotation
   is ``old-revoked``. Every step is audited.

Per-device state on the fleet: ``pending -> sent -> csr-received -> issued -> proven ->
old-revoked``, or ``failed`` with a reason (the device refused a command, a bad CSR, the
rotation expired).

**Power cuts on the device** (two slots, a pointer): slot files are written atomically
and the pointer last. A cut before the pointer moves leaves A current (B pending or half
made: ignored and made again at the next ``rotate``); a cut after it leaves B current with
its certificate. ``erase-key`` erases only the slot that is not current, so at any cut the
device boots with a key whose certificate the fleet issued and has not revoked (A until
B is proven, then B).

**Changes from the first sketch** (found while writing it down):

- The proof carries external AAD ``PROOF_AAD``: without it, a signature by the device's key
  over ``{1, 2, 3}`` could in principle be offered as some other message the same key
  signs (batches, results, status); the AAD ties it to this one purpose.
- ``erase-key`` names the key by its kid rather than by slot: the fleet does not know the
  device's slot numbering, and a stale or replayed erase can then never name the current
  key.
- The device moves its slot pointer *before* it answers ``install-cert`` with ``ok`` (a
  cut between an ``ok`` and the move left the fleet waiting for a batch under a key the
  device had gone back from), and the fleet revokes every certificate but the new one
  when the new key is proven (an interrupted earlier rotation leaves an issued, never
  installed certificate active; it must not outlive the rotation that follows). Both
  were found by the power-cut test of the fast device.
- The device checks that ``install-cert``'s certificate holds its pending key (a cheap
  byte search for the 65-byte point, no DER parser): a certificate for another key, once
  installed, would leave the device with a key and certificate that do not match.

Heap (measured on the unix port, 64-bit, ``gc.mem_alloc`` after a collection): importing
this module from ``.mpy`` costs 2.6 KiB (6.2 KiB from source; bytecode in the heap either
way, less from ROMFS); a message for a 28-character URN is 451 bytes (CSR 289), 608
bytes of heap kept while it waits to be sent.

Sizes: ``limits.CSR_MAX_BYTES``, ``ROTATION_PROOF_MAX_BYTES``, ``CSR_MESSAGE_MAX_BYTES``,
``CERT_MAX_BYTES``, ``ROTATION_ID_MAX``. The fleet's reader is ``rotation_decode`` (not
loaded on a device).
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

import hashlib

from . import cbor, cose, limits
from .errors import LimitError, MalformedError

# command names
ROTATE = "rotate"
INSTALL_CERT = "install-cert"
ERASE_KEY = "erase-key"

# command argument keys
A_ROTATION = 1  # every rotation command: the rotation's id
A_CERT = 2  # install-cert: the certificate (DER)
A_OLD_KID = 2  # erase-key: the kid of the key to erase

# the up/csr message
M_CSR = 1  # the PKCS#10 request, DER
M_PROOF = 2  # COSE_Sign1 by the current key over the proof payload

# the proof's payload
P_DEVICE = 1
P_ROTATION = 2
P_CSR_SHA256 = 3

PROOF_AAD = b"cityedge rotation csr v1"  # external AAD of the proof (COSE Sig_structure)


def _rotation_id(args: Any) -> int:
    if not isinstance(args, dict):
        raise MalformedError("rotation: the arguments are not a map")
    rid = args.get(A_ROTATION)
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 < rid <= \
            limits.ROTATION_ID_MAX:
        raise MalformedError("rotation: the rotation id (1) must be an integer in 1..%d"
                             % limits.ROTATION_ID_MAX)
    return rid


def rotate_args(args: Any) -> int:
    """The rotation id of a ``rotate`` command's arguments (MalformedError if none)."""
    return _rotation_id(args)


def install_cert_args(args: Any) -> Any:
    """``(rotation_id, cert_der)`` of an ``install-cert`` command's arguments."""
    rid = _rotation_id(args)
    cert = args.get(A_CERT)
    if not isinstance(cert, bytes) or not cert:
        raise MalformedError("install-cert: the certificate (2) must be bytes")
    if len(cert) > limits.CERT_MAX_BYTES:
        raise LimitError("install-cert: certificate over %d bytes" % limits.CERT_MAX_BYTES)
    return rid, cert


def erase_key_args(args: Any) -> Any:
    """``(rotation_id, old_kid)`` of an ``erase-key`` command's arguments."""
    rid = _rotation_id(args)
    kid = args.get(A_OLD_KID)
    if not isinstance(kid, bytes) or not 0 < len(kid) <= limits.KID_MAX_BYTES:
        raise MalformedError("erase-key: the old kid (2) must be 1..%d bytes"
                             % limits.KID_MAX_BYTES)
    return rid, kid


def cert_holds_key(cert_der: bytes, sec1_point: bytes) -> bool:
    """True when the certificate's DER carries ``sec1_point`` (the 65-byte uncompressed
    point) as its key's BIT STRING: ``03 42 00 <point>``. The fleet's signature on the
    command vouches for the rest; this catches a certificate for another key."""
    return (b"\x03\x42\x00" + bytes(sec1_point)) in bytes(cert_der)


def proof_payload(device: str, rotation_id: int, csr_der: bytes) -> bytes:
    """The CBOR the proof signs."""
    return cbor.dumps({P_DEVICE: device, P_ROTATION: rotation_id,
                       P_CSR_SHA256: hashlib.sha256(csr_der).digest()})


def csr_message(signer: Any, kid: bytes, device: str, rotation_id: int, csr_der: bytes
                ) -> bytes:
    """The ``up/csr`` message: ``{1: csr_der, 2: proof}``, the proof signed by ``signer``
    (the device's CURRENT key, whose kid is ``kid``). ValueError when the CSR is over
    ``CSR_MAX_BYTES`` (the fleet would refuse it)."""
    if len(csr_der) > limits.CSR_MAX_BYTES:
        raise ValueError("rotation: CSR over %d bytes" % limits.CSR_MAX_BYTES)
    proof = cose.encode_sign1(proof_payload(device, rotation_id, csr_der), signer, kid,
                              PROOF_AAD)
    return cbor.dumps({M_CSR: bytes(csr_der), M_PROOF: proof})
