"""The fleet command keys a CPython device obeys, and its ``trust-update`` handler.

A device starts with the keys its configuration lists (the *seed*: what enrollment gave
it). From then on only a trust statement of the offline root
(``cityedge_core.trust_statement``) changes them, and it arrives inside a ``trust-update``
command, so the command gate has already checked the command with a key trusted *now*
(the old one) before the statement is looked at. The handler then applies, in order
(the first failure answers ``refused`` with the reason, counted in ``TrustStats``):

1. a root is configured (``[gateway] root_cert``): without one, no statement can be
   checked, so the keys never change;
2. the arguments carry a statement (``trust_update_args``);
3. ``check_statement``: the root signed it (kid and signature, with the statement AAD),
   its shape and purpose hold, it is valid now, its version is above the one held;
4. (the statement installed already, sent again: answered ``ok``, nothing changes; a
   lost answer or a power cut between installing and answering must not turn into a
   refusal of the fleet's resend)
5. it is persisted: the statement in the device's state (``get``/``set``: one durable
   transaction on the gateway's SQLite buffer, an atomic file on the fast device), so a
   power cut leaves the old set or the new one, never a mix; only then does the device
   use it and answer ``ok``.

``FleetTrust`` is also the gate's key map (``get(kid)``): the keys of the installed
statement trusted at the clock's time (an old key until its ``until``: the overlap), or
the seed keys while none is installed.

At enrollment (``install_enrolled``): the fleet's answer carries its newest statement
(``EnrollResponse.trust_statement``, base64). The rules of a ``trust-update`` above
(a root configured; base64 holding a statement; ``check_statement``; the statement
installed already taken as it is; persisted before it is used) install it before the
device's first start, so a device enrolled after a command-key rotation
obeys the new key at once. A statement that fails any check raises
``EnrollmentTrustError`` naming the reason, and nothing is written: enrollment is never
silently poisoned (nor silently left on the seed keys).

At start the installed statement is checked again (``check_at_start``), and the device
fails closed (``broken``: the reason; no key is trusted, so no fleet command is obeyed,
while the rest of the device runs and reports it in its status) when

- the stored statement is not hex, not the root's, or its signature or payload does not
  hold (a tampered state file);
- its version is below the version ``mark`` last recorded (a ``VersionMark``: a small
  file beside the state, written after the state), or the statement is gone while the
  mark says one was held: a state file rolled back to an older copy, which would
  otherwise bring back a retired (perhaps stolen) key;
- the mark itself cannot be read.

A statement whose root is not configured at all raises ``TrustStoreError`` (a
configuration to fix, not an attack). Keys whose ``until`` passed (while the device was
off, say) are not trusted from that moment (``trusted`` filters by the clock); at start
they are listed in ``dropped`` and logged. A technician recovers a broken device by
installing the fleet's newest statement again (``install_enrolled``: from a broken store
a statement of the marked version itself is taken).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cityedge_core import cose, trust_statement
from cityedge_core.errors import (
    CityedgeError,
    LocalError,
    MalformedError,
    PeerError,
    SignatureError,
    UnknownKeyError,
)
from cityedge_core.trust_statement import StatementRefused, TrustStatement
from cityedge_host.command_responder import Done, Handler, Refuse
from cityedge_host.crypto import EcVerifier
from cityedge_host.files import write_atomic

log = logging.getLogger(__name__)

STATE_KEY = "trust_statement"  # the installed statement in the device's state (hex text:
# any state takes it, the gateway's CBOR and the fast device's JSON alike)
NO_ROOT = ("trust-update needs the offline root's certificate to check the statement: "
           "set [gateway] root_cert")


@dataclass
class TrustStats:
    """Statements taken and refused, by reason (each refusal is also answered)."""

    installed: int = 0
    no_root: int = 0
    malformed: int = 0  # truncated, garbage, wrong shape or purpose
    not_root: int = 0  # signed by a key that is not the root (a fleet key, say)
    bad_signature: int = 0
    outside_window: int = 0  # not yet valid or expired
    rollback: int = 0  # version not above the one held (a replay)
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"installed": self.installed, "no_root": self.no_root,
                "malformed": self.malformed, "not_root": self.not_root,
                "bad_signature": self.bad_signature, "outside_window": self.outside_window,
                "rollback": self.rollback}


class TrustStoreError(LocalError):
    """The installed statement cannot be read back or checked (state or root changed)."""


class EnrollmentTrustError(LocalError):
    """The enrollment answer's trust statement is refused: nothing was installed."""


class VersionMark:
    """The highest statement version a device installed, in a file of its own beside its
    state (decimal text, written atomically): what a rolled-back state is checked against.
    ``get`` raises ``TrustStoreError`` for a file that is not a version."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self) -> int:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise TrustStoreError("trust version mark %s: %s" % (self.path, e)) from e
        try:
            value = int(text.strip(), 10)
        except ValueError:
            value = -1
        if not 0 <= value <= trust_statement.VERSION_MAX:
            raise TrustStoreError("trust version mark %s is not a version" % self.path)
        return value

    def set(self, version: int) -> None:
        write_atomic(self.path, b"%d\n" % version, 0o600)


class FleetTrust:
    """The gate's key map and the ``trust-update`` handler (rules in the module doc).

    ``seed``: the configured fleet keys (verifiers); ``root``: the offline root's verifier
    (None: not configured); ``state``: ``get``/``set``; ``clock``: UNIX seconds or None.
    """

    def __init__(self, seed: Iterable[EcVerifier], root: EcVerifier | None, state: Any,
                 clock: Callable[[], int | None], mark: VersionMark | None = None) -> None:
        self.seed = {v.kid: v for v in seed}
        self.root = root
        self.state = state
        self.clock = clock
        self.mark = mark
        self.stats = TrustStats()
        self.statement: TrustStatement | None = None
        self.broken = ""  # why the installed statement was refused at start ("": it holds)
        self.dropped: list[str] = []  # kids whose ``until`` had passed at start
        self._verifiers: dict[bytes, EcVerifier] = {}
        self.check_at_start()

    def check_at_start(self) -> None:
        """Read the installed statement back and check it (the module doc): sets
        ``statement``, or ``broken`` with the reason (fail closed)."""
        try:
            stored = self._stored()
        except TrustStoreError as e:
            self._break(str(e))
            return
        if stored is not None and self.root is None:
            raise TrustStoreError("a trust statement is installed but no root "
                                  "certificate is configured to check it: set "
                                  "[gateway] root_cert")
        if stored is not None:
            assert self.root is not None
            try:
                self.statement = trust_statement.read_installed(stored, self.root,
                                                                self.root.kid)
            except PeerError as e:
                self._break("the installed trust statement does not hold (%s): tampered "
                            "with, or [gateway] root_cert is not the fleet's root" % e)
                return
        if self.mark is None:
            return
        try:
            held = self.mark.get()
        except TrustStoreError as e:
            self._break(str(e))
            return
        if self.version < held:
            self._break("the installed trust statement is version %d but version %d was "
                        "installed before: the state was rolled back" % (self.version, held)
                        if self.statement is not None else
                        "no trust statement is installed but version %d was: the state was "
                        "rolled back or its statement removed" % held)
            return
        if self.version > held:  # a power cut between the state and the mark
            self.mark.set(self.version)
        st = self.statement
        if st is not None:
            now = self.clock()
            lasting = set(st.points_at(now))
            self.dropped = [cose.kid_for_public_key(p).hex() for p, _ in st.keys
                            if p not in lasting]
            if self.dropped:
                log.info("trust statement v%d: fleet keys %s past their end, not trusted",
                         st.version, ", ".join(self.dropped))

    def _break(self, why: str) -> None:
        self.statement = None
        self.broken = why
        self.stats.last_error = why
        log.error("fleet trust refused at start, no fleet command will be obeyed: %s", why)

    def _stored(self) -> bytes | None:
        text = self.state.get(STATE_KEY)
        if text is None:
            return None
        try:
            return bytes.fromhex(text)
        except (TypeError, ValueError) as e:
            raise TrustStoreError("the installed trust statement is not hex text") from e

    @property
    def version(self) -> int:
        """The version held (0: the seed keys, no statement yet)."""
        return self.statement.version if self.statement is not None else 0

    def trusted(self) -> dict[bytes, EcVerifier]:
        """kid -> verifier of every key trusted now (none while ``broken``)."""
        if self.broken:
            return {}
        if self.statement is None:
            return dict(self.seed)
        out = {}
        for point in self.statement.points_at(self.clock()):
            v = self._verifiers.get(point)
            if v is None:
                try:
                    v = self._verifiers[point] = EcVerifier.from_sec1(point)
                except ValueError:  # not on the curve: the root vouched for it, still void
                    continue
            out[v.kid] = v
        return out

    def get(self, kid: bytes, default: Any = None) -> Any:
        """The gate's lookup: the verifier of ``kid`` if it is trusted now."""
        return self.trusted().get(kid, default)

    def _kids(self) -> list[str]:
        st = self.statement
        return [] if st is None else [cose.kid_for_public_key(p).hex() for p, _ in st.keys]

    def handlers(self) -> dict[str, Handler]:
        return {trust_statement.TRUST_UPDATE: self.trust_update}

    def _refuse(self, counter: str, why: str) -> Refuse:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.last_error = why
        log.warning("trust-update refused: %s", why)
        return Refuse(why)

    async def trust_update(self, args: Any) -> Done:
        if self.root is None:
            raise self._refuse("no_root", NO_ROOT)
        try:
            data = trust_statement.trust_update_args(args)
            if self.statement is not None and data == self._stored():
                # the one installed, sent again (our answer was lost, or a power cut came
                # between installing and answering): the goal holds
                return Done("trust statement v%d already installed" % self.version,
                            {"version": self.version, "kids": self._kids()})
            st = trust_statement.check_statement(data, self.root, self.root.kid,
                                                 self.version, self.clock())
        except StatementRefused as e:
            raise self._refuse("rollback" if e.rollback else "outside_window", str(e)) from e
        except UnknownKeyError as e:
            raise self._refuse("not_root", str(e)) from e
        except SignatureError as e:
            raise self._refuse("bad_signature", "statement: %s" % e) from e
        except MalformedError as e:
            raise self._refuse("malformed", str(e)) from e
        self._install(data, st)
        self.stats.installed += 1
        kids = self._kids()
        log.info("trust statement v%d installed: fleet keys %s", st.version, ", ".join(kids))
        return Done("trust statement v%d installed: %d fleet keys" % (st.version, len(kids)),
                    {"version": st.version, "kids": kids})

    def _install(self, data: bytes, st: TrustStatement) -> None:
        self.state.set(**{STATE_KEY: data.hex()})  # durable before it is used or answered
        if self.mark is not None:  # after the state: a cut between is mended at start
            self.mark.set(st.version)
        self.statement = st
        self.broken = ""

    def install_enrolled(self, statement: str | None) -> str:
        """Install the enrollment answer's ``trust_statement`` (base64; None: the fleet
        never rotated its command key) with a ``trust-update``'s checks. Returns what was
        done, for the log; raises ``EnrollmentTrustError`` (nothing written) if refused."""
        if not statement:
            return "no trust statement in the enrollment answer: the fleet keys given hold"
        if self.root is None:
            raise EnrollmentTrustError("the enrollment answer carries a trust statement "
                                       "and no root certificate is configured to check it: "
                                       "set [gateway] root_cert")
        try:
            data = base64.b64decode(statement, validate=True)
        except (binascii.Error, ValueError) as e:
            raise EnrollmentTrustError("the enrollment answer's trust statement is not "
                                       "base64: %s" % e) from None
        if self.statement is not None and data == self._stored():
            return "trust statement v%d already installed: fleet keys %s" % (
                self.version, ", ".join(self._kids()))
        held = self.version
        if self.broken and self.mark is not None:  # a technician mends a broken store:
            try:  # the marked version itself is taken again
                held = max(self.mark.get() - 1, 0)
            except TrustStoreError:
                held = 0
        try:
            st = trust_statement.check_statement(data, self.root, self.root.kid, held,
                                                 self.clock())
        except CityedgeError as e:
            self.stats.last_error = str(e)
            raise EnrollmentTrustError("the enrollment answer's trust statement is "
                                       "refused, nothing installed: %s" % e) from None
        self._install(data, st)  # not counted in ``stats``: done by another process (the
        # technician's `install-trust`, `provision`), never by the running service
        kids = self._kids()
        log.info("trust statement v%d installed at enrollment: fleet keys %s", st.version,
                 ", ".join(kids))
        return "trust statement v%d installed: fleet keys %s" % (st.version, ", ".join(kids))
