"""``cityedge ca import-to-token``: move the signing intermediate's key from its file into a
PKCS#11 token (``ca_custody``), so the fleet server no longer holds it in a file.

The steps, in an order that leaves a CA that signs after a crash at any point:

1. The key is read from its file (decrypted with the passphrase file when encrypted) and
   checked against its certificate (``CertificateAuthority``).
2. A CA directory in the first layout (``intermediate.key`` without ``current``) first
   gets ``intermediates/<id>.crt``.
3. The key is created in the token: ``CKA_SENSITIVE``, not ``CKA_EXTRACTABLE``, sign
   only, ``CKA_ID`` = the intermediate's id, ``CKA_LABEL`` = the key label. The CA is
   loaded through the token and must sign a probe that verifies with the certificate.
4. ``intermediates/<id>.token`` records it and ``current`` names the intermediate; the key
   file is overwritten with random bytes and removed (a key file beside the marker would
   still be used first: it goes last).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cityedge_fleet.ca import (
    CURRENT_FILE,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    INTERMEDIATES_DIR,
    CaError,
    CertificateAuthority,
    _cert_pem,
    read_current,
    write_token_marker,
)
from cityedge_fleet.ca_custody import Custody, TokenKey, import_to_token, shred
from cityedge_host.files import write_atomic


def move_to_token(ca_dir: Path, custody: Custody) -> str:
    """The steps in the module docstring; returns the intermediate's id."""
    token = custody.token
    if token is None:
        raise CaError("no PKCS#11 token given")
    files = dataclasses.replace(custody, token=None)
    ca = CertificateAuthority(ca_dir, files)  # 1
    if isinstance(ca.signer.key, TokenKey):
        raise CaError("intermediate %s is already held in a token" % ca.id)
    first_layout = read_current(ca_dir) is None
    folder = ca_dir / INTERMEDIATES_DIR
    if first_layout:  # 2
        folder.mkdir(mode=0o755, exist_ok=True)
        write_atomic(folder / (ca.id + ".crt"), _cert_pem(ca.cert), 0o644)
    import_to_token(token, ca.signer.key, bytes.fromhex(ca.id))  # 3
    key_file = ca_dir / INTERMEDIATE_KEY if first_layout else folder / (ca.id + ".key")
    write_token_marker(ca_dir, ca.id, ca.cert, token)  # 4
    shred(key_file)
    if first_layout:
        (ca_dir / INTERMEDIATE_CERT).unlink(missing_ok=True)
    loaded = CertificateAuthority(ca_dir, custody)
    if not isinstance(loaded.signer.key, TokenKey) or loaded.id != ca.id:
        raise CaError("%s does not sign through the token after the move" % ca_dir)
    assert (ca_dir / CURRENT_FILE).exists()
    return ca.id
