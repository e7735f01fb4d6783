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
the seed keys while none is installed. A statement installed earlier is read back and
checked against the root again at start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cityedge_core import cose, trust_statement
from cityedge_core.errors import (
    LocalError,
    MalformedError,
    PeerError,
    SignatureError,
    UnknownKeyError,
)
from cityedge_core.trust_statement import StatementRefused, TrustStatement
from cityedge_host.command_responder import Done, Handler, Refuse
from cityedge_host.crypto import EcVerifier

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


class FleetTrust:
    """The gate's key map and the ``trust-update`` handler (rules in the module doc).

    ``seed``: the configured fleet keys (verifiers); ``root``: the offline root's verifier
    (None: not configured); ``state``: ``get``/``set``; ``clock``: UNIX seconds or None.
    """

    def __init__(self, seed: Iterable[EcVerifier], root: EcVerifier | None, state: Any,
                 clock: Callable[[], int | None]) -> None:
        self.seed = {v.kid: v for v in seed}
        self.root = root
        self.state = state
        self.clock = clock
        self.stats = TrustStats()
        self.statement: TrustStatement | None = None
        self._verifiers: dict[bytes, EcVerifier] = {}
        stored = self._stored()
        if stored is not None:
            if root is None:
                raise TrustStoreError("a trust statement is installed but no root "
                                      "certificate is configured to check it: set "
                                      "[gateway] root_cert")
            try:
                self.statement = trust_statement.read_installed(stored, root, root.kid)
            except PeerError as e:
                raise TrustStoreError("the installed trust statement does not hold (%s): "
                                      "is [gateway] root_cert the fleet's root?" % e) from e

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
        """kid -> verifier of every key trusted now."""
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
        self.state.set(**{STATE_KEY: data.hex()})  # durable before it is used or answered
        self.statement = st
        self.stats.installed += 1
        kids = self._kids()
        log.info("trust statement v%d installed: fleet keys %s", st.version, ", ".join(kids))
        return Done("trust statement v%d installed: %d fleet keys" % (st.version, len(kids)),
                    {"version": st.version, "kids": kids})
