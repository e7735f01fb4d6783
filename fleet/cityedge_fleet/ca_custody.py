"""Custody of the CA's private keys: encrypted files, or the intermediate in a PKCS#11 token.

**Encrypted at rest.** A CA key file is PKCS#8 ``ENCRYPTED PRIVATE KEY`` with PBES2
(RFC 8018 §6.2) using **scrypt** (RFC 7914 §7: N = 2^17, r = 8, p = 1, a 16-byte salt)
and AES-256-CBC. Not ``cryptography``'s ``BestAvailableEncryption``: in the pinned
version (50) it writes PBES2 with PBKDF2-HMAC-SHA256 at 2048 iterations, about a
millisecond per guess; scrypt at these parameters costs 128 MiB and ~0.5 s per guess, so
a stolen disk image's passphrase cannot be searched cheaply. ``cryptography`` reads the
file with ``load_pem_private_key`` (it supports scrypt PBES2); this module only writes the
standard structure (OpenSSL's command line reads it too when given more than its default
32 MiB scrypt memory limit, e.g. through its API). The key is encrypted before it is
written: no unencrypted copy ever touches the disk.

**The passphrase** comes from a file only (``--password-file``; the fleet's
``CITYEDGE_CA_PASSWORD_FILE``; systemd's ``LoadCredential=`` fits), never from a
command-line argument or an environment variable's value: both can be read by other
processes (``/proc/<pid>/cmdline``, ``environ``) and the settings can be logged. The file
must be a regular file, open to its owner only (mode 0600 or 0400), not empty, at most
``SECRET_MAX_BYTES``; one trailing newline is not part of the passphrase.

**PKCS#11.** The intermediate may live in a token instead (``TokenConfig``: the module,
the token's label, the key's label, the user PIN from a file checked the same way). Its
key is then a ``TokenKey``: an ``ec.EllipticCurvePrivateKey`` whose ``sign`` hashes with
SHA-256 here and asks the token for a raw ECDSA signature (``CKM_ECDSA``: r || s, 32
bytes each) which it encodes as the DER ``ECDSA-Sig-Value`` X.509 carries. ``cryptography``
calls ``sign`` on the key object given to ``CertificateBuilder.sign`` and
``CertificateRevocationListBuilder.sign``, so certificates and CRLs are built by the same
code whatever holds the key. It cannot be exported (``private_bytes`` raises). The CA
directory records an intermediate held in a token by ``intermediates/<id>.token`` in place
of ``<id>.key``; the token object has ``CKA_ID`` = the intermediate's id (8 bytes) and
``CKA_LABEL`` = the key label.

``Custody`` is what the CA is given: the passphrase file (None: unencrypted keys are read,
development), whether an unencrypted key is refused (production), and the token, if any.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cityedge_core.errors import LocalError

SECRET_MAX_BYTES = 1024  # bytes of a passphrase or PIN file
SCRYPT_LOG_N = 17  # scrypt cost: N = 2^17 (128 MiB with r = 8)
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
PASSWORD_VARIABLE = "CITYEDGE_CA_PASSWORD_FILE"  # noqa: S105  (a variable's name)
PKCS11_VARIABLE = "CITYEDGE_CA_PKCS11_MODULE"
# intermediates/<id>.token: the key is in the PKCS#11 token
TOKEN_SUFFIX = ".token"  # noqa: S105  (a file name suffix, not a token)
DEFAULT_KEY_LABEL = "cityedge-intermediate"
_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_PLAIN_PEM = b"-----BEGIN PRIVATE KEY-----"
_OID_PBES2 = "1.2.840.113549.1.5.13"
_OID_SCRYPT = "1.3.6.1.4.1.11591.4.11"
_OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"


class CaError(LocalError):
    """The CA's own files are missing, unreadable or inconsistent, or its key cannot be
    opened (a wrong passphrase or PIN, a token that does not answer)."""


def read_secret_file(path: Path, what: str) -> bytes:
    """The secret in ``path`` (a passphrase or a PIN), checked: a regular file, open to
    its owner only, not empty, at most ``SECRET_MAX_BYTES``; one trailing newline is
    dropped."""
    try:
        st = path.stat()
    except OSError as e:
        raise CaError("%s file %s: %s" % (what, path, e.strerror)) from e
    if not stat.S_ISREG(st.st_mode):
        raise CaError("%s file %s is not a regular file" % (what, path))
    if st.st_mode & 0o077:
        raise CaError("%s file %s is open to other users (mode %o): chmod 600 %s"
                      % (what, path, stat.S_IMODE(st.st_mode), path))
    if st.st_size > SECRET_MAX_BYTES:
        raise CaError("%s file %s holds more than %d bytes" % (what, path, SECRET_MAX_BYTES))
    try:
        data = path.read_bytes()[:SECRET_MAX_BYTES]
    except OSError as e:
        raise CaError("%s file %s: %s" % (what, path, e.strerror)) from e
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise CaError("%s file %s is empty" % (what, path))
    return data


# -- PKCS#8 with PBES2-scrypt (written here; read by cryptography) --------------------

def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def _seq(*parts: bytes) -> bytes:
    return _tlv(0x30, b"".join(parts))


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    arcs = [int(x) for x in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def encrypt_pkcs8(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    """``key`` as PEM ``ENCRYPTED PRIVATE KEY`` (PBES2, scrypt, AES-256-CBC)."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, iv = os.urandom(SALT_BYTES), os.urandom(16)
    kek = Scrypt(salt=salt, length=32, n=1 << SCRYPT_LOG_N, r=SCRYPT_R, p=SCRYPT_P
                 ).derive(password)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(der) + padder.finalize()
    enc = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    sealed = enc.update(plain) + enc.finalize()
    algorithm = _seq(_oid(_OID_PBES2), _seq(
        _seq(_oid(_OID_SCRYPT), _seq(_tlv(0x04, salt), _int(1 << SCRYPT_LOG_N),
                                     _int(SCRYPT_R), _int(SCRYPT_P), _int(32))),
        _seq(_oid(_OID_AES256_CBC), _tlv(0x04, iv))))
    b64 = base64.b64encode(_seq(algorithm, _tlv(0x04, sealed)))
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (_ENCRYPTED_PEM + b"\n" + b"\n".join(lines)
            + b"\n-----END ENCRYPTED PRIVATE KEY-----\n")


def key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None) -> bytes:
    """A CA key file's contents: encrypted with ``password``, or plain PKCS#8 (None)."""
    if password is not None:
        return encrypt_pkcs8(key, password)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def is_encrypted(data: bytes) -> bool:
    return data.lstrip().startswith(_ENCRYPTED_PEM)


def load_key(path: Path, password: Callable[[], bytes | None], *, asked_from: str,
             require_encrypted: bool = False) -> ec.EllipticCurvePrivateKey:
    """The EC key in ``path``; ``password()`` is asked only for an encrypted file, and
    ``asked_from`` names where it comes from (for the messages). Every failure is one
    ``CaError`` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaError("cannot read the CA key %s: %s" % (path, e.strerror)) from e
    encrypted = is_encrypted(data)
    if not encrypted and require_encrypted:
        raise CaError("the CA key %s is not encrypted: production refuses a CA key in clear "
                      "on disk; set %s to its passphrase file and encrypt it "
                      "(`cityedge ca encrypt-keys`), or hold it in a PKCS#11 token (%s)"
                      % (path, PASSWORD_VARIABLE, PKCS11_VARIABLE))
    secret = password() if encrypted else None
    if encrypted and secret is None:
        raise CaError("the CA key %s is encrypted: give its passphrase file (%s)"
                      % (path, asked_from))
    try:
        key = serialization.load_pem_private_key(data, secret)
    except ValueError as e:
        if encrypted:
            raise CaError("wrong passphrase for the CA key %s (passphrase from %s)"
                          % (path, asked_from)) from e
        raise CaError("the CA key %s does not parse" % path) from e
    except TypeError as e:  # cryptography: an unexpected or missing password
        raise CaError("the CA key %s cannot be read: %s" % (path, e)) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError("the CA key %s is not an EC key" % path)
    return key


# -- PKCS#11 ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenConfig:
    """Where the intermediate's key lives: a PKCS#11 module, a token, a key label, and the
    user PIN's file."""

    module: Path
    token_label: str
    pin_file: Path
    key_label: str = DEFAULT_KEY_LABEL


_libs: dict[str, Any] = {}
_sessions: dict[tuple[str, str], _TokenSession] = {}
_libs_lock = threading.Lock()


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise CaError("python-pkcs11 is not installed: `pip install python-pkcs11`") from e
    return pkcs11


class _TokenSession:
    """One logged-in session with a token, shared by every key in it; a lock around each
    call (a PKCS#11 session serves one operation at a time)."""

    def __init__(self, config: TokenConfig) -> None:
        pkcs11 = _pkcs11()
        self.config = config
        self.lock = threading.Lock()
        pin = read_secret_file(config.pin_file, "PKCS#11 PIN")
        try:
            lib = _libs.get(str(config.module))
            if lib is None:
                lib = pkcs11.lib(str(config.module))
                _libs[str(config.module)] = lib
            token = lib.get_token(token_label=config.token_label)
        except pkcs11.exceptions.NoSuchToken as e:
            raise CaError("no PKCS#11 token labelled %r in %s"
                          % (config.token_label, config.module)) from e
        except (RuntimeError, OSError, pkcs11.exceptions.PKCS11Error) as e:
            raise CaError("PKCS#11 module %s cannot be loaded: %s"
                          % (config.module, type(e).__name__)) from e
        try:
            user_pin = pin.decode()
        except UnicodeDecodeError as e:
            raise CaError("PKCS#11 PIN file %s is not UTF-8 text" % config.pin_file) from e
        try:
            self.session = token.open(user_pin=user_pin, rw=True)
        except pkcs11.exceptions.PinIncorrect as e:
            raise CaError("wrong PIN for PKCS#11 token %r (PIN from %s)"
                          % (config.token_label, config.pin_file)) from e
        except pkcs11.exceptions.PKCS11Error as e:
            raise CaError("cannot log in to PKCS#11 token %r: %s"
                          % (config.token_label, type(e).__name__)) from e

    def find_key(self, key_id: bytes) -> Any:
        pkcs11 = _pkcs11()
        with self.lock:
            found = list(self.session.get_objects({
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                pkcs11.Attribute.ID: key_id,
                pkcs11.Attribute.LABEL: self.config.key_label}))
        if len(found) != 1:
            raise CaError("PKCS#11 token %r holds %d private keys labelled %r with id %s "
                          "(expected 1)" % (self.config.token_label, len(found),
                                            self.config.key_label, key_id.hex()))
        return found[0]

    def sign_digest(self, key: Any, digest: bytes) -> bytes:
        pkcs11 = _pkcs11()
        with self.lock:
            try:
                return bytes(key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))
            except pkcs11.exceptions.PKCS11Error as e:
                raise CaError("PKCS#11 token %r refused to sign: %s"
                              % (self.config.token_label, type(e).__name__)) from e


def token_session(config: TokenConfig) -> _TokenSession:
    """The process's session with the token (opened and logged in once)."""
    with _libs_lock:
        key = (str(config.module), config.token_label)
        found = _sessions.get(key)
        if found is None or found.config != config:
            found = _TokenSession(config)
            _sessions[key] = found
        return found


def _refuse_export(label: str) -> NoReturn:
    raise CaError("the intermediate key is held in PKCS#11 token %r: it cannot be exported"
                  % label)


class TokenKey(ec.EllipticCurvePrivateKey):
    """A P-256 key held in a PKCS#11 token: it signs (ECDSA with SHA-256) and gives its
    public half; nothing else."""

    def __init__(self, session: _TokenSession, handle: Any,
                 public: ec.EllipticCurvePublicKey) -> None:
        self._session = session
        self._handle = handle
        self._public = public

    def sign(self, data: Any, signature_algorithm: Any) -> bytes:
        if not (isinstance(signature_algorithm, ec.ECDSA)
                and isinstance(signature_algorithm.algorithm, hashes.SHA256)):
            raise CaError("a PKCS#11 CA key signs ECDSA with SHA-256 only")
        raw = self._session.sign_digest(self._handle, hashlib.sha256(bytes(data)).digest())
        if len(raw) != 64:
            raise CaError("PKCS#11 token returned a %d-byte signature (expected r||s, 64)"
                          % len(raw))
        return encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                    int.from_bytes(raw[32:], "big"))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        _refuse_export(self._session.config.token_label)

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse_export(self._session.config.token_label)

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any
                      ) -> bytes:
        _refuse_export(self._session.config.token_label)

    def __copy__(self) -> TokenKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenKey:
        return self

    def __repr__(self) -> str:
        return "<TokenKey %r>" % self._session.config.token_label


_PROBE = b"cityedge: does the token's key match the certificate?"


def token_key(config: TokenConfig, key_id: bytes,
              public: ec.EllipticCurvePublicKey) -> TokenKey:
    """The token's key with ``key_id``, checked to be ``public``'s private half (a
    signature made by it verifies with ``public``)."""
    from cryptography.exceptions import InvalidSignature

    session = token_session(config)
    key = TokenKey(session, session.find_key(key_id), public)
    try:
        public.verify(key.sign(_PROBE, ec.ECDSA(hashes.SHA256())), _PROBE,
                      ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise CaError("the key labelled %r with id %s in PKCS#11 token %r does not match "
                      "the intermediate's certificate" % (config.key_label, key_id.hex(),
                                                         config.token_label)) from e
    return key


def _ec_params() -> bytes:
    from pkcs11.util.ec import encode_named_curve_parameters

    return bytes(encode_named_curve_parameters("secp256r1"))


def _key_template(config: TokenConfig, key_id: bytes) -> dict[Any, Any]:
    pkcs11 = _pkcs11()
    a = pkcs11.Attribute
    return {a.TOKEN: True, a.PRIVATE: True, a.SENSITIVE: True, a.EXTRACTABLE: False,
            a.SIGN: True, a.DERIVE: False, a.LABEL: config.key_label, a.ID: key_id}


def _public_from_point(point_der: bytes) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT (a DER OCTET STRING around the uncompressed point) as a key."""
    point = point_der[2:] if point_der[:1] == b"\x04" and len(point_der) == 67 else point_der
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def generate_in_token(config: TokenConfig, key_id_of: Any) -> tuple[bytes,
                                                                     ec.EllipticCurvePublicKey]:
    """A new P-256 key pair made inside the token (its private half never leaves it);
    ``key_id_of(public_key)`` gives the id it is stored under. Returns (id, public key)."""
    pkcs11 = _pkcs11()
    a = pkcs11.Attribute
    session = token_session(config)
    with session.lock:
        params = session.session.create_domain_parameters(
            pkcs11.KeyType.EC, {a.EC_PARAMS: _ec_params()}, local=True)
        pub, priv = params.generate_keypair(
            store=True, label=config.key_label,
            public_template={a.TOKEN: True, a.VERIFY: True},
            private_template=_key_template(config, b"pending"))
        public = _public_from_point(bytes(pub[a.EC_POINT]))
        key_id = bytes(key_id_of(public))
        pub[a.ID] = key_id
        priv[a.ID] = key_id
    return key_id, public


def import_to_token(config: TokenConfig, key: ec.EllipticCurvePrivateKey,
                    key_id: bytes) -> None:
    """Store ``key`` in the token as a sensitive, non-extractable signing key."""
    pkcs11 = _pkcs11()
    a = pkcs11.Attribute
    session = token_session(config)
    value = key.private_numbers().private_value.to_bytes(32, "big")
    template = _key_template(config, key_id)
    template.update({a.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, a.KEY_TYPE: pkcs11.KeyType.EC,
                     a.EC_PARAMS: _ec_params(), a.VALUE: value})
    with session.lock:
        existing = list(session.session.get_objects({
            a.CLASS: pkcs11.ObjectClass.PRIVATE_KEY, a.ID: key_id, a.LABEL: config.key_label}))
        if existing:
            raise CaError("PKCS#11 token %r already holds a key labelled %r with id %s"
                          % (config.token_label, config.key_label, key_id.hex()))
        session.session.create_object(template)


# -- what the CA is given --------------------------------------------------------------

@dataclass(frozen=True)
class Custody:
    """How the CA opens its intermediates' keys (and writes new ones)."""

    password_file: Path | None = None  # the passphrase of the encrypted key files
    require_encrypted: bool = False  # production: a key file in clear is refused
    token: TokenConfig | None = None  # the signing intermediate may be in this token
    asked_from: str = "--password-file or %s" % PASSWORD_VARIABLE  # for messages

    def password(self) -> bytes | None:
        if self.password_file is None:
            return None
        return read_secret_file(self.password_file, "CA passphrase")

    def load_file_key(self, path: Path) -> ec.EllipticCurvePrivateKey:
        source = str(self.password_file) if self.password_file else self.asked_from
        return load_key(path, self.password, asked_from=source,
                        require_encrypted=self.require_encrypted)

    def load_token_key(self, key_id: str, public: ec.EllipticCurvePublicKey,
                       marker: Path) -> ec.EllipticCurvePrivateKey:
        if self.token is None:
            raise CaError("%s says the intermediate's key is in a PKCS#11 token: set %s, "
                          "CITYEDGE_CA_PKCS11_TOKEN and CITYEDGE_CA_PKCS11_PIN_FILE"
                          % (marker, PKCS11_VARIABLE))
        return token_key(self.token, bytes.fromhex(key_id), public)


DEVELOPMENT = Custody()


def custody_of(settings: Any) -> Custody:
    """The custody the fleet's settings describe (``CITYEDGE_CA_PASSWORD_FILE``, the
    ``CITYEDGE_CA_PKCS11_*`` settings); production refuses key files in clear."""
    token = None
    if settings.ca_pkcs11_module is not None:
        token = TokenConfig(settings.ca_pkcs11_module, settings.ca_pkcs11_token or "",
                            settings.ca_pkcs11_pin_file or Path(),
                            settings.ca_pkcs11_key_label)
    return Custody(password_file=settings.ca_password_file,
                   require_encrypted=settings.mode == "production", token=token,
                   asked_from=PASSWORD_VARIABLE)


def cli_custody(password_file: Path | None, module: Path | None, token_label: str | None,
                key_label: str, pin_file: Path | None) -> Custody:
    """The custody a command's options describe (``ca init``, ``ca import-to-token``)."""
    if module is None:
        return Custody(password_file=password_file)
    if not token_label or pin_file is None:
        raise CaError("--pkcs11-module needs --pkcs11-token and --pkcs11-pin-file "
                      "(CITYEDGE_CA_PKCS11_TOKEN, CITYEDGE_CA_PKCS11_PIN_FILE)")
    return Custody(password_file=password_file,
                   token=TokenConfig(module, token_label, pin_file, key_label))


def encrypt_key_files(paths: list[Path], password: bytes) -> list[Path]:
    """Encrypt each key file in clear among ``paths`` (the others are left): the encrypted
    copy is written beside it (``.new``), the clear file is overwritten with random bytes
    and removed, then the copy takes its name. Run again after a crash, it finishes (a
    ``.new`` without its original is renamed)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from cityedge_host.files import write_atomic

    done = []
    for path in paths:
        fresh = path.with_name(path.name + ".new")
        if not path.exists() and fresh.exists():
            fresh.rename(path)
            done.append(path)
            continue
        data = path.read_bytes()
        if is_encrypted(data):
            continue
        try:
            key = load_pem_private_key(data, None)
        except ValueError as e:
            raise CaError("the CA key %s does not parse" % path) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError("the CA key %s is not an EC key" % path)
        write_atomic(fresh, encrypt_pkcs8(key, password), 0o600)
        shred(path)
        fresh.rename(path)
        done.append(path)
    return done


def overwrite(path: Path) -> bool:
    """Overwrite a key file in place with random bytes, synced; False when there is none
    (a copy-on-write or wear-levelled disk may keep old blocks: docs/SECURITY_TEAM.md)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    with path.open("r+b") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    return True


def shred(path: Path) -> None:
    """Overwrite a key file with random bytes, then remove it."""
    if overwrite(path):
        path.unlink(missing_ok=True)
