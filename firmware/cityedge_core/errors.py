"""One exception family for the core, split by who is at fault.

``PeerError``: the bytes we were given are bad (malformed, over a limit, forged, replayed);
the sender or its data is at fault, and retrying the same input will fail the same way.
``LocalError``: something on our side failed (storage, transport, a missing key); the input
may be fine. Misuse of an API by our own code is ``ValueError``/``TypeError`` as usual.
"""


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
