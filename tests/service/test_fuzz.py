"""The API fuzzed through its own /openapi.json (schemathesis, property-based): no request generated from the schema,
valid or not, is answered with a 5xx. A real server on a tiny model and a real Redis; the user key, as a client."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import LiveServer
from tests.utils.serving import USER_KEY, make_settings, served_app

EXAMPLES = 60  # per operation: the whole file takes well under a minute on 2 cores


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, redis_url):
    cfg = make_settings(tmp_path_factory.mktemp("home"), max_new_tokens=16, chat_rate_per_minute=100_000)
    with LiveServer(served_app(redis_url, cfg)) as live:
        yield schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def test_no_generated_request_gets_a_server_error(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {USER_KEY}"}, checks=[not_a_server_error])

        run()
