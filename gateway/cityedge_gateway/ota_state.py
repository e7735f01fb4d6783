"""The update's life as a pure state machine, and the record the installer persists.

States use hawkBit's vocabulary (its DDI feedback: scheduled, download, downloaded,
proceeding, closed with success or failure), as one status word each::

    idle|committed|rolled-back|failed --schedule--> scheduled
    scheduled|downloading|downloaded  --schedule--> scheduled    (a newer release replaces it)
    scheduled|downloading --download--> downloading               (again: a resume)
    downloading --downloaded--> downloaded --install--> installing --switch--> trial
    trial --healthy--> committed        trial --unhealthy--> rolled-back
    scheduled|downloading|downloaded|installing --fail--> failed

``transition(state, event)`` is the whole rule; any pair not in ``TRANSITIONS`` raises
``InvalidTransition``. Nothing can reach ``committed`` but through ``trial`` and its
health, and nothing can start while a release is ``installing`` or in ``trial``.

``UpdateRecord`` is what ``state.json`` holds (the installer writes it atomically, fsynced,
before it moves a symlink: the record is the truth and the symlinks follow it). Fields it
does not know are kept (``extra``), so release N+1 can add some that release N, still the
boot guard in ``previous``, carries over unharmed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

IDLE = "idle"
SCHEDULED = "scheduled"
DOWNLOADING = "downloading"
DOWNLOADED = "downloaded"
INSTALLING = "installing"
TRIAL = "trial"
COMMITTED = "committed"
ROLLED_BACK = "rolled-back"
FAILED = "failed"
STATES = (IDLE, SCHEDULED, DOWNLOADING, DOWNLOADED, INSTALLING, TRIAL, COMMITTED,
          ROLLED_BACK, FAILED)
SETTLED = (IDLE, COMMITTED, ROLLED_BACK, FAILED)  # nothing under way
BUSY = (INSTALLING, TRIAL)  # a new release must wait

SCHEDULE = "schedule"
DOWNLOAD = "download"
DOWNLOAD_DONE = "downloaded"
INSTALL = "install"
SWITCH = "switch"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
FAIL = "fail"
EVENTS = (SCHEDULE, DOWNLOAD, DOWNLOAD_DONE, INSTALL, SWITCH, HEALTHY, UNHEALTHY, FAIL)

TRANSITIONS: dict[tuple[str, str], str] = {
    **{(s, SCHEDULE): SCHEDULED for s in (*SETTLED, SCHEDULED, DOWNLOADING, DOWNLOADED)},
    (SCHEDULED, DOWNLOAD): DOWNLOADING,
    (DOWNLOADING, DOWNLOAD): DOWNLOADING,
    (DOWNLOADING, DOWNLOAD_DONE): DOWNLOADED,
    (DOWNLOADED, INSTALL): INSTALLING,
    (INSTALLING, SWITCH): TRIAL,
    (TRIAL, HEALTHY): COMMITTED,
    (TRIAL, UNHEALTHY): ROLLED_BACK,
    **{(s, FAIL): FAILED for s in (SCHEDULED, DOWNLOADING, DOWNLOADED, INSTALLING)},
}


class InvalidTransition(ValueError):
    """An event the state does not allow (a caller's mistake, or a state file edited)."""


def transition(state: str, event: str) -> str:
    """The state after ``event`` in ``state``; raises ``InvalidTransition``."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition("%s cannot happen in state %s" % (event, state)) from None


class UpdateStateError(ValueError):
    """``state.json`` cannot be read as an update record."""


@dataclass(frozen=True)
class UpdateRecord:
    state: str = IDLE
    # the release being worked on (scheduled .. trial) or last worked on
    version: str = ""
    sequence: int = 0
    size: int = 0
    sha256: str = ""  # hex
    url: str = ""
    keys_version: int = 0  # the release-key list version its manifest was verified under
    reason: str = ""  # why it failed or rolled back
    # what runs when nothing is under way; the anti-rollback floors: of the release, and of
    # the release-key list (``check_update``'s stored list version: an older list, e.g. one
    # that still certifies a revoked key, is refused)
    installed_version: str = ""
    installed_sequence: int = 0
    installed_keys_version: int = 0
    previous_version: str = ""  # what ``trial`` rolls back to
    trial_starts: int = 0  # starts counted by the boot guard while in trial
    trial_max_starts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # fields of newer releases

    def after(self, event: str, **changes: Any) -> UpdateRecord:
        """This record moved by ``event`` (checked by ``transition``), with ``changes``."""
        return replace(self, state=transition(self.state, event), **changes)

    def to_bytes(self) -> bytes:
        d = asdict(self)
        extra = d.pop("extra")
        return json.dumps({**extra, **d}, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateRecord:
        try:
            d = json.loads(data)
        except ValueError as e:
            raise UpdateStateError("not JSON: %s" % e) from e
        if not isinstance(d, dict):
            raise UpdateStateError("not a JSON object")
        known = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra" or f.name not in d:
                continue
            v = d[f.name]
            want = int if f.type in ("int", int) else str
            if isinstance(v, bool) or not isinstance(v, want):
                raise UpdateStateError("%s: expected %s, got %r" % (f.name, want.__name__, v))
            kw[f.name] = v
        if kw.get("state", IDLE) not in STATES:
            raise UpdateStateError("unknown state %r" % kw["state"])
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})

    def public(self) -> dict[str, Any]:
        """What the signed status reports (no URL: it may carry a token)."""
        return {"state": self.state, "version": self.version, "sequence": self.sequence,
                "reason": self.reason, "installed_version": self.installed_version,
                "installed_sequence": self.installed_sequence,
                "installed_keys_version": self.installed_keys_version,
                "trial_starts": self.trial_starts}
