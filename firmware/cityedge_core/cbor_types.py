"""The CBOR values that have no Python type of their own: tags, simple values, undefined.

Kept apart from the encoder (``cbor``) so a device, which never encodes or decodes them,
does not carry their classes; ``cbor`` re-exports them on CPython, and the decoder and
the encoder's fallback load this module when they meet one.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass


class Tag:
    """A tagged data item (major type 6) other than a bignum."""

    def __init__(self, tag: int, value: Any) -> None:
        if not isinstance(tag, int) or tag < 0 or tag > 0xFFFFFFFFFFFFFFFF:
            raise ValueError("CBOR tag number must be an unsigned 64-bit int")
        self.tag = tag
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __hash__(self) -> int:
        return hash((self.tag, repr(self.value)))

    def __repr__(self) -> str:
        return "Tag(%d, %r)" % (self.tag, self.value)


class Simple:
    """A simple value (major type 7) other than false/true/null/undefined."""

    def __init__(self, value: int) -> None:
        if not isinstance(value, int) or not (0 <= value <= 19 or 32 <= value <= 255):
            raise ValueError("CBOR simple value must be 0..19 or 32..255")
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Simple) and self.value == other.value

    def __hash__(self) -> int:
        return hash(("simple", self.value))

    def __repr__(self) -> str:
        return "simple(%d)" % self.value


class _Undefined:
    def __repr__(self) -> str:
        return "undefined"


UNDEFINED = _Undefined()
