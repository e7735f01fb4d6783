"""Fleet commands and the results devices send back: the one home of both formats.

A **command** goes from the fleet to one device on ``ce/v1/<device>/down/cmd`` (QoS 1). It
is a COSE_Sign1 (ES256) by a fleet command key the device trusts, in exactly the form
``cose.encode_sign1`` writes (the device reads it with ``cose.split_sign1``), at most
``limits.COMMAND_MAX_BYTES``, whose payload is a CBOR map:

=====  ========  ==============================================================
key    name      value
=====  ========  ==============================================================
1      name      command name: 1..``COMMAND_NAME_MAX_CHARS`` of ``a-z 0-9 - _ .``,
                 starting with a letter (``check_name``); ``"desired"`` on down/desired
2      target    the device URN the command is for (exactly that device)
3      seq       per-device sequence number, strictly increasing, at most ``SEQ_MAX``
4      expires   UNIX seconds after which the command is void
5      args      arguments (any CBOR, at most ``COMMAND_ARGS_MAX_BYTES``); absent: none
=====  ========  ==============================================================

The device's gate (``cityedge_core.command_gate.CommandGate``) checks it; it keeps its own
private ``const()`` copies of these keys (free on a device's heap), and a shared test
holds them equal to these on both interpreters.

A **result** goes from the device back on ``ce/v1/<device>/up/result``: a COSE_Sign1
(ES256) by the device's *own* key (the one its certificate holds), at most
``limits.RESULT_MAX_BYTES``, whose payload is a CBOR map:

=====  ========  ==============================================================
key    name      value
=====  ========  ==============================================================
1      name      the command's name
2      device    the answering device's URN (= the key's device, = the topic's)
3      seq       the command's seq
4      outcome   ``"ok"``, ``"refused"`` (with the reason) or ``"failed"`` (the error)
5      detail    text, at most ``RESULT_DETAIL_MAX_CHARS`` (``encode_result`` cuts it)
6      data      optional, any CBOR, at most ``RESULT_DATA_MAX_BYTES`` encoded
=====  ========  ==============================================================

Keys 7-63 are reserved; a receiver keeps unknown keys (``Result.extra``), so firmware N and
fleet N+1 can talk. The decoder (receivers only: the fleet) is ``command_decode``; a
device that answers loads only this module.
"""

try:
    from typing import Any
except ImportError:  # MicroPython: annotations are not evaluated
    pass

from . import cbor, cose, limits
from .errors import LimitError, MalformedError

# command payload keys
C_NAME = 1
C_TARGET = 2
C_SEQ = 3
C_EXPIRES = 4
C_ARGS = 5

# result payload keys
R_NAME = 1
R_DEVICE = 2
R_SEQ = 3
R_OUTCOME = 4
R_DETAIL = 5
R_DATA = 6

OK = "ok"
REFUSED = "refused"
FAILED = "failed"
OUTCOMES = (OK, REFUSED, FAILED)

_NAME_FIRST = "abcdefghijklmnopqrstuvwxyz"
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."


def check_name(name: Any) -> str:
    """A command name: 1..``COMMAND_NAME_MAX_CHARS`` of ``a-z 0-9 - _ .``, starting with a
    letter (so it is one word in a log line, a URL and a table). MalformedError if not."""
    if not isinstance(name, str) or not name:
        raise MalformedError("command: the name must be non-empty text")
    if len(name) > limits.COMMAND_NAME_MAX_CHARS:
        raise LimitError("command: a name has at most %d characters"
                         % limits.COMMAND_NAME_MAX_CHARS)
    if name[0] not in _NAME_FIRST or name.strip(_NAME_CHARS):
        raise MalformedError("command: a name is a-z 0-9 - _ . starting with a letter")
    return name


def encode_command(signer: Any, kid: bytes, name: str, target: str, seq: int, expires: int,
                   args: Any = None) -> bytes:
    """Sign a command (the fleet's side; tests sign hostile ones with it too, so it checks
    nothing: the fleet checks name, args and limits before it signs)."""
    body = {C_NAME: name, C_TARGET: target, C_SEQ: seq, C_EXPIRES: expires}
    if args is not None:
        body[C_ARGS] = args
    return cose.encode_sign1(cbor.dumps(body), signer, kid)


def encode_result(signer: Any, kid: bytes, name: str, device: str, seq: int, outcome: str,
                  detail: str = "", data: Any = None) -> bytes:
    """Sign the result of command ``seq`` with the device's key.

    ``detail`` is cut to ``RESULT_DETAIL_MAX_CHARS`` (an error message may be any length;
    the fleet refuses a longer one); ``data`` (None: none) must encode to at most
    ``RESULT_DATA_MAX_BYTES`` (ValueError otherwise: the caller chooses what to report).
    """
    if outcome not in OUTCOMES:
        raise ValueError("result: outcome must be one of ok, refused, failed")
    if not isinstance(detail, str):
        raise ValueError("result: detail must be text")
    body = {R_NAME: name, R_DEVICE: device, R_SEQ: seq, R_OUTCOME: outcome,
            R_DETAIL: detail[:limits.RESULT_DETAIL_MAX_CHARS]}
    if data is not None:
        if len(cbor.dumps(data)) > limits.RESULT_DATA_MAX_BYTES:
            raise ValueError("result: data over %d bytes" % limits.RESULT_DATA_MAX_BYTES)
        body[R_DATA] = data
    return cose.encode_sign1(cbor.dumps(body), signer, kid)
