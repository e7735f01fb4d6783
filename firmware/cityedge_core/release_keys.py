"""Release trust: the list of release keys, signed by a threshold of offline root keys.

Who may publish an update is decided here, on the device and on the Pi gateway alike.
The fleet's command key (``command_gate``) is *not* a release key: a fleet server that
is broken into can command devices but cannot install software on them. Release keys
live where releases are made (``cityedge release keygen``), and the offline root keys
(one per holder, e.g. three people of the security team) vouch for them.

The list is a **COSE_Sign** (RFC 9052 §4.1, tag 98) over the CBOR map below, with one
COSE_Signature (ES256, ``kid`` protected) per root key that signed it. COSE_Sign and not
k separate COSE_Sign1 messages because: the payload is one byte string that every holder
signs unchanged (no holder can sign a different list by mistake); a holder adds a
signature to the array without touching the others (``cityedge release cosign``: the
holders never meet and never share a file but the list); an independent COSE library
(pycose's ``SignMessage``) reads and checks it. Every signature is made with external
AAD ``LIST_AAD``, so no other message signed by a root key (or anything signed by another
key for another purpose) can pass as a list.

=====  ==========  ==================================================================
key    name        value
=====  ==========  ==================================================================
1      version     uint >= 1, monotonic: a device refuses a list older than the one it
                   has taken (revocation cannot be undone by replaying an old list)
2      threshold   uint k >= 1: root signatures the signers require (the device also
                   requires its own threshold: the higher one applies)
3      roots       array of root kids (8 bytes each) the list is meant for
4      keys        array of release keys, each a map ``{1: kid, 2: SEC1 point (65
                   bytes), 3: [roles...], 4: expires (UNIX seconds)}``; ``kid`` is
                   ``cose.kid_for_public_key`` of the point; roles are the components
                   the key may sign (``ROLES``)
=====  ==========  ==================================================================

``verify_list`` (the one place a list is accepted) applies, in order; the first failure
refuses with a reason code (``RefusedList.reason``):

1. ``keys_malformed``: at most ``LIST_MAX_BYTES``; tag 98, four items; body protected
   header empty or a map without ``crit``; at most ``_MAX_SIGNATURES`` signatures, each a
   protected ``{alg: ES256, kid}``; the payload map exactly as above (no unknown keys,
   kids unique and equal to their point's, roles known, at most ``_MAX_RELEASE_KEYS``).
2. ``keys_threshold``: the list's roots are all roots the device trusts, and the number
   of *distinct* trusted roots whose signature verifies is at least
   ``max(device threshold, list threshold)``. Signatures by unknown kids do not count,
   a root that signs twice counts once, and a bad signature of a trusted root does not
   count (it is not fatal: a holder may re-sign).
3. ``keys_rollback``: ``version`` is at least the version the device stored. An equal
   version is the list it has; a higher one replaces it (the caller persists
   ``ReleaseKeys.version`` once an update it vouched for is accepted).

Points are validated when the list is read (``p256.PublicKey.from_sec1`` on the device).
Rotation: the root holders certify version v+1 with the new key and without the old one.
Revocation is the same step done at once: a key not in the list is unknown, whatever it
signed before.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x


from . import cbor, cose
from .errors import PeerError

_COSE_SIGN_TAG = const(98)
LIST_AAD = b"cityedge release-keys v1"
ROLES = ("device-firmware", "gateway")  # the components a release key may sign

# limits (here, not in ``limits``: a device loads this module only while it updates)
LIST_MAX_BYTES = const(8192)  # bytes: a whole signed list
MAX_ROOTS = const(16)  # root keys a device trusts, and a list names
_MAX_SIGNATURES = const(16)  # COSE_Signatures in one list
_MAX_RELEASE_KEYS = const(16)  # release keys in one list
_KID_BYTES = const(8)  # bytes: cityedge kids (``cose.kid_for_public_key``)
_SEC1_BYTES = const(65)  # bytes: an uncompressed P-256 point
VERSION_MAX = const(0xFFFFFFFF)  # largest list version

L_VERSION = const(1)
_L_THRESHOLD = const(2)
_L_ROOTS = const(3)
_L_KEYS = const(4)
_K_KID = const(1)
_K_PUBLIC = const(2)
_K_ROLES = const(3)
_K_EXPIRES = const(4)

KEYS_MALFORMED = "keys_malformed"
KEYS_THRESHOLD = "keys_threshold"
KEYS_ROLLBACK = "keys_rollback"


class RefusedList(PeerError):
    """A release-key list that is not taken; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, msg: str) -> None:
        super().__init__("%s: %s" % (reason, msg))
        self.reason = reason
        self.detail = msg


class ReleaseKey:
    """One certified release key: ``kid``, ``verifier`` (has ``verify(msg, sig)``),
    ``roles`` (tuple of components), ``expires`` (UNIX seconds)."""

    def __init__(self, kid: bytes, public: bytes, verifier: Any, roles: Any,
                 expires: int) -> None:
        self.kid = kid
        self.public = public
        self.verifier = verifier
        self.roles = roles
        self.expires = expires


class ReleaseKeys:
    """A verified list: ``version``, ``threshold``, ``roots`` (kids), ``keys`` (kid ->
    ``ReleaseKey``), ``signed_by`` (the trusted root kids whose signature verified)."""

    def __init__(self, version: int, threshold: int, roots: Any, keys: Any,
                 signed_by: Any) -> None:
        self.version = version
        self.threshold = threshold
        self.roots = roots
        self.keys = keys
        self.signed_by = signed_by


def payload_map(version: int, threshold: int, roots: Any, keys: Any) -> Any:
    """The list's payload map; ``keys``: iterable of ``(sec1_point, roles, expires)``."""
    entries = []
    for public, roles, expires in keys:
        entries.append({_K_KID: cose.kid_for_public_key(public), _K_PUBLIC: public,
                        _K_ROLES: list(roles), _K_EXPIRES: expires})
    return {L_VERSION: version, _L_THRESHOLD: threshold, _L_ROOTS: list(roots),
            _L_KEYS: entries}


def signature_structure(body_protected: bytes, sign_protected: bytes, payload: bytes,
                        external_aad: bytes = LIST_AAD) -> bytes:
    """The bytes one root signs: ["Signature", body_protected, sign_protected,
    external_aad, payload] (RFC 9052 §4.4)."""
    return cbor.dumps(["Signature", body_protected, sign_protected, external_aad, payload])


def sign_protected(kid: bytes) -> bytes:
    """A COSE_Signature's protected header: ``{alg: ES256, kid}``."""
    return cbor.dumps({cose.HDR_ALG: cose.ALG_ES256, cose.HDR_KID: kid})


def encode_list(payload: bytes, signatures: Any, body_protected: bytes = b"") -> bytes:
    """The tagged COSE_Sign of ``payload``; ``signatures``: ``(sign_protected,
    signature)`` pairs as made with ``sign_protected`` and ``signature_structure``."""
    from .cbor_types import Tag  # loaded on use (a device never encodes a list)

    sigs = [[prot, {}, sig] for prot, sig in signatures]
    return cbor.dumps(Tag(_COSE_SIGN_TAG, [body_protected, {}, payload, sigs]))


def add_signature(data: bytes, signer: Any, kid: bytes) -> bytes:
    """``data`` (a list, checked for shape) with one more signature, by ``signer``; a
    signature already made by ``kid`` is replaced (a root counts once anyway)."""
    body_prot, payload, sigs = _split(data)
    prot = sign_protected(kid)
    sig = signer.sign(signature_structure(body_prot, prot, payload))
    kept = [(p, s) for p, k, s in sigs if k != kid]
    return encode_list(payload, kept + [(prot, sig)], body_prot)


def read_unverified(data: bytes) -> Any:
    """``(payload, signer kids)`` of a list, its shape checked and nothing verified (for
    tools that show a list before a holder signs it)."""
    _body, payload, sigs = _split(data)
    return payload, [kid for _p, kid, _s in sigs]


def _malformed(msg: str) -> RefusedList:
    return RefusedList(KEYS_MALFORMED, msg)


def _split(data: Any) -> Any:
    """``(body_protected, payload, [(sign_protected, kid, signature)])`` of a COSE_Sign
    in the shape rule 1 allows; nothing is verified yet."""
    if len(data) > LIST_MAX_BYTES:
        raise _malformed("list of %d bytes, limit %d" % (len(data), LIST_MAX_BYTES))
    try:
        obj = cbor.loads(data, max_bytes=LIST_MAX_BYTES, max_depth=4, max_items=256)
    except PeerError as e:
        raise _malformed("not CBOR: %s" % e) from None
    if getattr(obj, "tag", None) != _COSE_SIGN_TAG:
        raise _malformed("not a tagged COSE_Sign (98)")
    obj = obj.value
    if not isinstance(obj, list) or len(obj) != 4:
        raise _malformed("COSE_Sign must be an array of four items")
    body_prot, unprot, payload, sigs = obj
    if not isinstance(body_prot, bytes) or not isinstance(unprot, dict):
        raise _malformed("bad body headers")
    if body_prot:
        body = _header_map(body_prot)
        if cose.HDR_CRIT in body or cose.HDR_ALG in body:
            raise _malformed("body header with crit or alg")
    if cose.HDR_CRIT in unprot:
        raise _malformed("crit in an unprotected header")
    if not isinstance(payload, bytes):
        raise _malformed("payload must be a byte string")
    if not isinstance(sigs, list) or not 0 < len(sigs) <= _MAX_SIGNATURES:
        raise _malformed("1 to %d signatures expected" % _MAX_SIGNATURES)
    out = []
    for s in sigs:
        if not isinstance(s, list) or len(s) != 3:
            raise _malformed("a COSE_Signature is an array of three items")
        prot, s_unprot, sig = s
        if not isinstance(prot, bytes) or not isinstance(s_unprot, dict) or \
                not isinstance(sig, bytes):
            raise _malformed("bad COSE_Signature items")
        hdr = _header_map(prot)
        if hdr.get(cose.HDR_ALG) != cose.ALG_ES256 or cose.HDR_CRIT in hdr or \
                cose.HDR_CRIT in s_unprot or cose.HDR_ALG in s_unprot:
            raise _malformed("a signature's protected header must be {alg: ES256, kid}")
        kid = hdr.get(cose.HDR_KID)
        if not isinstance(kid, bytes) or len(kid) != _KID_BYTES or cose.HDR_KID in s_unprot:
            raise _malformed("a signature's kid must be protected, %d bytes" % _KID_BYTES)
        if len(sig) != cose.SIGNATURE_BYTES:
            raise _malformed("an ES256 signature is 64 bytes")
        out.append((prot, kid, sig))
    return body_prot, payload, out


def _header_map(raw: bytes) -> Any:
    try:
        hdr = cbor.loads(raw, max_items=16, max_depth=2)
    except PeerError as e:
        raise _malformed("header is not CBOR: %s" % e) from None
    if not isinstance(hdr, dict):
        raise _malformed("header is not a map")
    return hdr


def _exact_keys(m: Any, keys: Any) -> bool:
    """True if ``m`` is a map with exactly ``keys`` (keys of any type compared safely)."""
    return isinstance(m, dict) and len(m) == len(keys) and all(k in m for k in keys)


def _uint(v: Any, top: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top


def decode_payload(payload: bytes, make_verifier: Any) -> Any:
    """The payload map checked (rule 1): ``(version, threshold, roots, keys)``."""
    try:
        m = cbor.loads(payload, max_bytes=LIST_MAX_BYTES, max_depth=4, max_items=256)
    except PeerError as e:
        raise _malformed("payload is not CBOR: %s" % e) from None
    if not _exact_keys(m, (L_VERSION, _L_THRESHOLD, _L_ROOTS, _L_KEYS)):
        raise _malformed("payload must be a map of keys 1-4")
    version = m[L_VERSION]
    threshold = m[_L_THRESHOLD]
    roots = m[_L_ROOTS]
    if not _uint(version, VERSION_MAX) or version < 1:
        raise _malformed("version must be 1..%d" % VERSION_MAX)
    if not isinstance(roots, list) or not 0 < len(roots) <= MAX_ROOTS:
        raise _malformed("roots: 1 to %d kids" % MAX_ROOTS)
    for r in roots:
        if not isinstance(r, bytes) or len(r) != _KID_BYTES or roots.count(r) != 1:
            raise _malformed("roots: distinct %d-byte kids" % _KID_BYTES)
    if not _uint(threshold, len(roots)) or threshold < 1:
        raise _malformed("threshold must be 1..%d (the roots named)" % len(roots))
    entries = m[_L_KEYS]
    if not isinstance(entries, list) or len(entries) > _MAX_RELEASE_KEYS:
        raise _malformed("keys: at most %d" % _MAX_RELEASE_KEYS)
    keys = {}
    for entry in entries:
        if not _exact_keys(entry, (_K_KID, _K_PUBLIC, _K_ROLES, _K_EXPIRES)):
            raise _malformed("a release key is a map of keys 1-4")
        kid = entry[_K_KID]
        public = entry[_K_PUBLIC]
        roles = entry[_K_ROLES]
        expires = entry[_K_EXPIRES]
        if not isinstance(public, bytes) or len(public) != _SEC1_BYTES:
            raise _malformed("a release key's point is %d bytes" % _SEC1_BYTES)
        if kid != cose.kid_for_public_key(public) or kid in keys:
            raise _malformed("a release key's kid is not its point's, or repeats")
        if not isinstance(roles, list) or not 0 < len(roles) <= len(ROLES):
            raise _malformed("a release key has 1 to %d roles" % len(ROLES))
        for role in roles:
            if role not in ROLES or roles.count(role) != 1:
                raise _malformed("unknown or repeated role %r" % (role,))
        if not _uint(expires, 0xFFFFFFFFFF):
            raise _malformed("a release key's expiry must be UNIX seconds")
        try:
            verifier = make_verifier(public)
        except PeerError as ex:
            raise _malformed("a release key is not a P-256 point: %s" % ex) from None
        keys[kid] = ReleaseKey(kid, public, verifier, tuple(roles), expires)
    return version, threshold, roots, keys


def verify_list(data: Any, roots: Any, threshold: int, stored_version: int = 0,
                make_verifier: Any = None) -> ReleaseKeys:
    """The list in ``data`` checked by the rules above, or ``RefusedList``.

    ``roots``: dict root kid -> verifier the device trusts (its offline root set);
    ``threshold``: the device's own k; ``stored_version``: the list version it has
    taken (0: none); ``make_verifier(sec1) -> verifier`` (``p256.PublicKey.from_sec1``
    when None).
    """
    if not 0 < threshold <= len(roots):
        raise ValueError("the device's threshold must be 1..len(roots)")
    if make_verifier is None:
        from .p256 import PublicKey

        make_verifier = PublicKey.from_sec1
    body_prot, payload, sigs = _split(data)
    version, list_k, list_roots, keys = decode_payload(payload, make_verifier)
    for r in list_roots:
        if r not in roots:
            raise RefusedList(KEYS_THRESHOLD, "the list names root %s the device does not "
                              "trust" % _hex(r))
    need = max(threshold, list_k)
    signed_by = []  # type: list[bytes]
    for prot, kid, sig in sigs:
        if len(signed_by) >= need:
            break
        verifier = roots.get(kid)
        if verifier is None or kid in signed_by or kid not in list_roots:
            continue
        if verifier.verify(signature_structure(body_prot, prot, payload), sig):
            signed_by.append(kid)
    if len(signed_by) < need:
        raise RefusedList(KEYS_THRESHOLD, "%d valid root signature(s), %d needed"
                          % (len(signed_by), need))
    if version < stored_version:
        raise RefusedList(KEYS_ROLLBACK, "list version %d is older than the stored %d"
                          % (version, stored_version))
    return ReleaseKeys(version, list_k, list_roots, keys, signed_by)


def _hex(b: bytes) -> str:
    return "".join("%02x" % x for x in b)
