"""The fleet's command key: the P-256 key every fleet command is signed with.

Every device trusts its public half (enrollment hands it over: ``EnrollResponse.fleet_keys``),
so whoever holds this key can command the fleet. It lives in the file
``CITYEDGE_COMMAND_KEY_FILE`` names (PKCS#8 PEM, mode 0600), never in the database, and is
never logged (``EcSigner`` shows its kid only). ``cityedge keys init-command-key`` creates
it once and refuses to overwrite one: a new key would cut every device that trusts the
old one off from the fleet. Development makes its own at first start; production refuses
to start without it, with one another user may read, or with one that is not P-256.

The **trust store** a device needs is the list of fleet public keys it accepts commands
from (``trust_store``: SEC1 uncompressed points, hex; the device keys them by
``cose.kid_for_public_key``). Today it holds the command key; the design for changing it
(a trust-store update signed by the old command key *and* the offline root, so a stolen
fleet server alone cannot replace the key) is in ``docs/ARCHITECTURE.md``, "Fleet
commands".
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_core.errors import LocalError
from cityedge_fleet.config import Settings
from cityedge_host.crypto import EcSigner, public_sec1


class CommandKeyError(LocalError):
    """The command key file is missing, unreadable, not a P-256 key, or open to others."""


def create(path: Path) -> EcSigner:
    """A new key in ``path`` (0600), which must not exist yet (``CommandKeyError``).

    The file appears whole or not at all (written beside it, then hard-linked into place:
    ``link`` fails if a file is there, even one another process made a moment ago)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    signer = EcSigner.generate()
    tmp = path.with_name(".%s.%s.tmp" % (path.name, secrets.token_hex(4)))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, signer.private_pem())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise CommandKeyError(
                "the command key %s exists: it is kept (devices trust it; a new key is "
                "announced to them by a signed trust-store update, never by replacing the "
                "file)" % path) from e
    except OSError as e:
        raise CommandKeyError("cannot create the command key %s: %s" % (path, e)) from e
    finally:
        tmp.unlink(missing_ok=True)
    return signer


def load(path: Path, *, create_missing: bool = False) -> EcSigner:
    """The key in ``path``; made first when it is missing and ``create_missing``."""
    if create_missing and not path.exists():
        try:
            return create(path)
        except CommandKeyError:
            if not path.exists():
                raise  # else another process made it at the same moment: load that one
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CommandKeyError("the command key %s is open to other users (mode %o): "
                                  "chmod 600 it" % (path, stat.S_IMODE(st.st_mode)))
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise CommandKeyError(
            "the command key %s does not exist: create it once with `cityedge keys "
            "init-command-key` (CITYEDGE_COMMAND_KEY_FILE names it)" % path) from e
    except OSError as e:
        raise CommandKeyError("cannot read the command key %s: %s" % (path, e)) from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CommandKeyError("%s is not an unencrypted PEM private key" % path) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                          ec.SECP256R1):
        raise CommandKeyError("%s is not a P-256 key (commands are ES256)" % path)
    return EcSigner(key)


def from_settings(settings: Settings) -> EcSigner:
    """The configured key; a development fleet makes its own at first start."""
    return load(settings.command_key_file, create_missing=settings.mode == "development")


class KeyFile:
    """The command key as a long-running process holds it: loaded at start (a missing or
    unsafe key stops the start) and loaded again whenever the file changes, so ``keys
    rotate-command-key --switch`` (which replaces the file) takes effect in a running
    ``fleet serve``, its campaign runner and ``fleet ingest`` at their next command, with
    no restart. The check is one ``stat`` per use (inode, size, mode, modification and
    change times); a file that became missing or unsafe is an error at that use
    (``CommandKeyError``), never a silent fall-back to the key that was replaced."""

    def __init__(self, path: Path, *, create_missing: bool = False) -> None:
        self.path = path
        self._create_missing = create_missing
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._signer: EcSigner | None = None
        self.loads = 0  # times the file was read (the tests count reloads)
        self.current()

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode

    def current(self) -> EcSigner:
        """The key in the file now."""
        stamp = self._stat()
        with self._lock:
            if self._signer is None or stamp is None or stamp != self._stamp:
                signer = load(self.path, create_missing=self._create_missing)
                self._signer, self._stamp = signer, self._stat()
                self.loads += 1
            return self._signer


def key_file(settings: Settings) -> KeyFile:
    """``from_settings`` for a long-running process: follows a ``--switch``."""
    return KeyFile(settings.command_key_file,
                   create_missing=settings.mode == "development")


def trust_store(signer: EcSigner) -> list[str]:
    """The fleet public keys a device trusts for commands: SEC1 uncompressed points, hex."""
    return [public_sec1(signer.public_key).hex()]
