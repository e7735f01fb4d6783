"""Property-based API fuzzing with schemathesis, as an admin, on a fleet that holds what a
live one holds: no operation answers with a server error, and every answer matches the
OpenAPI schema (``response_schema_conformance``: 422 bodies included).

Random strings rarely name a registered device, a certificate serial, a valid enrollment
token or a CSR, so most generated requests only reach a 404 or a 422. ``World`` registers
devices, enrolls some with real CSRs (``cryptography``), issues enrollment tokens and API
tokens, and a schema hook (``flatmap_case``) puts those values into the generated path
parameters, queries and bodies. Two phases: every operation on its own (positive and
negative data), then the stateful phase, which chains calls along the schema's OpenAPI
links (a registered device's id to its operations, an issued token to ``/enroll``).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky, Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import update
from sqlmodel import Session, select

from cityedge_fleet.config import Settings
from cityedge_fleet.models import CONTROL_CHARACTERS, ApiToken, Device, Role
from cityedge_fleet.ratelimit import TokenBucketLimiter

from support.fleet import Api
from support.ota import ReleaseKit

EXAMPLES_PER_OPERATION = 30  # per generation mode, on SQLite: about 25 s on a quiet machine
STATEFUL_SCENARIOS = 50
# PostgreSQL: the schema and the handlers are the same; what differs is the storage (types,
# lengths, constraints, transactions), which a third of the examples reaches as well
PG_SHARE = 3
STATEFUL_STEPS = 8
STATEFUL_RESTARTS = 5  # runs of the state machine, each after Hypothesis found it Flaky
CHECKS = [not_a_server_error, response_schema_conformance]
SITES = ["harbour", "old town", "park"]
MODELS = ["ce-air-1", "ce-noise-2"]
TAGS = ["air", "noise", "pilot"]
ENROLL_PATHS = ("/enroll", "/enroll/ticket")


def make_csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Enrollment:
    serial: str
    token: str | None  # None: an allow-listed serial
    csr_pem: str
    device_id: str
    claim: str | None = None  # an allow-listed serial's claim secret


@dataclass
class World:
    """What a live fleet holds, made through the API; the values the fuzzer draws from."""

    api: Api
    device_ids: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)
    cert_serials: dict[str, list[str]] = field(default_factory=dict)  # device id -> certs
    enrollments: list[Enrollment] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    fresh_ids: list[str] = field(default_factory=list)  # valid URNs nobody registered
    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)

    def _post(self, path: str, body: dict[str, Any], role: Role | None = Role.admin,
              status: int = 201) -> dict[str, Any]:
        headers = self.api.headers(role) if role is not None else {}
        r = self.api.client.post(path, json=body, headers=headers)
        assert r.status_code == status, (path, r.text)
        data: dict[str, Any] = r.json()
        return data

    def key_of(self, device_id: str) -> ec.EllipticCurvePrivateKey:
        if device_id not in self.keys:
            self.keys[device_id] = ec.generate_private_key(ec.SECP256R1())
        return self.keys[device_id]

    def build(self) -> World:
        for i in range(8):
            device_id = "urn:dev:mac:0024befffe8a%04x" % i
            serial = "CE-AIR-%05d" % i
            self._post("/devices", {"id": device_id, "serial": serial,
                                    "model": MODELS[i % 2], "hardware_class": "esp32",
                                    "site": SITES[i % 3], "tags": TAGS[: i % 3 + 1]},
                       Role.technician)
            self.device_ids.append(device_id)
            self.serials.append(serial)
            csr = make_csr(device_id, self.key_of(device_id))
            if i < 3:  # enrolled: certificates to list and revoke
                token = self._post("/enrollment/tokens", {"serial": serial})["token"]
                self._post("/enroll", {"serial": serial, "token": token, "csr_pem": csr},
                           role=None, status=200)
                creds = self.api.client.get("/devices/%s/credentials" % device_id,
                                            headers=self.api.headers(Role.admin)).json()
                self.cert_serials[device_id] = [c["serial"] for c in creds]
            for _ in range(2):  # one-time tokens the fuzzer may use up (or find used)
                token = self._post("/enrollment/tokens", {"serial": serial})["token"]
                self.enrollments.append(Enrollment(serial, token, csr, device_id))
        # serials of devices not registered yet: a ticket registers them; two allow-listed
        for i in range(8, 12):
            device_id = "urn:dev:mac:0024befffe8a%04x" % i
            serial = "CE-AIR-%05d" % i
            self.fresh_ids.append(device_id)
            self.serials.append(serial)
            csr = make_csr(device_id, self.key_of(device_id))
            token = self._post("/enrollment/tokens", {"serial": serial})["token"]
            self.enrollments.append(Enrollment(serial, token, csr, device_id))
            claim = secrets.token_hex(16)
            self.enrollments.append(Enrollment(serial, None, csr, device_id, claim))
        self._post("/enrollment/manifests", {"manifest": "delivery-7", "devices": [
            {"serial": e.serial, "claim_sha256": hashlib.sha256(e.claim.encode()).hexdigest()}
            for e in self.enrollments[-3::2] if e.claim is not None]}, Role.technician)
        for role, sites in (("technician", ["harbour"]), ("viewer", [])):
            self.token_ids.append(self._post("/tokens", {"name": "fuzz-" + role, "role": role,
                                                         "sites": sites})["id"])
        with Session(self.api.engine) as s:
            self.token_ids += [t.id for t in s.exec(select(ApiToken)) if t.id is not None]
        return self

    def csr_for_serial(self, serial: Any) -> str | None:
        """A real CSR for the device registered under ``serial`` (however it got there)."""
        if not isinstance(serial, str):
            return None
        with Session(self.api.engine) as s:
            device = s.exec(select(Device).where(Device.serial == serial)).first()
        return make_csr(device.id, self.key_of(device.id)) if device is not None else None

    def realistic(self, case: Any, rnd: random.Random) -> Any:
        """``case`` with some of its values replaced by ones the fleet knows."""
        case = case.derive(keep_auth=True)

        def pick(values: list[Any]) -> Any:
            return rnd.choice(values)

        path = case.path_parameters
        if "device_id" in path and rnd.random() < 0.8:
            path["device_id"] = pick(self.device_ids)
        if "serial" in path and rnd.random() < 0.8:
            certs = self.cert_serials.get(path.get("device_id", ""))
            path["serial"] = pick(certs or [c for cs in self.cert_serials.values() for c in cs])
        if "token_id" in path and rnd.random() < 0.8:
            path["token_id"] = pick(self.token_ids)
        if case.path == "/devices" and case.method == "GET":
            for name, values in (("site", SITES), ("model", MODELS), ("tag", TAGS),
                                 ("after", self.device_ids)):
                if rnd.random() < 0.3:
                    case.query[name] = pick(values)
        if case.method == "POST" and case.path == "/devices" and rnd.random() < 0.5:
            case.body = {  # a new device, as a technician registers one
                "id": "urn:dev:mac:%012x" % rnd.getrandbits(48),
                "serial": "CE-%08d" % rnd.getrandbits(26), "model": pick(MODELS),
                "hardware_class": pick(["esp32", "rp2040"]), "site": pick(SITES),
                "tags": rnd.sample(TAGS, rnd.randint(0, len(TAGS)))}
        body = case.body
        if not isinstance(body, dict):
            return case
        if case.path in ENROLL_PATHS and rnd.random() < 0.8:
            e = pick(self.enrollments)
            body.update(serial=e.serial, token=e.token, csr_pem=e.csr_pem)
            if case.path == "/enroll" and rnd.random() < 0.8:
                body["claim"] = e.claim
            if case.path == "/enroll/ticket":
                if e.token is None:
                    body["token"] = pick(self.enrollments[::2]).token
                if rnd.random() < 0.5:
                    body["registration"] = {"id": e.device_id, "model": pick(MODELS),
                                            "site": pick(SITES)}
            return case
        if rnd.random() < 0.8:  # generated text breaks the control-character rule often
            case.body = body = _without_control_characters(body)
        # a known value (a conflict, a device to change) or a new valid one (a registration)
        new_id = "urn:dev:mac:%012x" % rnd.getrandbits(48)
        new_serial = "CE-%08d" % rnd.getrandbits(26)
        for name, values in (("serial", self.serials), ("id", self.device_ids + self.fresh_ids),
                             ("site", SITES), ("model", MODELS), ("tags", [TAGS[:2], []])):
            if name in body and rnd.random() < 0.7:
                body[name] = pick(values)
        if "id" in body and rnd.random() < 0.5:
            body["id"] = new_id
        if "serial" in body and rnd.random() < 0.5:
            body["serial"] = new_serial
        if "sites" in body and rnd.random() < 0.5:
            body["sites"] = [pick(SITES)]
        if "csr_pem" in body and rnd.random() < 0.7:
            body["csr_pem"] = pick(self.enrollments).csr_pem
        return case


def _without_control_characters(value: Any) -> Any:
    if isinstance(value, str):
        return CONTROL_CHARACTERS.sub("", value)
    if isinstance(value, list):
        return [_without_control_characters(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_control_characters(v) for k, v in value.items()}
    return value


class Outcomes:
    """Status codes seen and failed checks, collected so every failure is listed at once."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.statuses: dict[int, int] = {}
        self.unauthenticated: dict[int, int] = {}  # negative cases without a token
        self.failures: list[str] = []

    def call(self, case: Any, headers: dict[str, str]) -> None:
        if case.operation.schema.is_security_param_negated(case):
            # a negative case without the bearer token the schema declares (schemathesis
            # strips every Authorization header from it): it must be refused
            response = case.call()
            self.unauthenticated[response.status_code] = self.unauthenticated.get(
                response.status_code, 0) + 1
            return
        _own_token_only(case)
        try:
            response = case.call(headers=headers)
        except Exception as e:  # the app raised: what a client sees as a 500
            self.failures.append("%s %s -> exception %r\n  body: %r" % (
                case.method, case.formatted_path, e, case.body))
            return
        self.validate(case, response)

    def validate(self, case: Any, response: Any) -> None:
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        # a valid case may revoke the fuzzer's own token (POST /tokens/1/revoke): reinstated
        with self.api.engine.begin() as conn:
            conn.execute(update(ApiToken).values(revoked=False))
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as e:  # the checks that failed
            self.failures.append("%s %s -> %d: %s\n  body: %r\n  answer: %s" % (
                case.method, case.formatted_path, response.status_code,
                "; ".join("%s: %s" % (f.title, str(f.message)[:200]) for f in e.exceptions),
                case.body, response.text[:300]))


def _no_rate_limits(api: Api) -> None:
    # fuzzing is not an attack: no rate limits
    app = api.client.app
    app.state.auth_limiter = TokenBucketLimiter(10**6, 10**6, 10)  # type: ignore[attr-defined]
    app.state.enroll_limiter = TokenBucketLimiter(10**6, 10**6, 10)  # type: ignore[attr-defined]


def _schema(api: Api, world: World) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)

    @schema.hook("flatmap_case")
    def with_fleet_values(context: Any, case: Any) -> Any:
        # the fleet's values first: Hypothesis draws the first branch more often
        return st.one_of(st.randoms(use_true_random=False).map(
            lambda rnd: world.realistic(case, rnd)), st.just(case))

    return schema


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def _own_token_only(case: Any) -> None:
    """The schema declares the bearer scheme, so schemathesis makes up an Authorization
    header of its own: the fuzzer calls with the admin token it was given instead (the
    refusal of wrong tokens is test_fleet_auth's)."""
    if case.headers:
        for name in [k for k in case.headers if k.lower() == "authorization"]:
            del case.headers[name]


@pytest.fixture(name="settings")
def ota_ready_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The conftest's fleet, set up to take releases as a live one is: a root set (without
    it every ``POST /ota/releases`` is a 503, the fleet's configuration missing, which a
    random valid body reached in a local run), the artifact store and its public URL."""
    settings.ota_root_set_file = ReleaseKit.make(tmp_path).root_set_file
    settings.ota_dir = tmp_path / "ota"
    settings.ota_public_url = "https://fleet.test:8443"
    return settings


def test_no_server_error_and_every_answer_matches_the_schema(api: Api) -> None:
    _no_rate_limits(api)
    share = 1 if api.settings.database_url.startswith("sqlite") else PG_SHARE
    # the stateful phase keeps its whole count on PostgreSQL too: with every route of the
    # fleet (OTA, metrics, readiness) a third of the scenarios could end without one
    # chained call (seen twice in whole-suite runs)
    examples, scenario_goal = EXAMPLES_PER_OPERATION // share, STATEFUL_SCENARIOS
    world = World(api).build()
    schema = _schema(api, world)
    headers = api.headers(Role.admin)
    outcomes = Outcomes(api)
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                outcomes.call(case, headers)

            try:
                check()
            except Unsatisfiable:  # no parameter and no body: nothing to make invalid
                assert mode is GenerationMode.NEGATIVE, op.label
    assert operations >= 18
    statuses = outcomes.statuses
    assert statuses.get(401, 0) == 0 and statuses.get(429, 0) == 0, statuses
    # refused (401, or 400/422 for a URL or body refused before authentication, 413 for a
    # body over the route's limit, which is read before the token), never served
    assert outcomes.unauthenticated.get(401, 0) > 0, outcomes.unauthenticated
    assert all(code in (400, 401, 413, 422) for code in outcomes.unauthenticated), (
        outcomes.unauthenticated)
    assert sum(n for code, n in statuses.items() if code < 300) > 150 // share, statuses
    assert not outcomes.failures, "\n".join(outcomes.failures[:10])

    # the stateful phase: calls chained along the OpenAPI links
    stateful = Outcomes(api)
    links_followed: set[str] = set()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": headers}

        def before_call(self, case: Any) -> None:
            _own_token_only(case)
            # a device enrolls with its own CSR: one for the serial a link brought in
            if case.path in ENROLL_PATHS and isinstance(case.body, dict):
                csr = world.csr_for_serial(case.body.get("serial"))
                if csr is not None:
                    case.body["csr_pem"] = csr

        def validate_response(self, response: Any, case: Any, *args: Any,
                              **kwargs: Any) -> None:
            stateful.validate(case, response)

        def step(self, input: Any) -> Any:  # schemathesis' parameter name
            if input.transition is not None and input.is_applied:
                links_followed.add(input.transition.id)
            return super().step(input)

        def setup(self) -> None:
            scenarios.append(1)

    # Generation only, as schemathesis runs it. The database grows with every scenario, so
    # Hypothesis may find that a prefix it replays no longer allows the same rules (Flaky);
    # schemathesis' own runner then starts the suite again, and so does this loop.
    scenarios: list[int] = []
    for _ in range(STATEFUL_RESTARTS):
        left = scenario_goal - len(scenarios)
        if left <= 0:
            break
        with contextlib.suppress(Flaky):
            Workflow.run(settings=settings(
                max_examples=left, phases=[Phase.generate], stateful_step_count=STATEFUL_STEPS,
                deadline=None, database=None, suppress_health_check=list(HealthCheck),
                derandomize=True))  # the same scenarios every run: a result, not a draw
    assert not stateful.failures, "\n".join(stateful.failures[:10])
    assert len(scenarios) >= scenario_goal // 2, len(scenarios)
    assert links_followed, "the stateful phase chained no calls"
    assert sum(stateful.statuses.values()) > scenario_goal, stateful.statuses
