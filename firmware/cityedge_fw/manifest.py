# The device firmware as a MicroPython package (micropython-lib's manifest format).
# `make firmware` builds from this file; the version is `cityedge_fw.VERSION`, the one
# firmware version string (the build refuses a manifest whose version differs).
metadata(description="cityedge device agent, provisioning and board support", version="0.1.0")
include("../cityedge_core")
package("cityedge_fw", base_path="..")
