"""Find and load the public test vectors (``../shared/vectors`` beside the repository).

Plain Python that MicroPython runs too. ``CITYEDGE_VECTORS`` overrides the location.
"""

import json
import os

try:
    _ROOT = os.environ.get("CITYEDGE_VECTORS")  # CPython
except AttributeError:
    _ROOT = os.getenv("CITYEDGE_VECTORS")  # MicroPython unix port


def vectors_dir():
    if _ROOT:
        return _ROOT
    here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    return here + "/../../../shared/vectors"


def load_json(rel):
    with open(vectors_dir() + "/" + rel) as f:
        return json.load(f)


def unhex(s):
    import binascii

    return binascii.unhexlify(s)


def b64url(s):
    import binascii

    s = s + "=" * (-len(s) % 4)
    return binascii.a2b_base64(s.replace("-", "+").replace("_", "/"))
