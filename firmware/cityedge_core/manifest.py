# The shared sans-IO core as a MicroPython package (micropython-lib's manifest format).
# `make firmware` builds from this file; the version is `cityedge_core.VERSION` (the build
# refuses a manifest whose version differs).
metadata(
    description="cityedge core: CBOR, SenML, COSE_Sign1 ES256, P-256, batches, frames",
    version="0.1.0",
)
package("cityedge_core", base_path="..")
