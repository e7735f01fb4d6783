"""Parsers for the host probe: ``sshd_config``, APT configuration and systemd unit files.

Pure functions over text (``host_rules`` decides on what they return); each follows the
format's own documentation, and each raises only ``HostParseError`` on bad input:

- ``parse_sshd_config`` (sshd_config(5)): ``Keyword value`` or ``Keyword=value``, ``#``
  comments, keywords case-insensitive, "for each keyword, the first obtained value will be
  used", ``Include`` (globs, relative to ``/etc/ssh``, expanded in name order, in the
  context they appear in) and ``Match`` blocks, which last to the next ``Match`` or the end
  of the file they are in;
- ``parse_sshd_t``: the ``keyword value`` lines ``sshd -T`` prints (effective settings);
- ``parse_apt_conf`` (apt.conf(5)): ``Scope::Name "value";``, nested ``Scope { ... };``,
  bare ``"item";`` list entries inside a scope, ``//`` and ``/* */`` comments, ``#clear``;
  names case-insensitive; a later scalar replaces an earlier one, list entries append;
  ``apt_conf_file_used`` is apt's rule for which ``apt.conf.d`` file names it reads;
- ``parse_unit`` (systemd.syntax(7)): ``[Section]`` headers, ``Key=Value``, ``#``/``;``
  comments, a trailing backslash continues a line; an empty assignment resets a list.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
from dataclasses import dataclass, field

SSH_DIR = "/etc/ssh"
MAX_INCLUDE_DEPTH = 16  # sshd's own limit is 16 as well (READCONF_MAX_DEPTH)


class HostParseError(ValueError):
    """Text that is not the format it claims to be."""


# --------------------------------------------------------------------------------------
# sshd_config


@dataclass
class SshdConfig:
    """Global settings (first value wins) and each ``Match`` block's, keywords lowercased.
    ``missing``: include patterns that matched no file (sshd skips those silently)."""

    settings: dict[str, str] = field(default_factory=dict)
    matches: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _sshd_line(line: str) -> tuple[str, str] | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    m = re.match(r"([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+)(.*)$", line)
    if m is None:
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", line):
            return line.lower(), ""
        raise HostParseError("not a 'Keyword value' line: %r" % line[:80])
    value = m.group(2).strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return m.group(1).lower(), value


def _words(value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as e:
        raise HostParseError("%s: %r" % (e, value[:80])) from e


def sshd_includes(text: str) -> list[str]:
    """The absolute include patterns of one file (for the collector to read them)."""
    out: list[str] = []
    for raw in text.splitlines():
        parsed = _sshd_line(raw)
        if parsed and parsed[0] == "include":
            out.extend(posixpath.join(SSH_DIR, p) for p in _words(parsed[1]))
    return out


def parse_sshd_config(files: dict[str, str], main: str = SSH_DIR + "/sshd_config"
                      ) -> SshdConfig:
    """The configuration ``main`` describes; ``files``: every file read, by absolute path
    (``HostParseError`` if ``main`` is not among them)."""
    if main not in files:
        raise HostParseError("%s was not read" % main)
    cfg = SshdConfig()

    def apply(target: dict[str, str], key: str, value: str) -> None:
        target.setdefault(key, value)  # the first obtained value is used

    def read(path: str, block: dict[str, str] | None, depth: int) -> None:
        if depth > MAX_INCLUDE_DEPTH:
            raise HostParseError("includes nested deeper than %d" % MAX_INCLUDE_DEPTH)
        current = block
        for raw in files[path].splitlines():
            parsed = _sshd_line(raw)
            if parsed is None:
                continue
            key, value = parsed
            if key == "match":
                current = {}
                cfg.matches.append((value, current))
            elif key == "include":
                for pattern in _words(value):
                    full = posixpath.join(SSH_DIR, pattern)
                    hits = sorted(p for p in files if fnmatch.fnmatchcase(p, full))
                    if not hits:
                        cfg.missing.append(full)
                    for hit in hits:
                        read(hit, current, depth + 1)
            else:
                apply(cfg.settings if current is None else current, key, value)

    read(main, None, 0)
    return cfg


def parse_sshd_t(text: str) -> dict[str, str]:
    """``sshd -T`` output: ``keyword value`` per line (keywords lowercased; repeated
    keywords such as ``hostkey`` keep their first value)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts:
            out.setdefault(parts[0].lower(), parts[1] if len(parts) > 1 else "")
    return out


# --------------------------------------------------------------------------------------
# APT configuration


@dataclass
class AptConf:
    """Scalars and lists by lowercased full name (``apt::periodic::unattended-upgrade``)."""

    values: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)

    def clear(self, name: str) -> None:
        key = name.lower()
        for d in (self.values, self.lists):
            for k in [k for k in d if k == key or k.startswith(key + "::")]:
                del d[k]


_APT_TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|"[^"\n]*"|[{};]|[^\s{};"]+', re.DOTALL)
_CLEAR = "\x00clear"


def _apt_tokens(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):  # #clear, #include, or a comment line
            words = line.split()
            line = " ".join([_CLEAR, *(w.rstrip(";") for w in words[1:]), ";"]) \
                if words[0] == "#clear" else ""
        lines.append(line)
    joined = "\n".join(lines)
    tokens: list[str] = []
    i = 0
    while i < len(joined):
        m = _APT_TOKEN.match(joined, i)
        if m is None:  # an unterminated string or comment
            raise HostParseError("unreadable text at offset %d" % i)
        tok = m.group(0)
        i = m.end()
        if tok.startswith("/*") and (len(tok) < 4 or not tok.endswith("*/")):
            raise HostParseError("a /* comment that does not end")
        if not (tok.isspace() or tok.startswith(("//", "/*"))):
            tokens.append(tok)
    return tokens


def parse_apt_conf(text: str, into: AptConf | None = None) -> AptConf:
    """Apply one APT configuration file's text to ``into`` (a new ``AptConf`` if None)."""
    conf = AptConf() if into is None else into
    tokens = _apt_tokens(text)
    scopes: list[str] = []
    i = 0

    def expect(tok: str) -> None:
        nonlocal i
        if i >= len(tokens) or tokens[i] != tok:
            raise HostParseError("expected %r, found %r" % (
                tok, tokens[i] if i < len(tokens) else "the end"))
        i += 1

    while i < len(tokens):
        tok = tokens[i]
        if tok == _CLEAR:
            i += 1
            while i < len(tokens) and tokens[i] != ";":
                conf.clear("::".join([*scopes, tokens[i]]))
                i += 1
            expect(";")
        elif tok == "}":
            if not scopes:
                raise HostParseError("a } closes no scope")
            scopes.pop()
            i += 1
            if i < len(tokens) and tokens[i] == ";":
                i += 1
        elif tok.startswith('"'):  # a list entry of the enclosing scope
            if not scopes:
                raise HostParseError("a value without a name at the top level")
            conf.lists.setdefault("::".join(scopes).lower(), []).append(tok[1:-1])
            i += 1
            expect(";")
        elif tok in ("{", ";"):
            raise HostParseError("unexpected %r" % tok)
        else:
            name = tok.strip(":")
            if not name:
                raise HostParseError("an empty name")
            i += 1
            nxt = tokens[i] if i < len(tokens) else ";"
            if nxt == "{":
                scopes.append(name)
                i += 1
            elif nxt == ";":
                i += 1  # a name alone: nothing to set
            else:
                value = nxt[1:-1] if nxt.startswith('"') else nxt
                full = "::".join([*scopes, name]).lower()
                i += 1
                if i < len(tokens) and tokens[i] == "{":  # Name "value" { ... }: a scope
                    scopes.append(name)
                    i += 1
                    continue
                conf.values[full] = value
                expect(";")
    if scopes:
        raise HostParseError("scope %s is not closed" % "::".join(scopes))
    return conf


_APT_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def apt_conf_file_used(name: str) -> bool:
    """apt.conf(5): a ``apt.conf.d`` file is read only if its name holds nothing but
    letters, digits, ``-``, ``_`` and ``.``, and it has no extension or ``.conf``."""
    if not _APT_NAME.fullmatch(name):
        return False
    return "." not in name or name.endswith(".conf")


# --------------------------------------------------------------------------------------
# systemd units

# Settings whose repeated assignments add up (systemd.exec(5)); the others: the last wins.
LIST_SETTINGS = frozenset({
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "RestrictAddressFamilies", "SystemCallFilter", "SupplementaryGroups",
    "CapabilityBoundingSet", "AmbientCapabilities", "Environment", "ExecStartPre",
    "ExecStartPost", "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem",
    "DeviceAllow", "IPAddressDeny", "IPAddressAllow", "SystemCallArchitectures",
})


def parse_unit(text: str) -> list[tuple[str, str, str, bool]]:
    """``(section, key, value, after_hardening_comment)`` of each assignment, in order.
    The flag is True once a ``# hardening`` comment line was seen in the section (the
    project's unit marks its hardening options so)."""
    out: list[tuple[str, str, str, bool]] = []
    section = ""
    hardening = False
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line:
            continue
        if line[0] in "#;":
            if line[1:].strip().lower().startswith("hardening"):
                hardening = True
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise HostParseError("a section header without ]: %r" % line[:80])
            section = line[1:-1]
            hardening = False
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise HostParseError("not a Key=Value line: %r" % line[:80])
        out.append((section, key.strip(), value.strip(), hardening))
    return out


def unit_settings(texts: list[str], section: str = "Service") -> dict[str, str]:
    """The effective settings of ``section`` over a unit file and its drop-ins, in order:
    list settings add up (an empty assignment resets them), the others: the last wins."""
    out: dict[str, str] = {}
    for text in texts:
        for sec, key, value, _h in parse_unit(text):
            if sec != section:
                continue
            if key in LIST_SETTINGS and value and out.get(key):
                out[key] = out[key] + " " + value
            else:
                out[key] = value
    return out


def parse_systemctl_show(text: str) -> dict[str, str]:
    """``systemctl show UNIT``: one ``Key=Value`` per line."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out
