"""services/api/checks.py: reading a check's body (`parse_check_write`) and the rules about its host and the check
as stored (`CheckRequest.checked_against`), in this process: one 422 lists every problem, nothing raises before
that, and fields of another check type are refused by name."""

from __future__ import annotations

import json
from typing import Any, cast

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.checks import STORED_PASSWORD_NEEDS_USER, CheckRequest, parse_check_write
from services.api.problems import Problem
from services.api.schemas import HttpCheckWrite, ServiceCheckWrite, TcpCheckWrite

HTTP = {"name": "web", "check_type": "http", "url": "http://127.0.0.1:8080/health"}
TCP = {"name": "port", "check_type": "tcp", "port": 22, "address": "127.0.0.1"}
SERVICE = {"name": "unit", "check_type": "service", "service_name": "nginx.service"}
HOST = {"name": "127.0.0.1", "agent_url": "http://127.0.0.1:9100"}


def record(values: dict[str, Any]) -> asyncpg.Record:
    """A row as the rules read it (by key)."""
    return cast(asyncpg.Record, values)


def errors_of(request: CheckRequest) -> dict[str, str]:
    return {error["field"]: error["message"] for error in request.errors}


def problem_of(request: CheckRequest, host: dict[str, Any] = HOST, before: dict[str, Any] | None = None) -> Problem:
    with pytest.raises(Problem) as raised:
        request.checked_against(record(host), None if before is None else record(before))
    assert raised.value.status == 422
    return raised.value


# ---- the body -------------------------------------------------------------------------------------------


def test_a_valid_body_becomes_the_model_of_its_type() -> None:
    for body, model in ((HTTP, HttpCheckWrite), (TCP, TcpCheckWrite), (SERVICE, ServiceCheckWrite)):
        request = parse_check_write(dict(body))
        assert isinstance(request.body, model) and request.errors == []
        assert request.check_type == body["check_type"]
        assert request.checked_against(record(HOST)) is request.body


def test_defaults_and_normalised_values() -> None:
    request = parse_check_write(HTTP | {"expected_status": " 2XX , 304 "})
    body = cast(HttpCheckWrite, request.body)
    assert (body.expected_status, body.method, body.enabled, body.critical) == ("2xx,304", "GET", True, True)
    assert (body.interval_seconds, body.timeout_seconds, body.failures_before_unhealthy) == (None, None, 1)


@pytest.mark.parametrize("document", [None, [], "check", 5, True, [HTTP]])
def test_a_body_that_is_not_an_object_is_one_problem(document: object) -> None:
    request = parse_check_write(document)
    assert (request.body, request.check_type, request.errors) == (
        None, None, [{"field": "body", "message": "must be a JSON object"}]
    )  # fmt: skip


@pytest.mark.parametrize("check_type", [None, "ping", "HTTP", 7, ["http"], {"http": 1}])
def test_without_a_known_type_the_common_fields_are_still_checked(check_type: object) -> None:
    document: dict[str, Any] = {"name": "", "interval_seconds": 5, "port": 22}
    if check_type is not None:
        document["check_type"] = check_type
    request = parse_check_write(document)
    errors = errors_of(request)
    assert request.body is None and request.check_type is None
    assert errors["check_type"] == "must be one of: service, http, tcp, dns, grpc"
    assert {"name", "interval_seconds"} <= set(errors)
    assert "port" not in errors  # another type's field is not judged without a type


def test_fields_of_another_type_are_refused_by_name() -> None:
    errors = errors_of(parse_check_write(TCP | {"url": "http://127.0.0.1/", "service_name": "x.service"}))
    assert errors == {
        "url": "a field of http checks, not of tcp checks",
        "service_name": "a field of service checks, not of tcp checks",
    }
    assert errors_of(parse_check_write(HTTP | {"nonsense": 1})) == {"nonsense": "unknown field"}


def test_read_only_fields_echoed_from_a_get_are_ignored() -> None:
    echoed = HTTP | {"id": "x", "host_id": "y", "status": "healthy", "last_result": None, "basic_auth_pass_set": True}
    request = parse_check_write(echoed)
    assert request.errors == [] and isinstance(request.body, HttpCheckWrite)


def test_every_problem_of_a_body_is_listed_at_once() -> None:
    body = HTTP | {
        "url": "ftp://127.0.0.1/", "expected_status": "600", "method": "HEAD", "expected_body": "ok",
        "basic_auth_pass": "alone", "interval_seconds": True, "port": 22,
    }  # fmt: skip
    errors = errors_of(parse_check_write(body))
    assert set(errors) == {
        "url", "expected_status", "expected_body", "basic_auth_pass", "interval_seconds", "port",
    }  # fmt: skip
    assert errors["expected_body"] == "a HEAD answer has no body: use method GET, or no expected_body"
    assert errors["basic_auth_pass"] == "needs basic_auth_user"


def test_what_the_body_says_of_basic_auth_is_read_from_the_raw_document() -> None:
    """Even from a body that is otherwise invalid: the rules about a stored password need it."""
    invalid = parse_check_write(HTTP | {"url": 5, "basic_auth_user": "ops"})
    assert (invalid.body, invalid.has_basic_auth_user, invalid.mentions_basic_auth_pass) == (None, True, False)
    cleared = parse_check_write(HTTP | {"basic_auth_user": None, "basic_auth_pass": None})
    assert (cleared.has_basic_auth_user, cleared.mentions_basic_auth_pass) == (False, True)


# ---- the rules about the host and the stored check ---------------------------------------------------------


def test_a_service_check_needs_the_hosts_agent_url() -> None:
    problem = problem_of(parse_check_write(dict(SERVICE)), host={"name": "127.0.0.1", "agent_url": None})
    assert problem.errors == [
        {"field": "check_type", "message": "a service check needs the host's agent_url; set it on the host first"}
    ]


def test_a_tcp_check_without_address_needs_a_host_name_that_can_be_reached() -> None:
    without_address = {"name": "ssh", "check_type": "tcp", "port": 22}
    assert parse_check_write(without_address).checked_against(record({"name": "db-1.internal", "agent_url": None}))
    problem = problem_of(parse_check_write(without_address), host={"name": "Rack 4 (old)", "agent_url": None})
    assert problem.errors is not None and [error["field"] for error in problem.errors] == ["address"]
    assert problem.errors[0]["message"].startswith(
        "required: without it the check connects to the host's name 'Rack 4 (old)', which must not contain spaces"
    )
    with_address = parse_check_write(without_address | {"address": "127.0.0.1"})
    assert with_address.checked_against(record({"name": "Rack 4 (old)", "agent_url": None}))
    null_address = parse_check_write(without_address | {"address": None})
    assert problem_of(null_address, host={"name": "Rack 4 (old)", "agent_url": None}).errors


def test_the_bodys_and_the_hosts_problems_come_in_one_answer() -> None:
    body = {"name": "", "check_type": "service", "service_name": "../etc"}
    problem = problem_of(parse_check_write(body), host={"name": "127.0.0.1", "agent_url": None})
    assert problem.errors is not None
    assert {error["field"] for error in problem.errors} == {"name", "service_name", "check_type"}


STORED = {"basic_auth_pass_encrypted": b"sealed"}


def test_a_stored_password_cannot_be_kept_without_a_user() -> None:
    problem = problem_of(parse_check_write(dict(HTTP)), before=STORED)
    assert problem.errors == [{"field": "basic_auth_user", "message": STORED_PASSWORD_NEEDS_USER}]
    # Keeping it with its user, clearing it, or turning the check into another type is fine.
    for body in (HTTP | {"basic_auth_user": "ops"}, HTTP | {"basic_auth_pass": None}, dict(TCP)):
        assert parse_check_write(body).checked_against(record(HOST), record(STORED))
    assert parse_check_write(dict(HTTP)).checked_against(record(HOST), record({"basic_auth_pass_encrypted": None}))


# ---- any document -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(
    ["name", "check_type", "url", "port", "address", "service_name", "expected_status", "method", "enabled",
     "interval_seconds", "timeout_seconds", "basic_auth_user", "basic_auth_pass", "max_latency_ms", "id"]
)  # fmt: skip
documents = st.dictionaries(fields, json_values | st.sampled_from(["http", "tcp", "service"]), max_size=10)


@given(st.one_of(documents, json_values))
def test_any_json_document_is_read_into_a_body_or_problems_in_words(document: object) -> None:
    request = parse_check_write(json.loads(json.dumps(document)))
    assert (request.body is None) == bool(request.errors)
    assert all(error["field"] and error["message"] for error in request.errors)
    if request.body is None:
        with pytest.raises(Problem):
            request.checked_against(record(HOST))
