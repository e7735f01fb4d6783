"""Every size, count and time limit of the wire formats, with its unit, in one place.

Decoders take their limits from here unless a caller passes tighter ones. The numbers are
chosen for the smallest board (64 KiB MicroPython heap): a batch must fit in RAM twice
(received bytes + decoded records) with room to spare.
"""

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x: int) -> int:
        return x


# CBOR decoding
CBOR_MAX_BYTES = const(65536)  # bytes: largest CBOR item we decode at all
CBOR_MAX_DEPTH = const(16)  # nesting levels of arrays/maps/tags
CBOR_MAX_ITEMS = const(4096)  # data items in one decode (all levels together)
CBOR_MAX_STRING = const(16384)  # bytes: longest byte or text string
CBOR_MAX_BIGNUM_BYTES = const(64)  # bytes: magnitude of a tag 2/3 bignum

# Reading batches
BATCH_MAX_BYTES = const(16384)  # bytes: a whole signed batch (COSE_Sign1) on the wire
BATCH_MAX_RECORDS = const(256)  # SenML records in one batch
DEVICE_ID_MAX_CHARS = const(128)  # characters of an RFC 9039 device URN; also of a
# SenML base name (bn) or name (n): a base name is often the device URN
SENML_NAME_MAX_CHARS = const(64)  # characters of a SenML unit (u, bu), and what a resolved
# name (bn + n) may have beyond DEVICE_ID_MAX_CHARS (the fleet's reading columns use both)
SENML_STRING_MAX_CHARS = const(256)  # characters of a SenML string value (vs)
SENML_INT_MAX = const(0x7FFFFFFFFFFFFFFF)  # largest SenML integer (signed 64 bits, as a
# database stores it); the smallest is -SENML_INT_MAX - 1. Floats must be finite.
KID_MAX_BYTES = const(64)  # bytes: a COSE key id

# Provisioning frames on the UART
FRAME_MAX_BODY_BYTES = const(8192)  # bytes: an install message (chain, CA, broker, config,
# all DER) is about 3 KiB; 8 KiB leaves room and still fits a 64 KiB heap twice

# Fleet commands and the results devices send back (``command``, ``command_decode``)
COMMAND_MAX_BYTES = const(4096)  # bytes: a whole signed command (what a device decodes)
COMMAND_NAME_MAX_CHARS = const(32)  # characters of a command name (a-z 0-9 - _ .)
COMMAND_ARGS_MAX_BYTES = const(2048)  # bytes: a command's arguments, CBOR-encoded (so the
# command, with its name, a device URN, seq and expiry, stays under COMMAND_MAX_BYTES)
COMMAND_ARGS_MAX_DEPTH = const(8)  # nesting levels of a command's arguments
RESULT_MAX_BYTES = const(4096)  # bytes: a whole signed result
RESULT_DETAIL_MAX_CHARS = const(256)  # characters of a result's detail (the encoder cuts)
RESULT_DATA_MAX_BYTES = const(2048)  # bytes: a result's data, CBOR-encoded
RESULT_MAX_ITEMS = const(256)  # data items in a result's payload (all levels together)
RESULT_MAX_DEPTH = const(8)  # nesting levels of a result's payload
# a command's seq is at most SEQ_MAX, as a batch's

# Device key rotation (``rotation``, ``rotation_decode``)
CSR_MAX_BYTES = const(1024)  # bytes: a PKCS#10 request (P-256, CN and SAN of a 128-character
# URN: about 560)
ROTATION_PROOF_MAX_BYTES = const(512)  # bytes: the proof's COSE_Sign1 (about 200)
CSR_MESSAGE_MAX_BYTES = const(1600)  # bytes: the whole up/csr message {1: csr, 2: proof}
CERT_MAX_BYTES = const(1536)  # bytes: a device certificate (DER) in install-cert (about
# 700 for a 128-character URN; fits COMMAND_ARGS_MAX_BYTES with the rest of the args)
ROTATION_ID_MAX = const(0x7FFFFFFF)  # largest rotation id (the fleet's row id, 31 bits)

# Chain verification
CHAIN_RECENT_HASHES = const(64)  # batches whose hashes are kept to recognise duplicates
CHAIN_MAX_PENDING_GAPS = const(1024)  # missing sequence numbers tracked for late arrival
SEQ_MAX = const(0xFFFFFFFFFFFF)  # largest sequence number (48 bits; decades at 1/s)
