"""An eFuse capture as the rules read it: each field's raw bits, and whether software can see them.

Input is what ``espefuse summary --format json`` writes (esptool 5.x): a JSON object keyed by
field name, each value with ``raw_value`` (hex string, esptool >= 5.3), ``readable``,
``writeable``, ``bit_len`` and a display ``value``. The rules decide on ``raw_value`` only:
``value`` is a rendering whose sense differs from field to field (``SPI_BOOT_CRYPT_CNT`` raw
``0x1`` shows ``"Enable"``, ``DIS_USB_SERIAL_JTAG_ROM_PRINT`` raw ``0x1`` shows
``"Disable"``), so a rule written against it would read some fields backwards.

A read-protected field reads back as zeros (``raw_value`` all ``0``, ``value`` ``"?? ??"``,
``readable: false``): ``Fuse.raw`` is ``None`` for it, never ``0``, so no rule can mistake a
hidden key for an empty block. ``writeable`` is whether the field's write-protect bit
(``WR_DIS``) is still clear; a capture without it (edited by hand, or from another tool)
gets ``Fuse.writeable = None``, and the rules that need it cannot decide. Keys the rules
don't use are kept as they came (``Fuse.shown``) for the report. Every size is bounded
(``limits.LIMITS``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cityedge_hardware.errors import EfuseDataError
from cityedge_hardware.limits import LIMITS

_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_HEX = re.compile(r"0x[0-9a-fA-F]+")


class _FieldRecord(BaseModel):
    """One entry of the capture, as espefuse writes it (other keys are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    raw_value: str = Field(max_length=2 + LIMITS.efuse_max_bits // 4)
    readable: bool
    writeable: bool | None = None  # absent: the rules that need it cannot decide
    bit_len: int = Field(ge=1, le=LIMITS.efuse_max_bits)
    value: Any = None


@dataclass(frozen=True)
class Fuse:
    """One eFuse field: ``raw`` is its bits as an int, ``None`` when read-protected;
    ``writeable`` is ``None`` when the capture does not say."""

    name: str
    raw: int | None
    readable: bool
    writeable: bool | None
    bit_len: int
    raw_text: str  # raw_value as captured, for the report

    @property
    def shown(self) -> str:
        """The raw value as a report shows it: hex, or ``hidden`` when read-protected."""
        return self.raw_text if self.readable else "hidden (read-protected)"


@dataclass(frozen=True)
class EfuseSummary:
    """All fields of one capture, by name."""

    fuses: dict[str, Fuse]

    def get(self, name: str) -> Fuse | None:
        return self.fuses.get(name)

    def has(self, *names: str) -> bool:
        return all(n in self.fuses for n in names)


def parse_summary(data: bytes | str, *, source: str = "capture") -> EfuseSummary:
    """Parse ``espefuse summary --format json`` output; ``EfuseDataError`` names what is wrong."""
    if len(data) > LIMITS.efuse_json_max_bytes:
        raise EfuseDataError("%s: %d bytes, more than the %d an eFuse summary can be"
                             % (source, len(data), LIMITS.efuse_json_max_bytes))
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise EfuseDataError("%s: not JSON (%s)" % (source, e)) from e
    except RecursionError as e:  # nested deeper than the parser's stack: no summary is
        raise EfuseDataError("%s: JSON nested too deep to be an eFuse summary" % source) from e
    if not isinstance(doc, dict) or not doc:
        raise EfuseDataError("%s: not an eFuse summary (expected a JSON object of fields)"
                             % source)
    if len(doc) > LIMITS.efuse_max_fields:
        raise EfuseDataError("%s: %d fields, more than %d" % (source, len(doc),
                                                              LIMITS.efuse_max_fields))
    fuses: dict[str, Fuse] = {}
    for name, entry in doc.items():
        if len(name) > LIMITS.efuse_name_max_chars or not _NAME.fullmatch(name):
            raise EfuseDataError("%s: field name %r is not an eFuse name" % (source, name[:80]))
        try:
            rec = _FieldRecord.model_validate(entry)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            raise EfuseDataError("%s: field %s: %s: %s" % (source, name, where, first["msg"]),
                                 hint="esptool older than 5.3 writes no raw_value: capture "
                                 "again with the esptool version cityedge installs") from e
        if not _HEX.fullmatch(rec.raw_value):
            raise EfuseDataError("%s: field %s: raw_value %r is not hex"
                                 % (source, name, rec.raw_value[:40]))
        raw = int(rec.raw_value, 16)
        if raw >> rec.bit_len:
            raise EfuseDataError("%s: field %s: raw_value %s has more than its %d bits"
                                 % (source, name, rec.raw_value[:40], rec.bit_len))
        fuses[name] = Fuse(name=name, raw=raw if rec.readable else None,
                           readable=rec.readable, writeable=rec.writeable,
                           bit_len=rec.bit_len, raw_text=rec.raw_value)
    return EfuseSummary(fuses=fuses)
