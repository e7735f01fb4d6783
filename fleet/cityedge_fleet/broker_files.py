"""Can the broker's service user reach every file its configuration names?

Debian's `mosquitto.service` starts the broker as root from ``/`` and the broker drops to
its own user (``mosquitto``) before it reads its certificates, its CRL and the dynamic
security plugin's file; a SIGHUP (the fleet's CRL reload) reads them again as that user.
So a configuration whose key is ``0600 root`` or whose CA directory is ``0700`` (as the
fleet makes it) passes a test run as root and fails as a service. ``problems`` works out,
from the files' owners and modes, what that user cannot do and says what to change;
``set_owner`` makes the changes that are safe to make here (``broker config
--set-owner``); the rest is reported.

The rule is the kernel's for a process of ``uid`` with groups ``gids``: root may do
everything; otherwise the owner's bits apply to the owner, the group's bits to a member of
the file's group, the others' bits to everybody else (ACLs are not read: a file system
with ACLs may allow more than this says, never less in practice for these files).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

R, W, X = 4, 2, 1


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int  # the primary group
    gids: frozenset[int]  # primary and supplementary groups


@dataclass(frozen=True)
class Problem:
    path: Path
    need: str  # "read", "write" or "enter" (a directory on the way)
    why: str  # owner, group and mode as they are
    fix: str  # the commands that would fix it


def lookup(name: str) -> ServiceUser | None:
    """The user ``name`` of this machine, or None."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return ServiceUser(name, pw.pw_uid, pw.pw_gid, frozenset(gids))


def _allowed(st: os.stat_result, user: ServiceUser, bits: int) -> bool:
    if user.uid == 0:
        return True
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == user.uid:
        have = mode >> 6
    elif st.st_gid in user.gids:
        have = mode >> 3
    else:
        have = mode
    return (have & bits) == bits


def _owner(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return "%s:%s mode %03o" % (owner, group, stat.S_IMODE(st.st_mode))


def _group_name(user: ServiceUser) -> str:
    try:
        return grp.getgrgid(user.gid).gr_name
    except KeyError:
        return str(user.gid)


def _walk(path: Path, user: ServiceUser, bits: int, need: str) -> Problem | None:
    """The first thing on the way to ``path`` that ``user`` may not do, or None."""
    path = path.absolute()
    for d in reversed(path.parents):
        try:
            st = d.stat()
        except OSError as e:
            return Problem(d, "enter", "cannot be read here: %s" % e.strerror, "")
        if not _allowed(st, user, X):
            return Problem(d, "enter", "%s: %s may not enter it" % (_owner(st), user.name),
                           "chgrp %s %s && chmod g+x %s" % (_group_name(user), d, d))
    try:
        st = path.stat()
    except FileNotFoundError:
        return Problem(path, need, "does not exist", "")
    except OSError as e:
        return Problem(path, need, "cannot be read here: %s" % e.strerror, "")
    if not _allowed(st, user, bits):
        if need == "write":
            fix = "chown %s %s" % (user.name, path)
        else:
            fix = "chgrp %s %s && chmod g+r %s" % (_group_name(user), path, path)
        return Problem(path, need, "%s: %s may not %s it" % (_owner(st), user.name, need), fix)
    return None


def problems(user: ServiceUser, read: list[Path], write: list[Path]) -> list[Problem]:
    """What ``user`` cannot do of: reading each of ``read``, writing each of ``write``
    (a directory: creating and renaming files in it needs write and enter)."""
    out: list[Problem] = []
    for path in read:
        p = _walk(path, user, R, "read")
        if p is not None and p not in out:
            out.append(p)
    for path in write:
        p = _walk(path, user, W | X if path.is_dir() else W, "write")
        if p is not None and p not in out:
            out.append(p)
    return out


def set_owner(user: ServiceUser, read: list[Path], write: list[Path]) -> list[str]:
    """Make the changes that are safe here, and say each: a file to read gets the user's
    group and group read; its own directory gets the user's group and group enter (not
    read: the user cannot list it, so a 0600 key beside it stays private); a path to
    write is given to the user. Directories further up are left alone (``problems``
    still reports them)."""
    done: list[str] = []
    gname = _group_name(user)

    def group_bits(path: Path, bits: int) -> None:
        st = path.stat()
        if _allowed(st, user, bits):
            return
        os.chown(path, -1, user.gid)
        os.chmod(path, stat.S_IMODE(st.st_mode) | (bits << 3))
        done.append("chgrp %s %s && chmod g+%s %s" % (gname, path, "rx"[bits == X], path))

    for path in read:
        path = path.absolute()
        if path.exists():
            group_bits(path.parent, X)
            group_bits(path, R)
    for path in write:
        path = path.absolute()
        if path.exists() and not _allowed(path.stat(), user,
                                          W | X if path.is_dir() else W):
            os.chown(path, user.uid, user.gid)
            done.append("chown %s:%s %s" % (user.name, gname, path))
    return done
