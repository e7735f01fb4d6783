"""The batch verifier as CPython parts use it: the core's trust decision, C-backed decoding.

``make_batch_verifier`` returns ``cityedge_core.chain.BatchVerifier`` (the one place that
accepts or rejects a batch) with ``cbor2`` decoding both the COSE envelope and the payload
through ``cityedge.fastcbor``, which holds ``cbor2`` to the core decoder's rules. Signature
checks are OpenSSL's when the keyring holds ``cityedge.crypto.EcVerifier`` objects.
"""

from __future__ import annotations

from typing import Any

from cityedge import fastcbor
from cityedge_core.chain import BatchVerifier


def make_batch_verifier(keyring: Any, states: Any = None) -> BatchVerifier:
    return BatchVerifier(keyring, states, decode=fastcbor.loads_batch_payload,
                         envelope_decode=fastcbor.loads)
