"""Collect the interpreter-neutral core tests under pytest (they also run on MicroPython)."""

from shared.test_cbor_shared import *  # noqa: F403
from shared.test_cose_batch_shared import *  # noqa: F403
from shared.test_p256_shared import *  # noqa: F403
from shared.test_senml_shared import *  # noqa: F403
