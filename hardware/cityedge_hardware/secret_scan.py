"""The secret scanner: the files of a firmware bundle in, findings of shipped secrets out.

Sans-IO: ``scan_items(items)`` reads nothing but its ``(name, bytes)`` pairs
(``secret_bundle`` walks a directory, a tar or a zip, or hands over a ROMFS image's raw bytes:
ROMFS stores file data unchanged, so a raw scan sees every file in it). A secret written into
the image ships to every device (CE-AUTH-06, EN 303 645 5.4-3), so the scanner looks for, in
every file, text or binary:

1. ``pem-private-key``: any ``-----BEGIN ... PRIVATE KEY-----`` block (PKCS#8, encrypted
   PKCS#8, SEC1 EC, PKCS#1 RSA, OpenSSH, DSA).
2. ``der-private-key``: a DER private key. Candidates are ASN.1 SEQUENCE headers followed by
   the version INTEGER and what PKCS#8 (``30``), SEC1 EC (``04``) or PKCS#1 RSA (``02``) puts
   next; each is parsed with ``cryptography``'s ``load_der_private_key``, so only a key that
   loads counts. At most ``LIMITS.secret_der_candidates`` parses per file (the work is bounded
   however the bytes look; a file that reaches the cap is reported as not fully scanned).
3. ``hex-key``: a 64-hex-digit (32-byte) string shortly after a key-like name (``key``,
   ``secret``, ``private``, ``psk``), unless the name says it is a digest, hash,
   fingerprint or public key (manifests list SHA-256 digests; the fleet's public keys ship).
4. ``password``: a password, token, PSK, secret or API key assigned a literal value
   (``password = "..."``, ``"token": "..."``, ``psk: ...`` in JSON, TOML, YAML, .env or Python).
   Placeholders (``<...>``, ``${...}``, ``%s``, ``{}``) and empty values are not secrets.
5. ``aws-access-key``: an AWS access key id (``AKIA``/``ASIA`` and 16 more characters).

Public keys and certificates are never findings: only private-key structures count. A
finding carries the file, the byte offset, the kind and a redacted excerpt that names what
was found and its length, never the secret itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_der_private_key

from cityedge_hardware.limits import LIMITS
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

REQ_NO_SHIPPED_SECRETS = "CE-AUTH-06"
CHECK = "fw-secrets"

PEM_PRIVATE = "pem-private-key"
DER_PRIVATE = "der-private-key"
HEX_KEY = "hex-key"
PASSWORD = "password"  # noqa: S105 (a finding kind, not a password)
AWS_KEY = "aws-access-key"

_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]{0,40})PRIVATE KEY-----")
_PEM_END_RE = re.compile(rb"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----")
# SEQUENCE, its length (short, 0x81 n, 0x82 nn), INTEGER 0 or 1 (the version), then
# SEQUENCE (PKCS#8 AlgorithmIdentifier), OCTET STRING (SEC1 key) or INTEGER (PKCS#1 modulus).
_DER_RE = re.compile(rb"\x30(?:[\x00-\x7f]|\x81[\x80-\xff]|\x82[\x00-\xff]{2})"
                     rb"\x02\x01[\x00\x01][\x30\x04\x02]", re.DOTALL)
_HEX64_RE = re.compile(rb"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")
_KEY_NAME_RE = re.compile(rb"(?i)(key|secret|private|psk)")
_NOT_SECRET_NAME_RE = re.compile(rb"(?i)(sha|digest|hash|fingerprint|public|pub_|pubkey|"
                                 rb"checksum|crc)")
_SECRET_WORDS = (rb"password|passwd|passphrase|pwd|pass|token|secret|psk|api[_-]?key|"
                 rb"auth[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key")
# Starts at the secret word (a leading ``[A-Za-z0-9_]{0,32}`` made it half as fast); the
# rest of the name is read backwards in ``_name_before``.
_ASSIGN_RE = re.compile(
    rb"(?i)(?:" + _SECRET_WORDS + rb")(?![A-Za-z0-9_\-])"
    rb"[\"']?[ \t]{0,8}[:=][ \t]{0,8}"
    rb"(?:b?([\"'])([^\"'\r\n]{4,256})\1|([A-Za-z0-9+/_\-.!@#$%^&*~]{6,256})[ \t]*(?:\r?\n|$))")
_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_AWS_RE = re.compile(rb"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
_PLACEHOLDER_RE = re.compile(rb"^(<.*>|\$.*|\{.*\}|%.*|\*+|x+|X+|\.\.\.|none|null|"
                             rb"true|false)$", re.IGNORECASE)
# Python files may assign a name, not a literal: ``password = secrets.token_hex()`` is fine.
_CODE_SUFFIXES = (".py",)


@dataclass(frozen=True)
class Finding:
    """One secret in one file: where, what, and an excerpt without the secret."""

    name: str
    offset: int  # byte offset in the file
    kind: str
    excerpt: str  # redacted: names the thing and its length, never its value

    def to_json(self) -> dict[str, object]:
        return {"file": self.name, "offset": self.offset, "kind": self.kind,
                "excerpt": self.excerpt}


@dataclass
class ScanResult:
    """What a scan found, how much it read, and what it could not read completely."""

    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    der_parses: int = 0  # DER candidates handed to the parser (bounded per file)
    incomplete: list[str] = field(default_factory=list)  # "name: why" for partial scans

    def to_json(self) -> dict[str, object]:
        return {"files": self.files, "bytes": self.bytes,
                "findings": [f.to_json() for f in self.findings],
                "incomplete": list(self.incomplete)}


def _label(raw: bytes) -> str:
    """A name from the file (an identifier or PEM label) as printable text."""
    return raw.decode("ascii", "replace").strip()


def _pem(name: str, data: bytes) -> list[Finding]:
    out = []
    for m in _PEM_RE.finditer(data):
        end = _PEM_END_RE.search(data, m.end())
        size = (end.start() - m.end()) if end else len(data) - m.end()
        out.append(Finding(name, m.start(), PEM_PRIVATE, "-----BEGIN %sPRIVATE KEY----- "
                           "<%d bytes redacted>" % (_label(m.group(1)) + " " if m.group(1)
                                                   .strip() else "", size)))
    return out


def _der_length(data: bytes, start: int) -> int:
    """Total length (header included) of the DER SEQUENCE at ``start`` (``_DER_RE`` matched)."""
    b = data[start + 1]
    if b < 0x80:
        return 2 + b
    if b == 0x81:
        return 3 + data[start + 2]
    return 4 + int.from_bytes(data[start + 2:start + 4], "big")


def _der(name: str, data: bytes, result: ScanResult) -> list[Finding]:
    out: list[Finding] = []
    parses = 0
    pos = 0
    while True:
        m = _DER_RE.search(data, pos)
        if m is None:
            break
        start = m.start()
        pos = start + 1
        total = _der_length(data, start)
        if start + total > len(data) or total > LIMITS.secret_der_max_bytes:
            continue
        if parses >= LIMITS.secret_der_candidates:
            result.incomplete.append("%s: more than %d DER candidates, the rest not parsed"
                                     % (name, LIMITS.secret_der_candidates))
            break
        parses += 1
        try:
            key = load_der_private_key(data[start:start + total], password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        out.append(Finding(name, start, DER_PRIVATE, "DER %s private key <%d bytes redacted>"
                           % (type(key).__name__.removeprefix("_").replace("PrivateKey", ""),
                              total)))
        pos = start + total  # the key's inner structures are not separate keys
    result.der_parses += parses
    return out


def _hex_keys(name: str, data: bytes) -> list[Finding]:
    out = []
    for m in _HEX64_RE.finditer(data):
        before = data[max(0, m.start() - LIMITS.secret_name_window):m.start()]
        line = before.rsplit(b"\n", 1)[-1]
        if _KEY_NAME_RE.search(line) and not _NOT_SECRET_NAME_RE.search(line):
            ident = [i for i in re.findall(rb"[A-Za-z0-9_\-]+", line)
                     if _KEY_NAME_RE.search(i)]  # the name, not ``bytes.fromhex``
            out.append(Finding(name, m.start(), HEX_KEY, "%s = <64 hex digits redacted>"
                               % (_label(ident[-1]) if ident else "key")))
    return out


def _name_before(data: bytes, word_start: int) -> bytes | None:
    """The whole name a secret word ends, or None when the word is inside another word.

    ``wifi_password``, ``mqtt.token``, ``wifiPassword`` and ``"psk"`` are names of secrets;
    ``bypass`` and ``compass`` are not.
    """
    if word_start > 0:
        prev = data[word_start - 1]
        if (chr(prev).isalnum() and prev < 0x80
                and not (chr(prev).islower() and chr(data[word_start]).isupper())):
            return None
    i = word_start
    while i > 0 and word_start - i < 32 and data[i - 1] in _NAME_CHARS:
        i -= 1
    return data[i:word_start]


def _passwords(name: str, data: bytes) -> list[Finding]:
    out = []
    is_code = name.lower().endswith(_CODE_SUFFIXES)
    for m in _ASSIGN_RE.finditer(data):
        prefix = _name_before(data, m.start())
        if prefix is None:
            continue
        word = re.match(rb"[A-Za-z_\-]+", data[m.start():m.end()])
        ident = prefix + (word.group(0) if word else b"")
        value = m.group(2) if m.group(2) is not None else m.group(3)
        if m.group(2) is None and is_code:
            continue  # ``token = make_token()``: a name, not a literal
        if (ident.rsplit(b".", 1)[-1].lower() == b"pass"
                and data[m.start() - 1:m.start()] not in (b'"', b"'")):
            continue  # a bare ``pass``/``Outcome.PASS`` is a word; ``"pass": "..."`` is a key
        if (_PLACEHOLDER_RE.match(value.strip()) or not value.strip()
                or value.lower() == ident.lower()):
            continue  # ``PASS = "pass"`` names a thing, it is not a secret
        start = m.start(2) if m.group(2) is not None else m.start(3)
        out.append(Finding(name, start, PASSWORD, "%s = <%d characters redacted>"
                           % (_label(ident), len(value))))
    return out


def _aws(name: str, data: bytes) -> list[Finding]:
    return [Finding(name, m.start(), AWS_KEY, "%s<16 characters redacted>"
                    % _label(m.group(0)[:4])) for m in _AWS_RE.finditer(data)]


def scan_item(name: str, data: bytes, result: ScanResult) -> None:
    """Scan one file's bytes into ``result`` (findings sorted by offset, capped per file)."""
    result.files += 1
    result.bytes += len(data)
    found = _pem(name, data) + _der(name, data, result) + _aws(name, data)
    taken = [(f.offset, f.offset + 64) for f in found]
    for f in _hex_keys(name, data) + _passwords(name, data):
        if not any(a <= f.offset < b for a, b in taken):  # one secret, one finding
            found.append(f)
            taken.append((f.offset, f.offset + 64))
    found.sort(key=lambda f: f.offset)
    if len(found) > LIMITS.secret_findings_per_file:
        result.incomplete.append("%s: %d findings, the first %d listed" % (
            name, len(found), LIMITS.secret_findings_per_file))
        found = found[:LIMITS.secret_findings_per_file]
    result.findings.extend(found)


def scan_items(items: Iterable[tuple[str, bytes]]) -> ScanResult:
    """Scan every ``(name, bytes)`` pair; the result lists what was found and read."""
    result = ScanResult()
    for name, data in items:
        scan_item(name, data, result)
    return result


def secrets_verdict(result: ScanResult) -> Verdict:
    """CE-AUTH-06: fail on any finding, undecided when a file was not read whole, else pass."""
    if result.findings:
        kinds = sorted({f.kind for f in result.findings})
        return Verdict(
            REQ_NO_SHIPPED_SECRETS, CHECK, Outcome.FAIL,
            "%d secret(s) in the bundle (%s)" % (len(result.findings), ", ".join(kinds)),
            tuple(Evidence("%s@%d" % (f.name, f.offset), f.excerpt, f.kind)
                  for f in result.findings),
            fix="remove the keys and passwords from the image: each device gets its own key "
                "at provisioning (`cityedge provision`), on its own file system, never in "
                "the firmware every device shares; then rotate every secret that shipped")
    if result.incomplete:
        return Verdict(REQ_NO_SHIPPED_SECRETS, CHECK, Outcome.UNDECIDED,
                       "part of the bundle was not scanned",
                       tuple(Evidence(i.split(":", 1)[0], i.split(":", 1)[-1].strip())
                             for i in result.incomplete),
                       fix="split the bundle or scan the unpacked files one by one")
    return Verdict(REQ_NO_SHIPPED_SECRETS, CHECK, Outcome.PASS,
                   "no private key, password or token in %d files (%d bytes)"
                   % (result.files, result.bytes))
