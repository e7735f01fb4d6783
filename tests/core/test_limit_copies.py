"""The device-path modules' private copies of ``limits`` are the core's limits.

``cbor``, ``cose``, ``cose_decode``, ``batch`` and ``cbor_decode`` keep the limits they
check as private ``const()``s so that a device never loads ``limits`` (every name of a
loaded module is interned for good: docs/ARCHITECTURE.md, "Memory on the device").
``limits`` stays the one home of every number; this test fails when a copy drifts from it.
"""

from __future__ import annotations

import pytest

from cityedge_core import batch, cbor, cbor_decode, cose, cose_decode, limits

COPIES = [
    (cbor, "CBOR_MAX_DEPTH"),
    (cose, "BATCH_MAX_BYTES"),
    (cose, "KID_MAX_BYTES"),
    (cose_decode, "BATCH_MAX_BYTES"),
    (cose_decode, "KID_MAX_BYTES"),
    (batch, "BATCH_MAX_BYTES"),
    (batch, "BATCH_MAX_RECORDS"),
    (batch, "DEVICE_ID_MAX_CHARS"),
    (cbor_decode, "CBOR_MAX_BYTES"),
    (cbor_decode, "CBOR_MAX_DEPTH"),
    (cbor_decode, "CBOR_MAX_ITEMS"),
    (cbor_decode, "CBOR_MAX_STRING"),
    (cbor_decode, "CBOR_MAX_BIGNUM_BYTES"),
]


@pytest.mark.parametrize(("module", "name"), COPIES,
                         ids=["%s.%s" % (m.__name__.rpartition(".")[2], n) for m, n in COPIES])
def test_a_private_copy_equals_the_core_limit(module: object, name: str) -> None:
    assert getattr(module, "_" + name) == getattr(limits, name)


def test_the_device_path_modules_do_not_import_limits() -> None:
    """A copy is the only way these modules see a limit (no second, stale import)."""
    for module in (cbor, cose, cose_decode, batch, cbor_decode):
        assert not hasattr(module, "limits"), module.__name__
