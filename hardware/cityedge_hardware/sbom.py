"""A firmware's bill of materials: CycloneDX (JSON) or SPDX (JSON or tag-value), read by their
own libraries, and the CE-GOV-04 check that it lists what the firmware is built from.

``parse_sbom(data, source)`` takes the file's bytes (the caller bounds them, ``LIMITS``) and
returns its components as ``(name, version, purl)``; the format is told by the content, not
the file name: a JSON object with ``bomFormat: CycloneDX`` (``cyclonedx-python-lib``), one
with ``spdxVersion`` or a text starting ``SPDXVersion:`` (``spdx-tools``). Anything else, or
a file the library refuses, is ``EvidenceError`` naming the file.

``check_components(components, platform, firmware_version)`` is the rule, sans-IO:

1. Every component the platform's firmware is built from is listed, with a version
   (``REQUIRED``: MicroPython, the SDK under it, mbedTLS and the cityedge firmware on a
   microcontroller; cityedge, Python and OpenSSL on the gateway). Names are compared
   without case, ``_`` or spaces, and a purl's name counts too.
2. The cityedge component's version is the firmware version the declaration names (an
   SBOM of another release does not describe this one).

The first failure fails the requirement; each missing component is named.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cityedge_hardware.errors import EvidenceError
from cityedge_hardware.limits import LIMITS
from cityedge_hardware.verdict import Evidence, Outcome, Verdict

REQ_SBOM = "CE-GOV-04"
CHECK = "sbom"

# component -> the names it goes by (normalised: lower case, '-' for '_' and spaces)
_ALIASES: dict[str, frozenset[str]] = {
    "micropython": frozenset({"micropython"}),
    "esp-idf": frozenset({"esp-idf", "espidf"}),
    "pico-sdk": frozenset({"pico-sdk", "picosdk"}),
    "mbedtls": frozenset({"mbedtls", "mbed-tls"}),
    "cityedge-firmware": frozenset({"cityedge-firmware", "cityedge-fw"}),
    "cityedge": frozenset({"cityedge", "cityedge-gateway"}),
    "python": frozenset({"python", "cpython"}),
    "openssl": frozenset({"openssl"}),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "esp32": ("micropython", "esp-idf", "mbedtls", "cityedge-firmware"),
    "rp2040": ("micropython", "pico-sdk", "mbedtls", "cityedge-firmware"),
    "rpi-gateway": ("cityedge", "python", "openssl"),
}
_VERSION = re.compile(r"^v?\d+(\.\d+)*([.+-][0-9A-Za-z.+-]*)?$")
_PURL_NAME = re.compile(r"^pkg:[^/]+/(?:[^@?#]*/)?([^/@?#]+)")


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    purl: str = ""

    def names(self) -> set[str]:
        found = {_norm(self.name)}
        m = _PURL_NAME.match(self.purl)
        if m:
            found.add(_norm(m.group(1)))
        return found


@dataclass(frozen=True)
class Sbom:
    format: str  # "CycloneDX 1.6", "SPDX-2.3"
    components: tuple[Component, ...]


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _cyclonedx(doc: dict[str, Any], source: str) -> Sbom:
    from cyclonedx.model.bom import Bom  # imported when used: 0.6 s

    try:
        bom = Bom.from_json(doc)  # type: ignore[attr-defined]
    except Exception as e:  # the library raises many kinds for a bad file
        raise EvidenceError("%s: not a CycloneDX SBOM the library reads: %s"
                            % (source, str(e)[:200])) from e
    out: list[Component] = []
    pending = list(bom.components)
    if bom.metadata.component is not None:
        pending.append(bom.metadata.component)
    while pending:
        if len(out) >= LIMITS.sbom_max_components:
            raise EvidenceError("%s: more than %d components" % (source,
                                                                 LIMITS.sbom_max_components))
        c = pending.pop()
        out.append(Component(str(c.name), str(c.version or ""),
                             str(c.purl.to_string()) if c.purl else ""))
        pending.extend(c.components)
    return Sbom("CycloneDX %s" % doc.get("specVersion", "?"), tuple(out))


def _spdx_document(doc: Any) -> Sbom:
    out = [Component(str(p.name), str(p.version or ""),
                     next((str(r.locator) for r in p.external_references
                           if str(r.reference_type) == "purl"), ""))
           for p in doc.packages[:LIMITS.sbom_max_components + 1]]
    if len(out) > LIMITS.sbom_max_components:
        raise EvidenceError("an SPDX document with more than %d packages"
                            % LIMITS.sbom_max_components)
    return Sbom(str(doc.creation_info.spdx_version), tuple(out))


def _spdx_error(source: str, e: Exception) -> EvidenceError:
    messages = getattr(e, "messages", None) or [str(e)]
    return EvidenceError("%s: not an SPDX document the library reads: %s"
                         % (source, "; ".join(str(m) for m in messages[:3])[:300]))


def parse_sbom(data: bytes, source: str = "sbom") -> Sbom:
    """The components of a CycloneDX or SPDX file (see the module docstring)."""
    if len(data) > LIMITS.sbom_max_bytes:
        raise EvidenceError("%s: %d bytes, more than %d" % (source, len(data),
                                                            LIMITS.sbom_max_bytes))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvidenceError("%s: not UTF-8 text" % source) from e
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: nested past Python's stack
            raise EvidenceError("%s: not JSON: %s" % (source, str(e)[:200])) from e
        if isinstance(doc, dict) and doc.get("bomFormat") == "CycloneDX":
            return _cyclonedx(doc, source)
        if isinstance(doc, dict) and "spdxVersion" in doc:
            from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import (
                JsonLikeDictParser,
            )
            try:
                return _spdx_document(JsonLikeDictParser().parse(doc))  # type: ignore[no-untyped-call]
            except Exception as e:  # SPDXParsingError, and the model's own checks
                raise _spdx_error(source, e) from e
        raise EvidenceError("%s: a JSON file that is neither CycloneDX (bomFormat) nor SPDX "
                            "(spdxVersion)" % source)
    if text.lstrip().startswith("SPDXVersion:"):
        from spdx_tools.spdx.parser.tagvalue.parser import Parser

        try:
            return _spdx_document(Parser().parse(text))  # type: ignore[no-untyped-call]
        except Exception as e:  # as above
            raise _spdx_error(source, e) from e
    raise EvidenceError("%s: not an SBOM (CycloneDX JSON, SPDX JSON or SPDX tag-value)"
                        % source)


def check_components(sbom: Sbom, platform: str, firmware_version: str,
                     source: str = "sbom") -> Verdict:
    """CE-GOV-04: the SBOM lists the firmware's components (rules in the module docstring)."""
    found: dict[str, Component] = {}
    for c in sbom.components:
        for key, names in _ALIASES.items():
            if c.names() & names and key not in found:
                found[key] = c
    required = REQUIRED[platform]
    ev = tuple(Evidence("sbom %s" % key, "%s %s" % (found[key].name, found[key].version)
                        if key in found else "absent") for key in required)
    ev = (Evidence("sbom", "%s, %d components" % (sbom.format, len(sbom.components)),
                   source), *ev)
    missing = [k for k in required if k not in found]
    unversioned = [k for k in required if k in found
                   and not _VERSION.match(found[k].version.strip())]
    fix = ("generate the SBOM from the release build (it must list %s, each with its version)"
           % ", ".join(required))
    if missing:
        return Verdict(REQ_SBOM, CHECK, Outcome.FAIL, "the SBOM does not list %s"
                       % ", ".join(missing), ev, fix)
    if unversioned:
        return Verdict(REQ_SBOM, CHECK, Outcome.FAIL, "no version for %s in the SBOM"
                       % ", ".join(unversioned), ev, fix)
    own = "cityedge" if platform == "rpi-gateway" else "cityedge-firmware"
    if found[own].version.strip().lstrip("v") != firmware_version.strip().lstrip("v"):
        return Verdict(REQ_SBOM, CHECK, Outcome.FAIL,
                       "the SBOM is of %s %s, the declaration of firmware %s"
                       % (own, found[own].version, firmware_version), ev,
                       "give the SBOM of the release the declaration names")
    return Verdict(REQ_SBOM, CHECK, Outcome.PASS, "the SBOM lists %s with their versions"
                   % ", ".join(required), ev)
