"""The fleet service's settings (environment ``CITYEDGE_*``) and limits.

Every size, count and time the fleet enforces lives in ``FleetLimits`` with its unit.
The mode is never guessed: ``CITYEDGE_MODE`` must say ``development`` or ``production``.
Production refuses to start unless the operator named the database, the CA directory, the
broker (``mqtts://`` only: devices are told this URL) and the audit anchor file: there
are no default secrets, key paths or clear-text brokers in production (the development
defaults put everything under ``var/``). No ``.env`` file is read unless
``CITYEDGE_ENV_FILE`` names one (``env_file_from``); ``describe_errors`` turns a
``ValidationError`` into lines that name the variable to fix and the values it takes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cityedge_fleet.broker_acl import check_share_group

DEV_VAR_DIR = Path("var")
ENV_PREFIX = "CITYEDGE_"
ENV_FILE_VARIABLE = "CITYEDGE_ENV_FILE"  # the only way a settings file is read
Mode = Literal["development", "production"]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


MANIFEST_ENTRY_OVERHEAD_BYTES = 40  # bytes of JSON around one manifest entry's two values


class FleetLimits(BaseModel):
    """Limits of the fleet service, each with its unit in the name or comment."""

    enroll_token_ttl_s: int = 3600  # seconds an enrollment token stays valid
    enroll_token_max_ttl_s: int = 7 * 86400  # seconds: longest TTL a technician may ask for
    manifest_max_serials: int = 10_000  # serials in one vendor delivery manifest
    claim_max_chars: int = 128  # characters of a device's claim secret (enroll request)
    csr_max_bytes: int = 8192  # bytes of a PEM CSR
    cert_validity_days: int = 90  # days a device certificate is valid
    crl_validity_s: int = 7 * 86400  # seconds from thisUpdate to nextUpdate of a CRL
    page_max: int = 500  # rows in one page of a list endpoint
    console_session_s: int = 8 * 3600  # seconds a console sign-in lasts at most
    console_idle_s: int = 30 * 60  # seconds without a page view before it ends
    console_page: int = 50  # devices on one page of the console's device list
    page_default: int = 100  # rows in a page when the client does not say
    tags_max: int = 32  # tags on one device
    text_max_chars: int = 128  # characters of a serial, model, site, tag, name
    token_sites_max: int = 64  # sites one technician token may be scoped to
    # bytes of a request body, read before anything parses it (413 beyond); a device with
    # 32 tags of 128 three-byte characters fits. Enrollment and manifests need more:
    # ``enroll_body_max_bytes`` and ``manifest_body_max_bytes`` below
    body_max_bytes: int = 16 * 1024
    quarantine_after_forgeries: int = 3  # bad-signature batches before a device is quarantined
    # malformed batches (and relays of nodes that are not its own) a device publishes before
    # it is quarantined: more than for forgeries, since a firmware bug can send them too
    quarantine_after_malformed: int = 10
    auth_fail_burst: int = 20  # failed authentications allowed in a burst per client IP
    auth_fail_per_s: float = 1.0  # refill rate of that bucket, per second
    enroll_burst: int = 10  # enrollment attempts allowed in a burst per client IP
    enroll_per_s: float = 0.5  # refill rate of that bucket, per second
    rate_limit_clients_max: int = 10_000  # client IPs tracked by one rate limiter
    keyring_max_age_s: float = 5.0  # seconds a worker trusts its cached keys (revocation delay)
    ingest_attempts: int = 3  # tries to store one message alone before it is a dead letter
    ingest_retry_s: float = 0.2  # seconds before the 2nd try (then 2x, 3x ...)
    ingest_down_retry_max_s: float = 30.0  # seconds at most between tries while the
    # database is down (the wait doubles from ingest_retry_s; nothing is acknowledged)
    ingest_dead_letter_max_bytes: int = 65536  # bytes of a dead letter's payload kept
    ingest_session_expiry_s: int = 3600  # seconds the broker keeps the ingest's queue
    ingest_group_max_messages: int = 200  # MQTT messages stored in one transaction
    ingest_group_max_s: float = 0.05  # seconds a group waits after its first message
    # key rotation steps (a CSR taken: signed by the CA, stored, answered with a command;
    # a rotation proven: credentials revoked, a command queued; ~10 ms each) in one ingest
    # transaction: a group with more is stored in parts, so a fleet rotating at once does
    # not hold SQLite's write lock for seconds
    ingest_group_max_rotation_steps: int = 20
    ingest_receive_max: int = 1000  # unacknowledged messages the broker may send (MQTT 5)
    broker_control_timeout_s: float = 5.0  # seconds to wait for the broker's control answer
    broker_sync_every_s: float = 30.0  # seconds between reconciles of the broker's grants
    # seconds one rabbitmqctl call may take (it boots an Erlang VM: 1-3 s on a small host)
    broker_rabbitmqctl_timeout_s: float = 30.0
    # fleet commands (``command_queue``, ``command_publisher``); a command's own sizes are
    # the core's (``cityedge_core.limits``: name, args, whole command)
    command_expires_default_s: int = 86400  # seconds a command stays valid unless told
    command_expires_max_s: int = 30 * 86400  # seconds: the longest validity one may ask for
    command_pending_max: int = 32  # commands queued or sent to one device at once
    command_poll_s: float = 1.0  # seconds between the publisher's looks for due commands
    command_absent_retry_s: float = 30.0  # seconds between tries while the device is not
    # at the broker (PUBACK "no matching subscribers": the broker dropped it, the device
    # paid nothing)
    command_resend_s: float = 60.0  # seconds from a delivery without an answer to the
    # next (doubling, jittered, up to command_resend_max_s: each costs the device a check)
    command_resend_max_s: float = 1800.0
    command_silence_s: float = 900.0  # seconds without a batch after which a device's next
    # batch counts as its return: its unanswered commands are sent again at once
    command_publish_timeout_s: float = 10.0  # seconds to wait for the broker's PUBACK
    command_round_max: int = 200  # commands one publisher round sends at most
    # hardware reports (``hw_report_check``): a report of the whole catalogue (84
    # requirements, each with its checks' evidence) is ~100 KiB; the catalogue draft has
    # 243 requirements, so 1 MiB leaves room without letting one upload fill the database
    hw_report_max_bytes: int = 1024 * 1024  # bytes of one uploaded report (413 beyond)
    hw_report_max_requirements: int = 1000  # requirements listed in one report
    hw_report_max_checks: int = 10_000  # checks (verdicts) in one report, all together
    # OTA (``ota``, ``ota_store``): an artifact is uploaded streamed, never held in memory
    ota_artifact_max_bytes: int = 512 * 1024 * 1024  # bytes of one artifact (413 beyond)
    ota_release_body_max_bytes: int = 32 * 1024  # bytes of a release upload (manifest +
    # key list, base64 in JSON: 2 KiB + 8 KiB at most before base64)
    # how far one release may raise its component's sequence above the highest one the
    # fleet holds (from 0 for the first): a release key cannot burn the sequence space
    # (a device never takes a lower sequence again) with one manifest
    ota_max_sequence_jump: int = 1000
    ota_command_expires_s: int = 14 * 86400  # seconds an ``update`` command stays valid
    # each device's share of the download endpoints (``ratelimit.DownloadBudget``): 429
    # with Retry-After beyond it. Requests: a burst, then per second; bytes: a burst, then
    # per second (a response may overdraw the bytes by itself, never lock a device out)
    ota_download_requests_burst: int = 120
    ota_download_requests_per_s: float = 2.0
    ota_download_bytes_burst: int = 64 * 1024 * 1024
    ota_download_bytes_per_s: float = 2 * 1024 * 1024
    ota_download_devices_max: int = 100_000  # devices one budget tracks (LRU beyond)
    # open data (``opendata``: the public SensorThings API and the bulk downloads)
    sta_page_max: int = 1000  # entities in one page ($top beyond it is refused: 400)
    sta_page_default: int = 100  # entities in a page when the client gives no $top
    sta_skip_max: int = 10_000_000  # entities a client may skip ($skip beyond: 400)
    sta_query_max_chars: int = 2048  # characters of a whole query string (414 beyond)
    sta_filter_max_chars: int = 1024  # characters of one $filter expression
    sta_filter_max_depth: int = 16  # nesting of parentheses and ``not`` in a $filter
    sta_filter_max_terms: int = 64  # comparisons in one $filter
    sta_literal_max_chars: int = 128  # characters of one literal in a $filter
    sta_orderby_max: int = 3  # properties in one $orderby
    sta_expand_max: int = 100  # entities in one expanded collection
    sta_burst: int = 120  # open-data requests allowed in a burst per client IP
    sta_per_s: float = 20.0  # refill rate of that bucket, per second
    sta_cache_s: int = 60  # seconds a client or proxy may keep an answer (Cache-Control)
    sta_index_ttl_s: float = 60.0  # seconds the public catalogue (things, datastreams)
    # is kept before it is built again from the registry
    sta_bulk_max_rows: int = 500_000  # readings in one bulk download (site and day)
    # milliseconds one open-data request's queries may run on PostgreSQL (anyone may send
    # one: a time window over every public device in id order read 90 M rows, 33 s, at
    # 100 M readings: bench/scale_queries.py); cut there and answered 400
    sta_statement_timeout_ms: int = Field(default=5000, ge=100)

    @property
    def enroll_body_max_bytes(self) -> int:
        """Bytes of an ``/enroll`` or ``/enroll/ticket`` body: a CSR of ``csr_max_bytes``
        (each byte at most two once JSON-escaped: a newline is ``\\n``) plus the serial,
        token and registration (``body_max_bytes``)."""
        return 2 * self.csr_max_bytes + self.body_max_bytes

    @property
    def manifest_body_max_bytes(self) -> int:
        """Bytes of a manifest upload: ``manifest_max_serials`` entries
        ``{"serial": "<ASCII, text_max_chars>", "claim_sha256": "<64 hex>"}``, comma-separated
        (``MANIFEST_ENTRY_OVERHEAD_BYTES`` of keys, quotes and punctuation each), plus
        ``body_max_bytes``."""
        entry = self.text_max_chars + 64 + MANIFEST_ENTRY_OVERHEAD_BYTES
        return self.manifest_max_serials * entry + self.body_max_bytes

    @model_validator(mode="after")
    def _groups_fit_in_flight(self) -> Self:
        if self.ingest_receive_max < 2 * self.ingest_group_max_messages:
            raise ValueError("ingest_receive_max must be at least twice "
                             "ingest_group_max_messages (one group stored, one arriving)")
        if not 0 < self.command_resend_s <= self.command_resend_max_s:
            raise ValueError("command_resend_s must be above 0 and at most "
                             "command_resend_max_s")
        return self


# a SenML name's characters (RFC 8428 4.5.1) less ":", which separates a device id
OPEN_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,63}$")
LOCATION_DECIMALS_MAX = 4  # decimals of a published coordinate: 1e-4 degree, ~11 m
# chain verdicts whose readings open data may publish (``cityedge_core.chain.ACCEPTED``
# less ``fork``: a fork is signed but breaks its device's chain, see docs/OPEN_DATA.md)
OPEN_CHAIN_STATUSES = ("ok", "gap", "reordered")


class OpenDataSite(BaseModel):
    """A site the city publishes: its public name and where it is (degrees, WGS 84;
    published rounded to ``opendata_location_decimals``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=512)
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)


class OpenDataKind(BaseModel):
    """A sensor kind the city publishes (an ObservedProperty) and its unit."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=512)
    definition: str = Field(default="", max_length=256)  # a URI naming the property
    unit_name: str = Field(min_length=1, max_length=64)
    unit_symbol: str = Field(min_length=1, max_length=32)  # the SenML unit stored
    unit_definition: str = Field(default="", max_length=256)


class Settings(BaseSettings):
    """Where the fleet keeps its data and keys, and how it reaches the broker."""

    # env_file=None: a stray .env in the working directory is never read (env_file_from)
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, env_nested_delimiter="__", extra="ignore"
    )

    mode: Mode  # required: development or production, never guessed
    database_url: str = "sqlite:///%s" % (DEV_VAR_DIR / "fleet.sqlite3")
    ca_dir: Path = DEV_VAR_DIR / "ca"  # online intermediate key + cert, root cert, CRL
    # CA key custody (``ca_custody``): the file holding the passphrase of the encrypted
    # intermediate key (mode 0600/0400; never the passphrase itself in a setting). In
    # production a key file in clear is refused: this, or the key in a PKCS#11 token
    ca_password_file: Path | None = None
    # the intermediate in a PKCS#11 token: the module (.so), the token's label, the key's
    # label and the file holding the user PIN (mode 0600/0400)
    ca_pkcs11_module: Path | None = None
    ca_pkcs11_token: str | None = None
    ca_pkcs11_key_label: str = "cityedge-intermediate"
    ca_pkcs11_pin_file: Path | None = None
    broker_url: str = "mqtts://127.0.0.1:8883"  # what enrolled devices are told to use
    broker_pid_file: Path | None = None  # Mosquitto's pid file: SIGHUP it when the CRL changes
    crl_url: str = "/ca/crl"  # where the CRL is published (URL path of this service)
    # append-only file outside the database anchoring the audit log's head (detects a
    # truncated tail); required in production: without it `audit verify` cannot see the
    # newest rows deleted
    audit_anchor_file: Path | None = None
    # the audit log's HMAC key (32 random bytes, mode 0600), never in the database:
    # `cityedge audit init-key` makes it; development makes its own at first start
    audit_key_file: Path = DEV_VAR_DIR / "audit.key"
    # addresses or networks of the reverse proxies in front of the API, comma-separated:
    # only a request from one of them may name its client in X-Forwarded-For (audit
    # source, rate limits; uvicorn's proxy headers in `fleet serve`). Empty: none
    trusted_proxies: Annotated[list[IpNetwork], NoDecode] = Field(default_factory=list)
    # ingest worker: MQTT over TLS with a client certificate
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 8883
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_client_id: str = "fleet-ingest"  # the broker replaces it by the certificate's CN
    # the ingest's shared-subscription group (8-64 of A-Z a-z 0-9 _ -); production needs
    # one of its own: a device may not join it (broker_acl) and need not guess it either
    ingest_share_group: str = "cityedge-ingest"
    # how the ingest subscribes on Mosquitto (docs/OPERATIONS.md section 8): "plain" (one
    # worker: ordinary subscriptions, which Mosquitto keeps in its persistence file, so a
    # broker restart queues what devices send before the worker is back) or "shared"
    # (several workers on $share/<group>/...: Mosquitto 2.0 saves no shared subscription,
    # so what devices send after a broker restart and before a worker has subscribed again
    # is acknowledged and dropped)
    ingest_subscription: Literal["plain", "shared"] = "plain"
    # the broker engine (docs/BROKERS.md): "mosquitto" (one node; the ingest holds MQTT 5
    # shared subscriptions) or "rabbitmq" (a cluster; the ingest consumes its quorum queue
    # over AMQP from the first of ``ingest_amqp_nodes`` that answers, host:port,...)
    broker_engine: Literal["mosquitto", "rabbitmq"] = "mosquitto"
    ingest_amqp_nodes: str = "127.0.0.1:5671"
    # the fleet-control certificate: grants and cuts devices at the broker (broker_sync)
    broker_control_cert_file: Path | None = None
    broker_control_key_file: Path | None = None
    # the same for "rabbitmq" (broker_rabbitmq_sync): rabbitmqctl against these nodes
    # (name@host,...; the first that answers), with the cluster's Erlang cookie in
    # ``<broker_rabbitmq_home>/.erlang.cookie`` (mode 0400: it is the key to every node;
    # docs/BROKERS.md). No nodes: the fleet does not drive the cluster
    broker_rabbitmq_nodes: str = ""
    broker_rabbitmq_home: Path | None = None
    broker_rabbitmq_ctl: Path = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
    broker_rabbitmq_epmd_port: int | None = None  # None: Erlang's default (4369)
    ingest_with_serve: bool = True  # `fleet serve` also runs an ingest worker
    # the fleet's command key (P-256, PKCS#8 PEM, mode 0600; `cityedge keys
    # init-command-key` makes it; development makes its own at first start): every fleet
    # command is signed with it, and devices trust its public half (enrollment installs it)
    command_key_file: Path = DEV_VAR_DIR / "command.key"
    # the fleet-commands certificate: `fleet serve` publishes commands with it (QoS 1)
    commands_cert_file: Path | None = None
    commands_key_file: Path | None = None
    commands_with_serve: bool = True  # `fleet serve` also runs the command publisher
    # the hardware gate (``hw_report_store.check_enrollment``): a device enrolls only when
    # the newest report uploaded for its model and this profile (a bundled profile of
    # ``cityedge hw catalogue``, e.g. city-baseline) meets it. None: off
    hw_report_profile: str | None = None
    # sites whose devices need another profile than ``hw_report_profile`` (e.g.
    # {"waterworks": "city-critical"}; as an environment variable, JSON); the gate is on
    # for a site named here even when ``hw_report_profile`` is None
    hw_report_site_profiles: dict[str, str] = Field(default_factory=dict)
    # OTA: the artifact store (content-addressed files), the root set release-key lists
    # must be signed by (``cityedge release root-set``'s root-set.json: public keys only;
    # None: no release can be uploaded), and the https:// URL devices reach this service
    # at (the ``update`` command names ``<url>/ota/d/<token>/``; None: no OTA campaign)
    ota_dir: Path = DEV_VAR_DIR / "ota"
    ota_root_set_file: Path | None = None
    ota_public_url: str | None = None
    # open data (``opendata``; docs/OPEN_DATA.md): the file holding the server secret that
    # keys the public ids (at least 32 random bytes, mode 0600; `openssl rand -out FILE
    # 32`). No default: without it the open-data endpoints answer 404
    opendata_secret_file: Path | None = None
    # the sites the city publishes: {"harbour": {"name": ..., "latitude": ...,
    # "longitude": ...}} (as an environment variable, JSON); a device elsewhere is not
    opendata_sites: dict[str, OpenDataSite] = Field(default_factory=dict)
    # the sensor kinds published: a reading's SenML name (less its device's id and ":")
    # -> its ObservedProperty and unit; a reading of any other name is not published
    opendata_kinds: dict[str, OpenDataKind] = Field(default_factory=dict)
    opendata_location_decimals: int = Field(default=3, ge=0, le=LOCATION_DECIMALS_MAX)
    # chain verdicts of the batches whose readings are published
    opendata_chain_statuses: list[str] = Field(
        default_factory=lambda: list(OPEN_CHAIN_STATUSES))
    # readings (``reading_partitions``, `cityedge fleet retention`): on PostgreSQL one
    # partition per day or month, made this many periods ahead; readings stored more than
    # ``reading_retention_days`` ago are dropped by the job (0: kept for ever)
    reading_partition: Literal["day", "month"] = "day"
    reading_partitions_ahead: int = Field(default=7, ge=1, le=400)
    reading_retention_days: int = Field(default=0, ge=0, le=36_600)
    limits: FleetLimits = Field(default_factory=FleetLimits)

    @field_validator("opendata_kinds")
    @classmethod
    def _open_kinds(cls, value: dict[str, OpenDataKind]) -> dict[str, OpenDataKind]:
        for kind in value:
            if not OPEN_KIND.match(kind):
                raise ValueError("a published kind is 1..64 of A-Z a-z 0-9 _ . / - (it is "
                                 "matched against reading names)")
        return value

    @field_validator("opendata_chain_statuses")
    @classmethod
    def _open_statuses(cls, value: list[str]) -> list[str]:
        wrong = [v for v in value if v not in OPEN_CHAIN_STATUSES]
        if wrong or not value:
            raise ValueError("one or more of %s (verified readings only)"
                             % ", ".join(OPEN_CHAIN_STATUSES))
        return sorted(set(value))

    @field_validator("ota_public_url")
    @classmethod
    def _ota_url(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("https://") or len(value) > 160
                                  or any(c <= " " or c > "~" for c in value)):
            raise ValueError("must be an https:// URL of at most 160 characters (devices "
                             "fetch releases over TLS only)")
        return None if value is None else value.rstrip("/")

    @field_validator("ingest_share_group")
    @classmethod
    def _share_group(cls, value: str) -> str:
        return check_share_group(value)

    @field_validator("hw_report_profile")
    @classmethod
    def _hw_profile(cls, value: str | None) -> str | None:
        return None if value is None else check_gate_profile(value)

    @field_validator("hw_report_site_profiles")
    @classmethod
    def _hw_site_profiles(cls, value: dict[str, str]) -> dict[str, str]:
        return {site: check_gate_profile(name) for site, name in value.items()}

    def hw_profile_for(self, site: str) -> str | None:
        """The profile a device at ``site`` must meet to enroll; None: the gate is off."""
        return self.hw_report_site_profiles.get(site, self.hw_report_profile)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return [_network(item) for item in value]
        return value

    @model_validator(mode="after")
    def _pkcs11_complete(self) -> Self:
        if self.ca_pkcs11_module is not None:
            missing = [variable(n) for n in ("ca_pkcs11_token", "ca_pkcs11_pin_file")
                       if getattr(self, n) is None]
            if missing:
                raise ValueError("%s must be set with %s (the token's label and the file "
                                 "holding its user PIN)" % (" and ".join(missing),
                                                            variable("ca_pkcs11_module")))
        return self

    @model_validator(mode="after")
    def _production_rules(self) -> Self:
        if self.mode == "development":
            return self
        # every one missing is named at once; the audit key comes from `audit init-key`
        problems = [
            "%s must be set explicitly in production, not left at its development default"
            % variable(name)
            for name in ("database_url", "ca_dir", "broker_url", "ingest_share_group",
                         *(("broker_rabbitmq_nodes", "broker_rabbitmq_home")
                           if self.broker_engine == "rabbitmq" else
                           ("broker_control_cert_file", "broker_control_key_file")),
                         "audit_key_file", "command_key_file", "commands_cert_file",
                         "commands_key_file")
            if name not in self.model_fields_set
        ]
        if "broker_url" in self.model_fields_set and not self.broker_url.startswith(
                "mqtts://"):
            problems.append("%s must be an mqtts:// URL in production (devices would send "
                            "their readings in clear text)" % variable("broker_url"))
        if self.audit_anchor_file is None:
            problems.append("%s must name an append-only file in production (without it a "
                            "deleted tail of the audit log goes unnoticed)"
                            % variable("audit_anchor_file"))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def check_gate_profile(name: str) -> str:
    """A gate profile is one of the bundled profiles (a vendor's own draft profile cannot
    decide what the city enrolls)."""
    from cityedge_hardware.catalogue import bundled_profiles

    if name not in bundled_profiles():
        raise ValueError("%r is not a bundled hardware profile; one of %s"
                         % (name, ", ".join(bundled_profiles())))
    return name


def _network(item: Any) -> Any:
    if not isinstance(item, str):
        return item
    try:
        return ipaddress.ip_network(item, strict=True)
    except ValueError as e:
        raise ValueError("%r is not an IP address or network (e.g. 10.0.0.7 or 10.0.0.0/24)"
                         % item) from e


def variable(*loc: Any) -> str:
    """The environment variable of a settings field: ``limits.page_max`` ->
    ``CITYEDGE_LIMITS__PAGE_MAX``."""
    names = [str(part).upper() for part in loc if not isinstance(part, int)]
    return ENV_PREFIX + "__".join(names)


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem, naming the variable and, for a choice, the allowed values."""
    lines = []
    for err in error.errors():
        loc = err.get("loc", ())
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if not loc:  # a rule across fields: its message names the variables
            lines.append(msg)
            continue
        if loc[0] == "mode":
            lines.append("%s %s: one of %s" % (
                variable("mode"), "is not set" if err.get("type") == "missing" else "is wrong",
                ", ".join(get_args(Mode))))
            continue
        lines.append("%s: %s" % (variable(*loc), msg))
    return lines


def env_file_from(environ: Mapping[str, str]) -> Path | None:
    """The settings file ``CITYEDGE_ENV_FILE`` names, if any (it must exist)."""
    name = environ.get(ENV_FILE_VARIABLE, "")
    if not name:
        return None
    path = Path(name)
    if not path.is_file():
        raise ValueError("%s=%s: no such file" % (ENV_FILE_VARIABLE, name))
    return path
