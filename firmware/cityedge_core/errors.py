"""One exception family for the core, split by who is at fault.

``PeerError``: the bytes we were given are bad (malformed, over a limit, forged, replayed);
the sender or its data is at fault, and retrying the same input will fail the same way.
``LocalError``: something on our side failed (storage, transport, a missing key); the input
may be fine. Misuse of an API by our own code is ``ValueError``/``TypeError`` as usual.
"""


try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass


def text(data: str, key: int, args: Any = None) -> str:
    """Message ``key`` (from 0) of ``data``, messages separated by "|", formatted with
    ``args`` when given. A device module keeps the messages it raises as one string
    constant: from flash each string constant over 10 characters is an object of its own
    on the heap for as long as its module is loaded, and one is one; a message is cut out
    only when raised (docs/ARCHITECTURE.md, "Memory on the device"). ``text``, ``data``,
    ``key`` and ``args`` are names the interpreter has: no new interned name."""
    start = 0
    while key:
        start = data.index("|", start) + 1
        key -= 1
    key = data.find("|", start)
    data = data[start:key] if key >= 0 else data[start:]
    return data if args is None else data % args


# The family as class statements everywhere but on MicroPython. There a ``class`` statement
# gives each class a namespace dict of its own (with ``__module__`` and ``__qualname__``),
# and the device keeps all nine classes resident: there the same classes (names, bases,
# behaviour) are made by ``type`` sharing one empty namespace, and no class statement runs
# (a first copy made and dropped at import once cut up the heap: docs/ARCHITECTURE.md,
# "Memory on the device"). None of them has an attribute of its own (one set on a class
# would show on all nine; nothing sets any, and a subclass defined elsewhere gets its own
# as usual).
if __import__("sys").implementation.name != "micropython":

    class CityedgeError(Exception):
        """Base of every error the core raises on purpose."""


    class PeerError(CityedgeError):
        """The peer or its data is at fault."""


    class MalformedError(PeerError):
        """Input is not well-formed for its format (CBOR, COSE, SenML, batch, frame)."""


    class LimitError(MalformedError):
        """Input is well-formed so far but exceeds a limit from ``limits``."""


    class SignatureError(PeerError):
        """A signature does not verify, or a key is invalid (point not on the curve)."""


    class UnknownKeyError(PeerError):
        """The message names a key we do not know or no longer trust."""


    class LocalError(CityedgeError):
        """Our side failed: storage, transport, configuration."""


    class TransportError(LocalError):
        """The link to a peer failed (serial, MQTT, HTTP)."""


    class StorageError(LocalError):
        """Persistent storage failed (flash full, write torn, database locked)."""
else:

    def _family(data: dict[str, object], key: str) -> None:
        """Each class ``key`` lists ("Name:Base", the base made before it) as ``type``
        makes it, in this module, sharing the namespace ``data`` (argument names the
        interpreter has already: no new interned name)."""
        g = globals()
        for name in key.split():
            name, base = name.split(":")
            g[name] = type(name, (g.get(base, Exception),), data)

    _family({}, "CityedgeError:Exception PeerError:CityedgeError MalformedError:PeerError"
            " LimitError:MalformedError SignatureError:PeerError UnknownKeyError:PeerError"
            " LocalError:CityedgeError TransportError:LocalError StorageError:LocalError")
    del _family
