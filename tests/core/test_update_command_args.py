"""The ``update`` command's arguments (``update_manifest.update_args``) and the check that a
fetched manifest is the one the command named."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityedge_core import update_manifest as um
from cityedge_core.errors import LimitError, MalformedError

DIGEST = bytes(range(32))


def test_good_arguments_come_back_as_url_and_digest() -> None:
    url = "https://fleet.example/ota/releases/ab12/"
    assert um.update_args({um.A_URL: url, um.A_MANIFEST_SHA256: DIGEST}) == (url, DIGEST)


@pytest.mark.parametrize("args, error", [
    ([1, 2], MalformedError),
    ({um.A_MANIFEST_SHA256: DIGEST}, MalformedError),
    ({um.A_URL: "http://fleet/ota/", um.A_MANIFEST_SHA256: DIGEST}, MalformedError),
    ({um.A_URL: "https://", um.A_MANIFEST_SHA256: DIGEST}, MalformedError),
    ({um.A_URL: "https://fleet/a b", um.A_MANIFEST_SHA256: DIGEST}, MalformedError),
    ({um.A_URL: "https://fleet/\x00", um.A_MANIFEST_SHA256: DIGEST}, MalformedError),
    ({um.A_URL: "https://" + "a" * um.URL_MAX_CHARS, um.A_MANIFEST_SHA256: DIGEST},
     LimitError),
    ({um.A_URL: "https://fleet/", um.A_MANIFEST_SHA256: DIGEST[:31]}, MalformedError),
    ({um.A_URL: "https://fleet/", um.A_MANIFEST_SHA256: "x" * 32}, MalformedError),
])
def test_bad_arguments_are_refused_with_their_reason(args: object, error: type) -> None:
    with pytest.raises(error):
        um.update_args(args)


@given(st.dictionaries(st.integers(0, 4), st.one_of(st.text(max_size=300),
                                                     st.binary(max_size=40), st.integers())))
def test_any_map_is_either_accepted_whole_or_refused_as_a_peer_error(args: dict) -> None:
    try:
        url, digest = um.update_args(args)
    except MalformedError:
        return
    assert url.startswith("https://") and len(url) <= um.URL_MAX_CHARS
    assert all(" " < ch <= "~" for ch in url)
    assert isinstance(digest, bytes) and len(digest) == 32


def test_a_swapped_manifest_is_refused() -> None:
    manifest = b"\xd2\x84signed manifest bytes"
    um.check_manifest_digest(manifest, hashlib.sha256(manifest).digest())
    with pytest.raises(um.Refused) as e:
        um.check_manifest_digest(manifest + b"x", hashlib.sha256(manifest).digest())
    assert e.value.reason == um.MANIFEST_DIGEST
