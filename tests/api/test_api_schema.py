"""Schema fuzzing: schemathesis generates requests for every operation of /openapi.json and
sends them to a live server.

Asserted: no 5xx, every status code and content type is one the schema declares, and JSON
bodies conform to the declared response models. (``schemathesis.pytest.from_fixture`` does
not work with this pytest version, so the strategies are driven with ``@given`` here.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import LiveServer

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/version"),
]
MAX_EXAMPLES = {"/v1/chat/completions": 30, "/v1/completions": 30}


def load_schema(server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_every_operation_is_fuzzed(server: LiveServer) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in load_schema(server).get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize("method,path", OPERATIONS)
def test_operation_conforms(server: LiveServer, method: str, path: str) -> None:
    operation = load_schema(server)[path][method]
    examples = MAX_EXAMPLES.get(path, 10)

    @given(case=operation.as_strategy())
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=30)

    run()
