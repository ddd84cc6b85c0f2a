"""services/api/dashboard/views.py, its pure parts: a check form's fields as the API's body (`check_document`), a
form shown again as it was sent (`submitted_values`), a stored check in its edit form (`check_form_values`) and the
API's messages by field (`_errors`). The pages themselves are tested in a real browser (tests/test_dashboard.py)."""

from __future__ import annotations

import datetime as dt
import uuid

from starlette.datastructures import FormData

from services.api.dashboard.views import _errors, check_document, check_form_values, submitted_values
from services.api.problems import Problem
from shared.events import CheckView

COMMON = [("csrf", "x"), ("name", "check"), ("enabled", "on"), ("critical", "on")]


def form(check_type: str, *fields: tuple[str, str]) -> FormData:
    """What a browser sends with scripts off: every type's fields, the other types' ones empty."""
    empty = [
        (name, "") for name in ("port", "address", "url", "dns_name", "dns_server", "expected_values", "condition")
    ]
    sent = dict(empty) | dict(fields)
    return FormData([*COMMON, ("check_type", check_type), *sent.items()])


def test_grpc_and_tcp_share_the_port_and_address_fields_and_grpc_takes_its_own() -> None:
    grpc = check_document(
        form("grpc", ("port", "50051"), ("address", "127.0.0.1"), ("grpc_service", "app.Health"), ("tls", "on")),
        editing=False,
    )
    assert grpc == {
        "name": "check", "check_type": "grpc", "enabled": True, "critical": True, "port": "50051",
        "address": "127.0.0.1", "grpc_service": "app.Health", "tls": True, "ignore_cert_errors": False,
    }  # fmt: skip
    tcp = check_document(form("tcp", ("port", "22"), ("tls", "on"), ("ignore_cert_errors", "on")), editing=False)
    assert tcp == {"name": "check", "check_type": "tcp", "enabled": True, "critical": True, "port": "22"}


def test_dns_takes_its_answers_one_per_line_without_empty_ones() -> None:
    answers = "  v=spf1 -all \r\n\r\nmail.example.net.\n   \n"
    dns = check_document(
        form("dns", ("dns_name", "example.net"), ("record_type", "TXT"), ("expected_values", answers),
             ("dns_server", "127.0.0.1:5353"), ("max_latency_ms", "500")),
        editing=False,
    )  # fmt: skip
    assert dns == {
        "name": "check", "check_type": "dns", "enabled": True, "critical": True, "max_latency_ms": "500",
        "dns_name": "example.net", "record_type": "TXT", "expected_values": ["v=spf1 -all", "mail.example.net."],
        "dns_server": "127.0.0.1:5353",
    }  # fmt: skip
    # No answers, no server: both left out, so that a PUT clears them and the defaults apply.
    bare = check_document(form("dns", ("dns_name", "example.net"), ("expected_values", "\r\n  ")), editing=True)
    assert "expected_values" not in bare and "dns_server" not in bare and bare["record_type"] == "A"


def test_http_takes_its_condition_with_lf_line_breaks_and_its_certificate_limit() -> None:
    http = check_document(
        form("http", ("url", "https://127.0.0.1/"), ("condition", "status == 200 &&\r\n  json.ok"),
             ("min_cert_days", "0"), ("ignore_cert_errors", "on")),
        editing=False,
    )  # fmt: skip
    assert http["condition"] == "status == 200 &&\n  json.ok"
    assert http["min_cert_days"] == "0" and http["ignore_cert_errors"] is True
    plain = check_document(form("http", ("url", "https://127.0.0.1/")), editing=False)
    assert "condition" not in plain and "min_cert_days" not in plain


def test_a_form_shown_again_keeps_the_boxes_of_its_type_as_sent() -> None:
    sent = FormData([("name", "check"), ("check_type", "grpc"), ("port", "1")])
    values = submitted_values(sent)
    assert {box: values[box] for box in ("enabled", "critical", "tls", "ignore_cert_errors")} == dict.fromkeys(
        ("enabled", "critical", "tls", "ignore_cert_errors"), "off"
    )
    assert "follow_redirects" not in values  # an http box: its default, should the type be changed
    checked = submitted_values(FormData([("check_type", "http"), ("enabled", "on"), ("ignore_cert_errors", "on")]))
    assert (checked["enabled"], checked["ignore_cert_errors"], checked["follow_redirects"]) == ("on", "on", "off")


def test_a_stored_dns_check_shows_its_answers_one_per_line() -> None:
    moment = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    view = CheckView(
        id=uuid.uuid4(), host_id=uuid.uuid4(), name="dns", check_type="dns", enabled=True, critical=True,
        interval_seconds=60, timeout_seconds=5, failures_before_unhealthy=1, successes_before_healthy=1,
        dns_name="example.net", record_type="MX", expected_values=["10 mail.example.net.", "mx2.example.net"],
        status="unknown", last_result=None, created_at=moment, updated_at=moment,
    )  # fmt: skip
    values = check_form_values(view)
    assert values["expected_values"] == "10 mail.example.net.\nmx2.example.net"
    assert (values["dns_name"], values["record_type"]) == ("example.net", "MX")


def test_messages_by_field_with_an_expected_values_problem_named_by_its_place() -> None:
    problem = Problem(
        422, "invalid fields", errors=[
            {"field": "condition", "message": "does not compile: line 1, column 8: Syntax error"},
            {"field": "expected_values.2", "message": "String should have at most 500 characters"},
            {"field": "expected_values", "message": "List should have at most 20 items"},
            {"field": "expected_values.0", "message": "control characters are not allowed"},
        ],
    )  # fmt: skip
    assert _errors(problem) == {
        "condition": "does not compile: line 1, column 8: Syntax error",
        "expected_values": "value 3: String should have at most 500 characters; List should have at most 20 items; "
        "value 1: control characters are not allowed",
    }
    assert _errors(Problem(409, "this host already has a check named 'x'")) == {
        "form": "this host already has a check named 'x'"
    }
