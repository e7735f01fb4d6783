"""The signed update manifest, and ``check_update``: the one place an update is accepted.

A release is a COSE_Sign1 (ES256, ``kid`` protected, external AAD ``MANIFEST_AAD``) by a
release key of the root-signed list (``release_keys``) over this CBOR map:

=====  ============  ==============================================================
key    name          value
=====  ============  ==============================================================
1      component     ``"device-firmware"`` (the ROMFS image of ``make firmware``) or
                     ``"gateway"`` (the Pi's wheel set, one tar)
2      version       text, 1-4 dot-separated decimal numbers (``"1.4.0"``)
3      sequence      uint 1..``SEQ_MAX``, monotonic per component: anti-rollback
4      hw_classes    array of 1..``_MAX_HW_CLASSES`` texts the artifact fits
5      size          uint: the artifact's exact length in bytes
6      sha256        32 bytes: the artifact's SHA-256
7      expires       UNIX seconds after which the manifest is void (freeze)
8      min_version   optional text: the oldest installed version it applies to
9      windows       optional array of ``[start, end]`` minutes of the UTC day
                     (0..1439) in which it may be installed; ``end < start`` wraps
                     midnight
=====  ============  ==============================================================

``check_update`` applies, in order; the first failure decides (``Verdict.reason``):

1. the release-key list: ``release_keys.verify_list`` (``keys_malformed``,
   ``keys_threshold``, ``keys_rollback``);
2. ``malformed``: the manifest is a COSE_Sign1 (``cose.decode_sign1``'s rules) of at
   most ``MANIFEST_MAX_BYTES`` with a kid;
3. ``unknown_key``: the kid is a release key of that list. A revoked key (left out of a
   newer list), any other key the device trusts for something else (the fleet's command
   key), a root key: all unknown here;
4. ``bad_signature``: the signature verifies with that key and ``MANIFEST_AAD``;
5. ``malformed``: the payload is the map above, strictly (no unknown keys);
6. ``wrong_role``: the key's roles include the manifest's component;
7. ``wrong_component``: the component is the one this device installs;
8. ``wrong_hw_class``: this device's class is among ``hw_classes`` (mix-and-match);
9. ``no_clock`` (*wait*): without a trusted clock nothing with an expiry can be judged.
   A device with no time yet (no NTP) waits rather than installs: a frozen (old but
   validly signed) manifest looks fresh to a device that does not know the date;
10. ``key_expired``: now is before the release key's expiry;
11. ``expired``: now is before the manifest's ``expires`` (freeze);
12. ``rollback`` / ``replay``: the sequence is above the installed one (below: an older
    release; equal: the installed release again);
13. ``too_old_installed``: the installed version is at least ``min_version``;
14. ``too_large``: ``size`` fits the flash budget;
15. ``outside_window`` (*wait*): now is inside one of the windows, if any.

``ok`` is the only verdict that allows a download; ``no_clock`` and ``outside_window``
mean "ask again later", every other is final for that manifest. The artifact is then
streamed through ``ArtifactHasher``: nothing past ``size`` is taken (endless data), and
the SHA-256 must match before the artifact is installed.
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


import hashlib

from . import cbor, cose, release_keys
from .errors import LimitError, MalformedError, PeerError

MANIFEST_AAD = b"cityedge update manifest v1"

# limits (here, not in ``limits``: loaded only while updating)
MANIFEST_MAX_BYTES = const(2048)  # bytes: a whole signed manifest
_MAX_HW_CLASSES = const(16)  # hardware classes one manifest names
_HW_CLASS_MAX_CHARS = const(32)  # characters of one hardware class
_VERSION_MAX_CHARS = const(32)  # characters of a version text
_VERSION_MAX_PARTS = const(4)  # dot-separated numbers in a version
_MAX_WINDOWS = const(8)  # install windows in one manifest
SEQ_MAX = const(0xFFFFFFFFFFFF)  # largest sequence number (48 bits)
ARTIFACT_MAX_BYTES = const(0x7FFFFFFF)  # bytes: largest artifact any manifest names
_DAY_MINUTES = const(1440)

M_COMPONENT = const(1)
_M_VERSION = const(2)
_M_SEQUENCE = const(3)
_M_HW_CLASSES = const(4)
_M_SIZE = const(5)
M_SHA256 = const(6)
_M_EXPIRES = const(7)
_M_MIN_VERSION = const(8)
_M_WINDOWS = const(9)
_REQUIRED = (M_COMPONENT, _M_VERSION, _M_SEQUENCE, _M_HW_CLASSES, _M_SIZE, M_SHA256, _M_EXPIRES)
_KNOWN = _REQUIRED + (_M_MIN_VERSION, _M_WINDOWS)

OK = "ok"
MALFORMED = "malformed"
UNKNOWN_KEY = "unknown_key"
BAD_SIGNATURE = "bad_signature"
WRONG_ROLE = "wrong_role"
WRONG_COMPONENT = "wrong_component"
WRONG_HW_CLASS = "wrong_hw_class"
NO_CLOCK = "no_clock"
KEY_EXPIRED = "key_expired"
EXPIRED = "expired"
ROLLBACK = "rollback"
REPLAY = "replay"
TOO_OLD_INSTALLED = "too_old_installed"
TOO_LARGE = "too_large"
OUTSIDE_WINDOW = "outside_window"
WAIT = (NO_CLOCK, OUTSIDE_WINDOW)  # "not now": the same manifest may pass later

ARTIFACT_TOO_LONG = "artifact_too_long"
ARTIFACT_SHORT = "artifact_short"
ARTIFACT_DIGEST = "artifact_digest"

# The fleet's signed ``update`` command (``command_gate`` checks its signature, target, seq
# and expiry first). Its arguments only point at a release; the release proves itself:
#   1  url     text, ``https://`` and at most URL_MAX_CHARS: the release's folder on the
#              fleet; the device GETs ``<url>manifest`` (the COSE_Sign1, at most
#              MANIFEST_MAX_BYTES), ``<url>keys`` (the root-signed release-key list, at most
#              release_keys.LIST_MAX_BYTES) and ``<url>artifact`` (in Range requests)
#   2  sha256  32 bytes: the SHA-256 of the manifest the fleet means. A manifest with
#              another digest is refused (``manifest_digest``), so a server cannot swap one
#              validly signed release for another under the same command
UPDATE = "update"
A_URL = const(1)
A_MANIFEST_SHA256 = const(2)
URL_MAX_CHARS = const(256)  # characters of an update command's URL
MANIFEST_DIGEST = "manifest_digest"


def update_args(args: Any) -> Any:
    """``(url, manifest_sha256)`` of an ``update`` command's arguments; MalformedError or
    LimitError (a PeerError) names what is wrong."""
    if not isinstance(args, dict):
        raise MalformedError("update: the arguments are not a map")
    url = args.get(A_URL)
    if not isinstance(url, str) or not url.startswith("https://") or len(url) <= 8:
        raise MalformedError("update: the url (1) must be an https:// text")
    if len(url) > URL_MAX_CHARS:
        raise LimitError("update: url over %d characters" % URL_MAX_CHARS)
    for ch in url:
        if ch <= " " or ch > "~":
            raise MalformedError("update: the url (1) holds a space or a control character")
    digest = args.get(A_MANIFEST_SHA256)
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise MalformedError("update: the manifest digest (2) must be 32 bytes")
    return url, digest


def check_manifest_digest(manifest: bytes, expected: bytes) -> None:
    """Refuse (``manifest_digest``) a fetched manifest that is not the one the command
    named, compared without an early exit."""
    digest = hashlib.sha256(manifest).digest()
    diff = 0
    for i in range(32):
        diff |= digest[i] ^ expected[i]
    if diff:
        raise Refused(MANIFEST_DIGEST, "the manifest is not the one the command names")


class Manifest:
    """A decoded manifest (fields as in the table; ``min_version`` and ``windows`` None
    when absent)."""

    def __init__(self, component: str, version: str, sequence: int, hw_classes: Any,
                 size: int, sha256: bytes, expires: int, min_version: Any = None,
                 windows: Any = None) -> None:
        self.component = component
        self.version = version
        self.sequence = sequence
        self.hw_classes = hw_classes
        self.size = size
        self.sha256 = sha256
        self.expires = expires
        self.min_version = min_version
        self.windows = windows

    def to_map(self) -> Any:
        m = {M_COMPONENT: self.component, _M_VERSION: self.version,
             _M_SEQUENCE: self.sequence, _M_HW_CLASSES: list(self.hw_classes),
             _M_SIZE: self.size, M_SHA256: self.sha256, _M_EXPIRES: self.expires}
        if self.min_version is not None:
            m[_M_MIN_VERSION] = self.min_version
        if self.windows is not None:
            m[_M_WINDOWS] = [list(w) for w in self.windows]
        return m

    def encode(self) -> bytes:
        """The payload bytes; checked by the decoder's rules first (a tool cannot sign a
        manifest a device would refuse as malformed)."""
        data = cbor.dumps(self.to_map())
        decode_payload(data)
        return data


class Verdict:
    """``reason`` (``OK`` or a code above), ``detail`` (one line for people), the
    decoded ``manifest`` once authentic, ``keys`` (the verified ``ReleaseKeys``; persist
    ``keys.version`` when the update is installed) and ``kid`` of the release key."""

    def __init__(self, reason: str, detail: str = "", manifest: Any = None,
                 keys: Any = None, kid: Any = None) -> None:
        self.reason = reason
        self.detail = detail
        self.manifest = manifest
        self.keys = keys
        self.kid = kid

    @property
    def ok(self) -> bool:
        return self.reason == OK

    @property
    def wait(self) -> bool:
        return self.reason in WAIT

    def __repr__(self) -> str:
        return "Verdict(%s: %s)" % (self.reason, self.detail)


class Refused(PeerError):
    """A payload or an artifact that is refused; ``reason`` is a code above."""

    def __init__(self, reason: str, msg: str) -> None:
        super().__init__("%s: %s" % (reason, msg))
        self.reason = reason
        self.detail = msg


def parse_version(text: Any) -> Any:
    """``"1.4.0"`` -> ``(1, 4, 0)``; ``Refused(malformed)`` for anything else."""
    if not isinstance(text, str) or not 0 < len(text) <= _VERSION_MAX_CHARS:
        raise Refused(MALFORMED, "a version is text of 1..%d characters" % _VERSION_MAX_CHARS)
    parts = text.split(".")
    if len(parts) > _VERSION_MAX_PARTS:
        raise Refused(MALFORMED, "a version has at most %d parts" % _VERSION_MAX_PARTS)
    out = []
    for p in parts:
        if not p or len(p) > 9 or not all("0" <= c <= "9" for c in p):
            raise Refused(MALFORMED, "version %r is not dot-separated numbers" % text)
        out.append(int(p))
    while len(out) < _VERSION_MAX_PARTS:  # "1.4" == "1.4.0"
        out.append(0)
    return tuple(out)


def _uint(v: Any, top: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top


def _text(v: Any, top: int) -> bool:
    if not isinstance(v, str) or not 0 < len(v) <= top:
        return False
    return all("a" <= c <= "z" or "0" <= c <= "9" or c in "-_." for c in v)


def decode_payload(payload: bytes) -> Manifest:
    """The manifest map checked field by field (rule 5), or ``Refused(malformed)``."""
    try:
        m = cbor.loads(payload, max_bytes=MANIFEST_MAX_BYTES, max_depth=3, max_items=128)
    except PeerError as e:
        raise Refused(MALFORMED, "payload is not CBOR: %s" % e) from None
    if not isinstance(m, dict):
        raise Refused(MALFORMED, "payload is not a map")
    for k in m:
        if k not in _KNOWN:
            raise Refused(MALFORMED, "unknown field %r" % (k,))
    for k in _REQUIRED:
        if k not in m:
            raise Refused(MALFORMED, "field %d is missing" % k)
    component = m[M_COMPONENT]
    if component not in release_keys.ROLES:
        raise Refused(MALFORMED, "unknown component %r" % (component,))
    version = m[_M_VERSION]
    parse_version(version)
    sequence = m[_M_SEQUENCE]
    if not _uint(sequence, SEQ_MAX) or sequence < 1:
        raise Refused(MALFORMED, "sequence must be 1..%d" % SEQ_MAX)
    classes = m[_M_HW_CLASSES]
    if not isinstance(classes, list) or not 0 < len(classes) <= _MAX_HW_CLASSES:
        raise Refused(MALFORMED, "hw_classes: 1 to %d" % _MAX_HW_CLASSES)
    for c in classes:
        if not _text(c, _HW_CLASS_MAX_CHARS) or classes.count(c) != 1:
            raise Refused(MALFORMED, "hardware class %r: distinct, a-z 0-9 - _ ., at most "
                          "%d characters" % (c, _HW_CLASS_MAX_CHARS))
    size = m[_M_SIZE]
    if not _uint(size, ARTIFACT_MAX_BYTES) or size < 1:
        raise Refused(MALFORMED, "size must be 1..%d bytes" % ARTIFACT_MAX_BYTES)
    digest = m[M_SHA256]
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise Refused(MALFORMED, "sha256 must be 32 bytes")
    expires = m[_M_EXPIRES]
    if not _uint(expires, 0xFFFFFFFFFF):
        raise Refused(MALFORMED, "expires must be UNIX seconds")
    min_version = m.get(_M_MIN_VERSION)
    if min_version is not None:
        parse_version(min_version)
    windows = m.get(_M_WINDOWS)
    if windows is not None:
        if not isinstance(windows, list) or not 0 < len(windows) <= _MAX_WINDOWS:
            raise Refused(MALFORMED, "windows: 1 to %d" % _MAX_WINDOWS)
        for w in windows:
            if not isinstance(w, list) or len(w) != 2 or not _uint(w[0], _DAY_MINUTES - 1) \
                    or not _uint(w[1], _DAY_MINUTES - 1) or w[0] == w[1]:
                raise Refused(MALFORMED, "a window is [start, end], minutes 0..1439, "
                              "start != end")
        windows = [tuple(w) for w in windows]
    return Manifest(component, version, sequence, classes, size, digest, expires,
                    min_version, windows)


def sign_manifest(manifest: Manifest, signer: Any, kid: bytes) -> bytes:
    """The COSE_Sign1 of ``manifest`` by a release key (``signer.sign(msg)``)."""
    return cose.encode_sign1(manifest.encode(), signer, kid, MANIFEST_AAD)


def in_window(windows: Any, now: int) -> bool:
    """True if ``now`` (UNIX seconds) is inside one of ``windows`` (None: always)."""
    if windows is None:
        return True
    minute = (now // 60) % _DAY_MINUTES
    for start, end in windows:
        if start < end:
            if start <= minute < end:
                return True
        elif minute >= start or minute < end:
            return True
    return False


class UpdatePolicy:
    """What a device knows about itself and trusts, for ``check``.

    ``roots``: dict root kid -> verifier (the offline root set installed with the
    firmware); ``threshold``: its k; ``component``: what this device installs;
    ``hw_class``: its hardware class (None only for the release tool, which checks a
    manifest for no device in particular: the class rule is then skipped and named in
    ``skipped``); ``flash_budget``: bytes it can store (None: not checked, likewise);
    ``make_verifier``: sec1 -> verifier (the core's P-256 when None).
    """

    def __init__(self, roots: Any, threshold: int, component: str, hw_class: Any,
                 flash_budget: Any = None, make_verifier: Any = None) -> None:
        if component not in release_keys.ROLES:
            raise ValueError("component must be one of %r" % (release_keys.ROLES,))
        self.roots = roots
        self.threshold = threshold
        self.component = component
        self.hw_class = hw_class
        self.flash_budget = flash_budget
        self.make_verifier = make_verifier
        self.skipped = []  # type: list[str]
        if hw_class is None:
            self.skipped.append("hardware class")
        if flash_budget is None:
            self.skipped.append("flash budget")

    def check(self, manifest: Any, key_list: Any, keys_version: int, installed_seq: int,
              installed_version: Any, now: Any) -> Verdict:
        """The verdict for ``manifest`` (bytes) with ``key_list`` (bytes), given the
        stored list version, the installed sequence and version (None: nothing installed,
        e.g. a factory install: ``min_version`` is not applied), and ``now`` (UNIX
        seconds, or None when the device has no trusted clock). Rules: module docstring.
        """
        try:
            keys = release_keys.verify_list(key_list, self.roots, self.threshold,
                                            keys_version, self.make_verifier)
        except release_keys.RefusedList as e:
            return Verdict(e.reason, e.detail)
        try:
            msg = cose.decode_sign1(manifest, max_bytes=MANIFEST_MAX_BYTES)
        except PeerError as e:
            return Verdict(MALFORMED, "not a COSE_Sign1: %s" % e, keys=keys)
        kid = msg.kid
        key = keys.keys.get(kid) if isinstance(kid, bytes) else None
        if key is None:
            return Verdict(UNKNOWN_KEY, "kid %r is not a release key of list version %d"
                           % (kid, keys.version), keys=keys, kid=kid)
        if not key.verifier.verify(msg.to_be_signed(MANIFEST_AAD), msg.signature):
            return Verdict(BAD_SIGNATURE, "the signature does not verify", keys=keys,
                           kid=kid)
        try:
            m = decode_payload(msg.payload)
        except Refused as e:
            return Verdict(e.reason, e.detail, keys=keys, kid=kid)
        return self._judge(m, key, keys, installed_seq, installed_version, now)

    def _judge(self, m: Manifest, key: Any, keys: Any, installed_seq: int,
               installed_version: Any, now: Any) -> Verdict:
        def v(reason: str, detail: str) -> Verdict:
            return Verdict(reason, detail, m, keys, key.kid)

        if m.component not in key.roles:
            return v(WRONG_ROLE, "the key may sign %s, not %s" % (",".join(key.roles),
                                                                 m.component))
        if m.component != self.component:
            return v(WRONG_COMPONENT, "a %s release, this installs %s" % (m.component,
                                                                        self.component))
        if self.hw_class is not None and self.hw_class not in m.hw_classes:
            return v(WRONG_HW_CLASS, "for %s, not %s" % (",".join(m.hw_classes),
                                                         self.hw_class))
        if now is None:
            return v(NO_CLOCK, "no trusted clock to check the expiry; waits for one")
        if now >= key.expires:
            return v(KEY_EXPIRED, "the release key expired %d s ago" % (now - key.expires))
        if now >= m.expires:
            return v(EXPIRED, "the manifest expired %d s ago" % (now - m.expires))
        if m.sequence < installed_seq:
            return v(ROLLBACK, "sequence %d is below the installed %d" % (m.sequence,
                                                                        installed_seq))
        if m.sequence == installed_seq:
            return v(REPLAY, "sequence %d is the installed release" % m.sequence)
        if installed_version is not None and m.min_version is not None and \
                parse_version(installed_version) < parse_version(m.min_version):
            return v(TOO_OLD_INSTALLED, "needs %s or later installed, not %s"
                     % (m.min_version, installed_version))
        if self.flash_budget is not None and m.size > self.flash_budget:
            return v(TOO_LARGE, "%d bytes, the budget is %d" % (m.size, self.flash_budget))
        if not in_window(m.windows, now):
            return v(OUTSIDE_WINDOW, "outside the install windows; waits")
        return v(OK, "%s %s (sequence %d) by release key %s" % (
            m.component, m.version, m.sequence, release_keys._hex(key.kid)))


def check_update(manifest: Any, key_list: Any, roots: Any, threshold: int,
                 keys_version: int, component: str, hw_class: Any, installed_seq: int,
                 installed_version: Any, now: Any, flash_budget: Any = None,
                 make_verifier: Any = None) -> Verdict:
    """``UpdatePolicy(...).check(...)`` in one call (arguments as there)."""
    policy = UpdatePolicy(roots, threshold, component, hw_class, flash_budget, make_verifier)
    return policy.check(manifest, key_list, keys_version, installed_seq, installed_version,
                        now)


class ArtifactHasher:
    """Streams an artifact against its manifest: ``feed`` chunks as they arrive (from the
    network or flash), ``finish`` when the source ends.

    ``feed`` refuses (``Refused(artifact_too_long)``) the first chunk that would pass the
    manifest's size, before hashing or keeping it: the caller stops downloading there
    (endless data). ``finish`` refuses a short artifact and one whose SHA-256 differs
    (compared without an early exit).
    """

    def __init__(self, size: int, sha256: bytes) -> None:
        self.size = size
        self.expected = sha256
        self.received = 0
        self._h = hashlib.sha256()

    def feed(self, chunk: Any) -> None:
        n = len(chunk)
        if self.received + n > self.size:
            raise Refused(ARTIFACT_TOO_LONG, "more than the manifest's %d bytes"
                          % self.size)
        self._h.update(chunk)
        self.received += n

    def finish(self) -> None:
        if self.received != self.size:
            raise Refused(ARTIFACT_SHORT, "%d of %d bytes" % (self.received, self.size))
        digest = self._h.digest()
        if len(self.expected) != len(digest):
            raise Refused(ARTIFACT_DIGEST, "the manifest's digest is not SHA-256")
        diff = 0
        for i in range(len(digest)):  # no early exit (and no zip(strict=) on MicroPython)
            diff |= digest[i] ^ self.expected[i]
        if diff:
            raise Refused(ARTIFACT_DIGEST, "the artifact's SHA-256 differs from the "
                          "manifest's")
