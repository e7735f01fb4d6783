"""The batch verifier as CPython parts use it: the core's trust decision, C-backed decoding.

``make_batch_verifier`` returns ``cityedge_core.chain.BatchVerifier`` (the one place that
accepts or rejects a batch) with two CPython readers that the differential tests hold to
the core's: ``cityedge_host.fastcbor.decode_sign1`` reads the COSE envelope cityedge devices
send straight from its bytes (Sig_structure sliced, not rebuilt; anything else goes to the
core's decoder) and ``fastcbor.loads_batch_payload`` decodes the signed payload with
``cbor2``. Signature checks are OpenSSL's when the keyring holds
``cityedge_host.crypto.EcVerifier`` objects. Per 50-reading batch on CPython 3.11, about
45 us of the path is the ES256 verify itself and about 26 us everything else (payload
decode ~10, batch and SenML checks ~12, envelope ~1.7, hash and chain ~1.5):
``bench.core.cpython_verify_stages``.
"""

from __future__ import annotations

from typing import Any

from cityedge_core.chain import BatchVerifier
from cityedge_host import fastcbor


def make_batch_verifier(keyring: Any, states: Any = None) -> BatchVerifier:
    return BatchVerifier(keyring, states, decode=fastcbor.loads_batch_payload,
                         sign1_decode=fastcbor.decode_sign1)
