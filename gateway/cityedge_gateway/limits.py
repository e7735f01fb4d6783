"""Every size, count and time limit of the gateway agent, with its unit, in one place.

Wire-format limits (batch size, records per batch) live in ``cityedge_core.limits``; these
are the agent's own: serial framing, buffering, batching and forwarding. Config values are
checked against the ranges here (``config``), so a typo cannot set a 0-byte disk budget.
"""

from __future__ import annotations

# Serial inputs
SERIAL_READ_BYTES = 4096  # bytes: largest single read from a serial port
SERIAL_BUFFER_MAX_BYTES = 1024  # bytes: parser buffer; more without a frame is garbage
SERIAL_REOPEN_MIN_S = 0.5  # seconds: first wait before reopening an unplugged port
SERIAL_REOPEN_MAX_S = 30.0  # seconds: longest wait between reopen attempts
BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)  # accepted bauds

# Modbus RTU (master side)
MODBUS_RESPONSE_TIMEOUT_S = 1.0  # seconds: a slave's answer must start within this
# (the request's and the answer's time on the wire at the port's baud come on top)
MODBUS_TIMEOUT_RANGE_S = (0.05, 10.0)  # seconds: timeout_s accepted in config
MODBUS_MAX_REGISTERS = 125  # registers per read request, function 3 or 4 (spec limit)
MODBUS_POLL_MIN_S = 0.1  # seconds: shortest poll interval allowed in config
MODBUS_SLAVES_MAX = 32  # slaves on one port (RS-485: 32 unit loads without a repeater)
MODBUS_VALUES_MAX = 64  # register entries (values) per slave

# Batching own readings
BATCH_READINGS_DEFAULT = 50  # readings per signed batch
BATCH_READINGS_MAX = 256  # = cityedge_core.limits.BATCH_MAX_RECORDS
BATCH_MAX_AGE_DEFAULT_S = 10.0  # seconds: a partial batch is signed after this long
BATCH_MAX_AGE_MAX_S = 3600.0  # seconds

# Store-and-forward
STORE_BUDGET_MIN_BYTES = 64 * 1024  # bytes: smallest disk budget accepted
STORE_BUDGET_DEFAULT_BYTES = 2 * 1024**3  # bytes: a day of a 200-sensor site, with room
STORE_ROW_OVERHEAD_BYTES = 64  # bytes: SQLite row + index cost counted per batch
STORE_COMMIT_MAX_BATCHES = 512  # batches grouped into one durable transaction

# Forwarding
MQTT_INFLIGHT_MAX = 256  # QoS 1 publishes awaiting PUBACK
MQTT_KEEPALIVE_S = 30  # seconds
MQTT_BACKOFF_MIN_S = 0.5  # seconds: first reconnect wait (jittered)
MQTT_BACKOFF_MAX_S = 60.0  # seconds: longest reconnect wait

# Fleet commands
FLEET_KEYS_MAX = 4  # fleet command keys trusted at once (a key rollover overlaps two)

# Node relay
NODES_MAX = 1024  # downstream nodes one gateway relays

# Service loop
COMMIT_INTERVAL_S = 0.02  # seconds: ready batches are signed and committed together this often
TASK_RESTART_MIN_S = 0.5  # seconds: first wait before a failed task starts again (jittered)
TASK_RESTART_MAX_S = 60.0  # seconds: longest wait between restarts of a failing task
TASK_STABLE_S = 60.0  # seconds a task must run before its restart wait starts over
TASK_STOP_GRACE_S = 5.0  # seconds a cancelled task gets to finish (a broker that never
# answers DISCONNECT keeps aiomqtt waiting); then it is cancelled once more, then left
STATUS_INTERVAL_S = 60.0  # seconds: between signed status messages

# Updates (``ota_*``): the release artifact, its download, its unpacking and the trial
OTA_ARTIFACT_MAX_BYTES = 512 * 1024**2  # bytes: largest artifact a release may name
OTA_VERSION_MAX_CHARS = 64  # characters of a version (it names a directory)
OTA_CONNECT_TIMEOUT_S = 10.0  # seconds: TCP + TLS handshake of one request
OTA_READ_TIMEOUT_S = 30.0  # seconds: longest wait for the next bytes of a response
OTA_DOWNLOAD_DEADLINE_S = 3600.0  # seconds: one download call, all its requests
OTA_MIN_RATE_BYTES_S = 1024  # bytes per second, averaged over each rate window
OTA_RATE_WINDOW_S = 60.0  # seconds: the window the minimum rate is judged over
OTA_SYNC_EVERY_BYTES = 1024**2  # bytes: fsync + progress record this often
OTA_REQUESTS_MAX = 64  # requests in one download call, retries included
# retries of a download (``ota_download``): a failed request (a cut link, a stall, a 5xx,
# a 429) is tried again after a jittered, doubling wait, resuming with Range
OTA_DOWNLOAD_ATTEMPTS_DEFAULT = 8  # failed requests in a row (no new byte), then give up
OTA_DOWNLOAD_ATTEMPTS_RANGE = (1, 100)
OTA_DOWNLOAD_DEADLINE_RANGE_S = (60.0, 86400.0)  # seconds: what [update] may set
OTA_RETRY_FIRST_S = 1.0  # seconds: the first wait before a retry
OTA_RETRY_MAX_DEFAULT_S = 60.0  # seconds: the longest wait the doubling reaches
OTA_RETRY_MAX_RANGE_S = (1.0, 3600.0)
OTA_RETRY_AFTER_MAX_S = 900.0  # seconds: a longer Retry-After gives the download up
OTA_UNPACK_MAX_FILES = 20_000  # members of an artifact's tar
OTA_UNPACK_MAX_BYTES = 1024**3  # bytes: the artifact unpacked
OTA_STATE_MAX_BYTES = 64 * 1024  # bytes: the update state file
OTA_TRIAL_DEADLINE_DEFAULT_S = 300.0  # seconds a start in trial has to prove health
OTA_TRIAL_DEADLINE_RANGE_S = (5.0, 3600.0)  # seconds: what the config may set
OTA_TRIAL_MAX_STARTS_DEFAULT = 3  # starts in trial without a commit, then roll back
OTA_TRIAL_MAX_STARTS_RANGE = (1, 20)
