"""The firmware-image rules: what a firmware bundle holds in, verdicts out.

Sans-IO: ``check_image(capture, release, platform)`` reads nothing but its arguments
(``image_probe`` walks the bundle once and fills an ``ImageCapture``: each file's size and
SHA-256, the ``boot.py`` sources, the files inside a ROMFS image, the secret scan). Four
requirements, each decided here and nowhere else:

CE-UPD-03 (``fw-signed``), with the project's own OTA release format
(``cityedge_core.update_manifest``, ``docs/RELEASE_MANAGER.md``), first failure decides:

1. ``could not decide`` without a manifest, a release-key list and a root set: the bundle
   alone cannot show who signed it;
2. ``fail`` when the release does not verify under any root set given, by the device's own
   rules (``cityedge_host.release.verify_release``, which runs ``check_update`` unchanged):
   an unsigned manifest (``malformed``), one signed by a key the roots did not certify
   (``unknown_key``), a changed one (``bad_signature``), a key list without the root
   signatures (``keys_threshold``), a key that may not sign the component
   (``wrong_role``), an expired key or manifest (``key_expired``, ``expired``: devices
   refuse it);
3. ``fail`` when no file of the bundle has the manifest's size and SHA-256 (the signed
   artifact was changed, or the manifest is another image's);
4. ``fail`` when the signed artifact is a ROMFS image and a ``.mpy`` module of the bundle
   is not in it byte for byte (code beside the signed image, or a changed copy);
5. ``pass`` otherwise. Files outside the signed artifact that are not code (``boot.py``,
   ``main.py``, the freeze manifest, ``VERSION``) are named in the evidence: they are
   flashed with the board image, which secure boot covers, not by an update.

CE-UPD-04 (``fw-sequence``): the authentic manifest's sequence must be above
``min_sequence`` (the floor: the sequence the devices run now; 0 when none is given).
``could not decide`` when the manifest is not authentic (an unverified number proves
nothing), ``fail`` when it is at or below the floor (devices refuse it: ``rollback`` or
``replay``).

CE-AUTH-06 (``fw-secrets``): ``secret_scan.secrets_verdict`` on the scan of every file.

CE-DBG-03 (``fw-repl``): every ``boot.py`` of the bundle, parsed with ``ast`` (never
matched as text: a commented-out line does nothing), must detach each REPL slot the
production ``boot.py`` of ``make firmware`` (``cityedge_host.production_boot``) detaches
for the platform (``os.dupterm(None, 1)`` on an ESP32), at module level, under no
condition the rule cannot evaluate (``sys.platform`` tests are evaluated for the
platform), and must not attach a stream again (``os.dupterm(x, ...)``) or start
WebREPL. A bundle without ``boot.py``, or one that does not parse, fails: the REPL stays
on the UART. On an RP2040 ``boot.py`` cannot detach the REPL (a build flag removes it), so
the rule cannot decide there and points at ``cityedge hw serial``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cityedge_core import update_manifest
from cityedge_hardware.limits import LIMITS, HardwareLimits
from cityedge_hardware.secret_scan import ScanResult, secrets_verdict
from cityedge_hardware.verdict import Evidence, Outcome, Verdict
from cityedge_host.production_boot import BOOT_PY
from cityedge_host.release import RootSet, verify_release

REQ_SIGNED = "CE-UPD-03"
REQ_ROLLBACK = "CE-UPD-04"
REQ_NO_CONSOLE = "CE-DBG-03"
CHECK_SIGNED = "fw-signed"
CHECK_SEQUENCE = "fw-sequence"
CHECK_REPL = "fw-repl"

ROMFS_HEADER = b"\xd2\xcd\x31"  # MicroPython's VfsRom image (mpremote.romfs.VfsRomWriter)
CODE_SUFFIX = ".mpy"
# sys.platform of each catalogue platform's MicroPython port
SYS_PLATFORM = {"esp32": "esp32", "rp2040": "rp2"}

# The device's reasons (update_manifest) that mean "authentic, but a device refuses it".
_STALE = {update_manifest.KEY_EXPIRED, update_manifest.EXPIRED}
# Authentic and acceptable as far as signing goes: the sequence rule decides the rest;
# the install window and the installed version are a device's business, not the image's.
_SIGNED_OK = {update_manifest.OK, update_manifest.ROLLBACK, update_manifest.REPLAY,
              update_manifest.OUTSIDE_WINDOW, update_manifest.TOO_OLD_INSTALLED}

FIX_SUPPLY = ("supply the release: the signed manifest (--release manifest.cose), the "
              "release-key list (--release-keys release-keys.cose) and the root set the city "
              "named (--release-root root-set.json)")
FIX_SIGN = ("sign the artifact you ship with a release key the roots certified "
            "(`cityedge release sign --artifact build/firmware.romfs ...`), check it with "
            "`cityedge release verify` (docs/RELEASE_MANAGER.md) and ship it unchanged")
FIX_STALE = "sign the release again with a later --expires (and a certified, unexpired key)"
FIX_COVER = ("ship the bundle `make firmware` built, unchanged, with the manifest signed "
             "for its build/firmware.romfs; sign again after any rebuild")
FIX_REPL = ("use the production boot.py `make firmware` writes (build/firmware/boot.py: "
            "`os.dupterm(None, 1)` on an ESP32) and nothing that attaches a console again")
FIX_RP2 = ("build the RP2040 image with MICROPY_HW_ENABLE_UART_REPL=0 and without the USB "
           "REPL, then run `cityedge hw serial` on the board")


class RomfsError(ValueError):
    """Bytes that are not a readable ROMFS image."""


@dataclass(frozen=True)
class BundleFile:
    """One file of the bundle: its name in the bundle, size and SHA-256."""

    name: str
    size: int
    sha256: bytes


@dataclass(frozen=True)
class ImageCapture:
    """Everything the rules read about one bundle (``image_probe.capture`` fills it)."""

    source: str
    files: tuple[BundleFile, ...]
    boot_files: tuple[tuple[str, bytes], ...]  # (name, source) of every boot.py
    # name of a ROMFS image -> {path inside it: SHA-256}, or the reason it was not read
    romfs: dict[str, dict[str, bytes] | str] = field(default_factory=dict)
    scan: ScanResult = field(default_factory=ScanResult)


@dataclass(frozen=True)
class ReleaseInputs:
    """The release that vouches for the bundle, and what it is checked against."""

    manifest: bytes
    key_list: bytes
    roots: tuple[tuple[str, RootSet], ...]  # (where from, root set), tried in order
    now: int  # UNIX seconds the expiries are judged at
    min_sequence: int = 0  # the floor: the sequence must be above it
    hw_class: str | None = None


# --------------------------------------------------------------------------------------
# ROMFS


def _uint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for _ in range(10):  # 70 bits: more than any length in an image
        if pos >= end:
            raise RomfsError("a number runs past its record")
        b = data[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, pos
    raise RomfsError("a number longer than 10 bytes")


def _records(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(kind, start, end)`` of each record between ``pos`` and ``end``."""
    while pos < end:
        kind, pos = _uint(data, pos, end)
        size, pos = _uint(data, pos, end)
        if pos + size > end:
            raise RomfsError("a record runs past its directory")
        yield kind, pos, pos + size
        pos += size


def _name(data: bytes, pos: int, end: int) -> tuple[str, int]:
    n, pos = _uint(data, pos, end)
    if pos + n > end or n == 0:
        raise RomfsError("a name runs past its record")
    raw = data[pos:pos + n]
    if b"/" in raw or raw in (b".", b".."):
        raise RomfsError("a name with a slash or a dot entry")
    return raw.decode("ascii", "replace"), pos + n


def romfs_files(data: bytes, limits: HardwareLimits = LIMITS) -> dict[str, bytes]:
    """``{path: contents}`` of a ROMFS image (verbatim file data; what the writer of
    ``mpremote.romfs`` makes). ``RomfsError`` for anything else, or past the limits."""
    if not data.startswith(ROMFS_HEADER):
        raise RomfsError("no ROMFS header")
    size, pos = _uint(data, len(ROMFS_HEADER), len(data))
    if pos + size > len(data):
        raise RomfsError("the image is cut short")
    out: dict[str, bytes] = {}
    count = 0

    def walk(start: int, end: int, prefix: str, depth: int) -> None:
        nonlocal count
        if depth > limits.romfs_max_depth:
            raise RomfsError("more than %d directory levels" % limits.romfs_max_depth)
        for kind, a, b in _records(data, start, end):
            count += 1
            if count > limits.romfs_max_entries:
                raise RomfsError("more than %d entries" % limits.romfs_max_entries)
            if kind == 4:  # directory: name, then its records
                name, p = _name(data, a, b)
                walk(p, b, prefix + name + "/", depth + 1)
            elif kind == 5:  # file: name, then a verbatim data record
                name, p = _name(data, a, b)
                body = [(k, s, e) for k, s, e in _records(data, p, b) if k == 2]
                if len(body) != 1:
                    raise RomfsError("file %s%s has no verbatim data" % (prefix, name))
                out[prefix + name] = data[body[0][1]:body[0][2]]
            # 0 unused, 1 padding, 2 data at the top level, 3 data pointers: no file here

    walk(pos, pos + size, "", 0)
    return out


# --------------------------------------------------------------------------------------
# CE-UPD-03 and CE-UPD-04: the signed release


def _hexs(b: bytes) -> str:
    return b.hex()


def _covering(capture: ImageCapture, manifest: update_manifest.Manifest
              ) -> BundleFile | None:
    for f in capture.files:
        if f.size == manifest.size and f.sha256 == manifest.sha256:
            return f
    return None


def _in_romfs(name: str, inside: dict[str, bytes]) -> str | None:
    """The path of ``inside`` the bundle file ``name`` is (the longest that fits)."""
    best = None
    for path in inside:
        if (name == path or name.endswith("/" + path)) and (best is None
                                                             or len(path) > len(best)):
            best = path
    return best


def _coverage(capture: ImageCapture, artifact: BundleFile) -> tuple[list[Evidence],
                                                                    list[Evidence]]:
    """(problems, notes) about the bundle's files beside the signed artifact."""
    problems: list[Evidence] = []
    notes: list[Evidence] = []
    inside = capture.romfs.get(artifact.name)
    if isinstance(inside, str):
        problems.append(Evidence(artifact.name, "not readable as ROMFS", inside))
        return problems, notes
    for f in capture.files:
        if f is artifact or "!" in f.name:
            continue
        if f.name.endswith(CODE_SUFFIX):
            path = _in_romfs(f.name, inside) if inside is not None else None
            if path is None:
                problems.append(Evidence(f.name, "not in the signed image",
                                         "code that no signature covers"))
            elif inside is not None and inside[path] != f.sha256:
                problems.append(Evidence(f.name, "differs from %s in the signed image"
                                         % path, "SHA-256 %s" % _hexs(f.sha256)))
        elif not (inside is not None and _in_romfs(f.name, inside)):
            notes.append(Evidence(f.name, "outside the signed update",
                                  "flashed with the board image"))
    return problems, notes


def check_release(capture: ImageCapture, release: ReleaseInputs | None) -> list[Verdict]:
    """The CE-UPD-03 and CE-UPD-04 verdicts (rules in the module docstring)."""
    if release is None:
        why = "no signed manifest was given: the bundle alone cannot show who signed it"
        return [Verdict(REQ_SIGNED, CHECK_SIGNED, Outcome.UNDECIDED, why, fix=FIX_SUPPLY),
                Verdict(REQ_ROLLBACK, CHECK_SEQUENCE, Outcome.UNDECIDED, why,
                        fix=FIX_SUPPLY)]
    tried: list[Evidence] = []
    report = None
    for where, roots in release.roots:
        r = verify_release(roots, release.key_list, release.manifest, None, None,
                           release.hw_class, release.min_sequence, None, 0, release.now)
        if r.verdict is not None and r.verdict.manifest is not None:
            tried.append(Evidence("root set " + where, "verifies", r.lines[0]))
        else:
            tried.append(Evidence("root set " + where, r.reason, "; ".join(r.lines[-1:])))
        if report is None or (r.verdict is not None and r.verdict.manifest is not None):
            report = r
        if r.verdict is not None and r.verdict.manifest is not None:
            break
    if report is None:
        raise ValueError("ReleaseInputs.roots is empty")
    verdict = report.verdict
    m = verdict.manifest if verdict is not None else None
    if m is None or verdict is None:
        fail = Verdict(REQ_SIGNED, CHECK_SIGNED, Outcome.FAIL,
                       "the release does not verify: %s" % report.lines[-1],
                       tuple(tried), fix=FIX_SIGN)
        return [fail, Verdict(REQ_ROLLBACK, CHECK_SEQUENCE, Outcome.UNDECIDED,
                              "the manifest is not authentic, so its sequence proves "
                              "nothing", fix="fix the signature first (%s)" % CHECK_SIGNED)]
    facts = (Evidence("manifest", "%s %s, sequence %d" % (m.component, m.version,
                                                          m.sequence)),
             Evidence("manifest.sha256", _hexs(m.sha256), "%d bytes" % m.size),
             Evidence("release key", _hexs(verdict.kid), "list version %d"
                      % verdict.keys.version), *tried)
    return [_signed_verdict(capture, verdict, m, facts),
            _sequence_verdict(m, release.min_sequence)]


def _signed_verdict(capture: ImageCapture, verdict: update_manifest.Verdict,
                    m: update_manifest.Manifest, facts: tuple[Evidence, ...]) -> Verdict:
    if verdict.reason in _STALE:
        return Verdict(REQ_SIGNED, CHECK_SIGNED, Outcome.FAIL,
                       "devices refuse this release: %s (%s)" % (verdict.reason,
                                                                 verdict.detail),
                       facts, fix=FIX_STALE)
    if verdict.reason not in _SIGNED_OK:
        return Verdict(REQ_SIGNED, CHECK_SIGNED, Outcome.FAIL,
                       "devices refuse this release: %s (%s)" % (verdict.reason,
                                                                 verdict.detail),
                       facts, fix=FIX_SIGN)
    artifact = _covering(capture, m)
    if artifact is None:
        return Verdict(REQ_SIGNED, CHECK_SIGNED, Outcome.FAIL,
                       "no file of the bundle is the signed artifact (%d bytes, SHA-256 "
                       "%s): it was changed after signing, or the manifest is another "
                       "image's" % (m.size, _hexs(m.sha256)[:16]), facts, fix=FIX_COVER)
    problems, notes = _coverage(capture, artifact)
    covered = Evidence("artifact", artifact.name, "size and SHA-256 match the manifest")
    if problems:
        return Verdict(REQ_SIGNED, CHECK_SIGNED, Outcome.FAIL,
                       "%d module(s) of the bundle are not the signed image's"
                       % len(problems), (covered, *problems, *facts), fix=FIX_COVER)
    return Verdict(REQ_SIGNED, CHECK_SIGNED, Outcome.PASS,
                   "%s %s is signed by a certified release key and %s is its artifact"
                   % (m.component, m.version, artifact.name), (covered, *facts, *notes))


def _sequence_verdict(m: update_manifest.Manifest, floor: int) -> Verdict:
    ev = (Evidence("manifest.sequence", str(m.sequence)),
          Evidence("floor", str(floor), "--min-sequence" if floor else
                   "none given: any sequence from 1 is above it"))
    if m.sequence <= floor:
        word = update_manifest.REPLAY if m.sequence == floor else update_manifest.ROLLBACK
        return Verdict(REQ_ROLLBACK, CHECK_SEQUENCE, Outcome.FAIL,
                       "sequence %d is not above %d: devices refuse it (%s)"
                       % (m.sequence, floor, word), ev,
                       fix="sign again with --sequence above %d (docs/RELEASE_MANAGER.md)"
                       % floor)
    return Verdict(REQ_ROLLBACK, CHECK_SEQUENCE, Outcome.PASS,
                   "the signed sequence %d is above %d" % (m.sequence, floor), ev)


# --------------------------------------------------------------------------------------
# CE-DBG-03: the production boot.py


@dataclass(frozen=True)
class BootCalls:
    """What a boot.py does to the console at boot: REPL slots detached for sure, and
    the problems (attaches, WebREPL, detaches under conditions not evaluated)."""

    detached: frozenset[int]
    problems: tuple[str, ...]


def _platform_test(test: ast.expr, sys_platform: str) -> bool | None:
    """The value of a condition on ``sys.platform`` (or a constant); None if unknown."""
    if isinstance(test, ast.Constant):
        return bool(test.value)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _platform_test(test.operand, sys_platform)
        return None if inner is None else not inner
    if isinstance(test, ast.BoolOp):
        values = [_platform_test(v, sys_platform) for v in test.values]
        if isinstance(test.op, ast.And):
            return False if False in values else (None if None in values else True)
        return True if True in values else (None if None in values else False)
    if (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.left, ast.Attribute) and test.left.attr == "platform"
            and isinstance(test.left.value, ast.Name) and test.left.value.id == "sys"):
        right = test.comparators[0]
        try:
            value = ast.literal_eval(right)
        except ValueError:
            return None
        op = test.ops[0]
        if isinstance(op, ast.Eq | ast.NotEq) and isinstance(value, str):
            return (value == sys_platform) == isinstance(op, ast.Eq)
        if isinstance(op, ast.In | ast.NotIn) and isinstance(value, tuple | list | set):
            return (sys_platform in value) == isinstance(op, ast.In)
    return None


def _statements(body: Sequence[ast.stmt], sys_platform: str, certain: bool
                ) -> Iterator[tuple[ast.stmt, bool]]:
    """Each simple statement that runs at import, and whether it surely runs."""
    for node in body:
        if isinstance(node, ast.If):
            value = _platform_test(node.test, sys_platform)
            if value is None:
                yield from _statements(node.body, sys_platform, False)
                yield from _statements(node.orelse, sys_platform, False)
            else:
                yield from _statements(node.body if value else node.orelse, sys_platform,
                                       certain)
        elif isinstance(node, ast.Try):
            yield from _statements(node.body, sys_platform, certain)
            for h in node.handlers:
                yield from _statements(h.body, sys_platform, False)
            yield from _statements(node.orelse, sys_platform, False)
            yield from _statements(node.finalbody, sys_platform, certain)
        elif isinstance(node, ast.With):
            yield from _statements(node.body, sys_platform, certain)
        elif isinstance(node, ast.For | ast.While):
            yield from _statements(node.body, sys_platform, False)
            yield from _statements(node.orelse, sys_platform, False)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue  # a definition runs nothing at boot
        else:
            yield node, certain


def _dupterm_slot(call: ast.Call) -> int | None:
    if len(call.args) >= 2:
        try:
            slot = ast.literal_eval(call.args[1])
        except ValueError:
            return None
        return slot if isinstance(slot, int) else None
    for kw in call.keywords:
        if kw.arg == "index":
            try:
                v = ast.literal_eval(kw.value)
            except ValueError:
                return None
            return v if isinstance(v, int) else None
    return 0  # dupterm's default slot


def boot_calls(source: bytes, platform: str) -> BootCalls:
    """What ``source`` (a boot.py) does to the console on ``platform``; ``SyntaxError``
    (or ``ValueError`` for NUL bytes) when it does not parse."""
    tree = ast.parse(source, "boot.py")
    sys_platform = SYS_PLATFORM[platform]
    detached: set[int] = set()
    problems: list[str] = []
    for stmt, certain in _statements(tree.body, sys_platform, True):
        line = "line %d" % stmt.lineno
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            names = ([a.name for a in stmt.names] if isinstance(stmt, ast.Import)
                     else [stmt.module or ""])
            if any(n.split(".")[0] in ("webrepl", "webrepl_setup") for n in names):
                problems.append("%s imports WebREPL" % line)
        for node in ast.walk(stmt):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == "start" and isinstance(f, ast.Attribute) and \
                    isinstance(f.value, ast.Name) and f.value.id == "webrepl":
                problems.append("%s starts WebREPL" % line)
            if name != "dupterm":
                continue
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and first.value is None:
                slot = _dupterm_slot(node)
                if slot is None:
                    problems.append("%s detaches a REPL slot the rule cannot read" % line)
                elif certain:
                    detached.add(slot)
                else:
                    problems.append("%s detaches slot %d only under a condition"
                                    % (line, slot))
            else:
                problems.append("%s attaches a console stream (dupterm)" % line)
    return BootCalls(frozenset(detached), tuple(problems))


def production_boot() -> bytes:
    """The production boot.py ``make firmware`` writes (the rule's reference)."""
    return BOOT_PY.encode()


def check_boot(boot_files: Sequence[tuple[str, bytes]], platform: str,
               reference: bytes | None = None) -> Verdict:
    """The CE-DBG-03 verdict for a bundle's boot.py files (rules in the module
    docstring); ``reference``: the production boot.py (default ``production_boot()``)."""
    if platform not in SYS_PLATFORM:
        raise ValueError("platform must be one of %s" % ", ".join(SYS_PLATFORM))
    want = boot_calls(production_boot() if reference is None else reference,
                      platform).detached
    if not want:
        return Verdict(REQ_NO_CONSOLE, CHECK_REPL, Outcome.UNDECIDED,
                       "on %s boot.py cannot detach the REPL: the image's build decides"
                       % platform, fix=FIX_RP2)
    if not boot_files:
        return Verdict(REQ_NO_CONSOLE, CHECK_REPL, Outcome.FAIL,
                       "the bundle has no boot.py: the REPL stays on the UART",
                       (Evidence("boot.py", "absent"),), fix=FIX_REPL)
    failed: list[Evidence] = []
    passed: list[Evidence] = []
    for name, source in boot_files:
        if len(source) > LIMITS.boot_py_max_bytes:
            failed.append(Evidence(name, "%d bytes" % len(source), "larger than a boot.py "
                                   "the rule reads (%d bytes)" % LIMITS.boot_py_max_bytes))
            continue
        try:
            calls = boot_calls(source, platform)
        except (SyntaxError, ValueError) as e:
            failed.append(Evidence(name, "does not parse", str(e)[:120]))
            continue
        missing = sorted(want - calls.detached)
        if missing:
            failed.append(Evidence(name, "keeps the REPL on slot %s"
                                   % ", ".join(map(str, missing)),
                                   "no unconditional dupterm(None, %d)" % missing[0]))
        failed.extend(Evidence(name, p) for p in calls.problems)
        if not missing and not calls.problems:
            passed.append(Evidence(name, "detaches REPL slot %s"
                                   % ", ".join(map(str, sorted(calls.detached)))))
    if failed:
        return Verdict(REQ_NO_CONSOLE, CHECK_REPL, Outcome.FAIL,
                       "the image's boot.py keeps an interactive console",
                       tuple(failed), fix=FIX_REPL)
    return Verdict(REQ_NO_CONSOLE, CHECK_REPL, Outcome.PASS,
                   "boot.py detaches the REPL as the production boot.py does",
                   tuple(passed))


def check_image(capture: ImageCapture, release: ReleaseInputs | None,
                platform: str = "esp32") -> list[Verdict]:
    """Every verdict of the image probe: CE-UPD-03, CE-UPD-04, CE-AUTH-06, CE-DBG-03."""
    return [*check_release(capture, release), secrets_verdict(capture.scan),
            check_boot(capture.boot_files, platform)]
