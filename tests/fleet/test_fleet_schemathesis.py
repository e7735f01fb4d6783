"""Property-based API fuzzing with schemathesis: every operation of the OpenAPI schema,
with generated valid and invalid inputs, as an admin, never answers with a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from sqlalchemy import update

from cityedge_fleet.models import ApiToken, Role
from cityedge_fleet.ratelimit import TokenBucketLimiter

from .conftest import Api

EXAMPLES_PER_OPERATION = 25  # keeps the whole run near 20 s on one core


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_no_operation_answers_with_a_server_error(api: Api) -> None:
    app = api.client.app
    # fuzzing is not an attack: no rate limits; and if a case revokes the fuzzer's own
    # token (POST /tokens/1/revoke is a valid case), it is reinstated for the next one
    app.state.auth_limiter = TokenBucketLimiter(10**6, 10**6, 10)  # type: ignore[attr-defined]
    app.state.enroll_limiter = TokenBucketLimiter(10**6, 10**6, 10)  # type: ignore[attr-defined]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = api.headers(Role.admin)
    failures: list[str] = []
    statuses: dict[int, int] = {}
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case: schemathesis.Case) -> None:
            response = case.call(headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            with api.engine.begin() as conn:
                conn.execute(update(ApiToken).values(revoked=False))
            if response.status_code >= 500:
                failures.append("%s %s -> %d %s" % (case.method, case.formatted_path,
                                                     response.status_code,
                                                     response.text[:200]))

        check()
    assert operations >= 18
    assert statuses.get(401, 0) == 0 and statuses.get(429, 0) == 0, statuses
    assert sum(n for code, n in statuses.items() if code < 300) > 50, statuses
    assert not failures, "\n".join(failures[:10])
