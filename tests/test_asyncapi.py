"""The AsyncAPI document of the events: up to date with the models, complete, and self-consistent."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from shared.asyncapi import REGENERATE_COMMAND, build_asyncapi, channel_id, render
from shared.events import (
    CLOUDEVENTS_CONTENT_TYPE,
    INBOUND_EVENTS,
    OUTBOUND_EVENTS,
    CheckConfigChanged,
    CheckResult,
    CheckResultView,
    CheckStatusChanged,
    CheckSummary,
    CheckView,
    EventModel,
    HostStatusChanged,
    JobCancel,
    JobCancelled,
    JobFailed,
    JobFinished,
    JobHalted,
    JobReleased,
    JobResumed,
    JobStart,
    JobVerificationFailed,
    JobVerified,
    JobWaiting,
    decode_event,
    encode_cloudevent,
)

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"
ALL_EVENTS = {**INBOUND_EVENTS, **OUTBOUND_EVENTS}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_asyncapi()


def test_checked_in_document_is_up_to_date(document: dict[str, Any]) -> None:
    assert DOCUMENT_PATH.exists(), f"docs/asyncapi.json is missing; generate it with `{REGENERATE_COMMAND}`"
    checked_in = DOCUMENT_PATH.read_text(encoding="utf-8")
    assert checked_in == render(document), (
        f"docs/asyncapi.json is out of date with shared/events.py; regenerate it with `{REGENERATE_COMMAND}`"
    )


def test_document_is_asyncapi_3_with_info(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "healthgate"
    assert document["info"]["version"] and document["info"]["description"]
    assert document["defaultContentType"] == CLOUDEVENTS_CONTENT_TYPE


@pytest.mark.parametrize("routing_key", list(ALL_EVENTS))
def test_every_routing_key_has_a_channel_message_and_operation(document: dict[str, Any], routing_key: str) -> None:
    name = channel_id(routing_key)
    channel = document["channels"][name]
    assert channel["address"] == routing_key
    assert channel["bindings"]["amqp"]["is"] == "routingKey"
    assert channel["bindings"]["amqp"]["exchange"] == {
        "name": "healthgate", "type": "topic", "durable": True, "autoDelete": False,
    }  # fmt: skip
    assert channel["messages"] == {name: {"$ref": f"#/components/messages/{name}"}}

    message = document["components"]["messages"][name]
    assert message["contentType"] == CLOUDEVENTS_CONTENT_TYPE
    model = ALL_EVENTS[routing_key]
    data_ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    if routing_key in INBOUND_EVENTS:
        envelope, bare = message["payload"]["oneOf"]
        assert bare == data_ref
    else:
        envelope = message["payload"]
        assert envelope["properties"]["type"]["const"] == f"healthgate.{routing_key}"
    assert envelope["properties"]["data"] == data_ref
    assert {"specversion", "id", "source", "type", "data"} <= set(envelope["required"])
    if routing_key.startswith("job."):
        assert message["correlationId"] == {"$ref": "#/components/correlationIds/jobId"}
    else:
        assert "correlationId" not in message

    action = "receive" if routing_key in INBOUND_EVENTS else "send"
    operations = [op for op in document["operations"].values() if op["channel"] == {"$ref": f"#/channels/{name}"}]
    assert len(operations) == 1, operations
    assert operations[0]["action"] == action
    assert operations[0]["messages"] == [{"$ref": f"#/channels/{name}/messages/{name}"}]


def test_no_channel_or_operation_without_an_event(document: dict[str, Any]) -> None:
    assert {channel["address"] for channel in document["channels"].values()} == set(ALL_EVENTS)
    assert len(document["operations"]) == len(ALL_EVENTS)
    assert len(document["components"]["messages"]) == len(ALL_EVENTS)


def test_exchange_name_is_a_parameter() -> None:
    document = build_asyncapi(exchange="other")
    assert {channel["bindings"]["amqp"]["exchange"]["name"] for channel in document["channels"].values()} == {"other"}


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(document: dict[str, Any], ref: str) -> object:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: object = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            assert token in node, f"{ref} does not resolve: no {token!r}"
            node = node[token]
        else:
            assert isinstance(node, list) and token.isdigit() and int(token) < len(node), f"{ref} does not resolve"
            node = node[int(token)]
    return node


def test_every_ref_resolves_inside_the_document(document: dict[str, Any]) -> None:
    refs = set(_refs(document))
    assert refs
    for ref in sorted(refs):
        assert isinstance(_resolve(document, ref), dict), ref
    assert not any("$defs" in json.dumps(schema) for schema in document["components"]["schemas"].values())


# ---- the schemas describe the messages healthgate really sends and accepts ---------------------

NOW = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC)
HOST_ID = uuid.UUID("35958d0d-0910-45bc-971f-5397dd9f1dfe")
CHECK_ID = uuid.UUID("0b6f8c1e-3c1d-4a55-9f0e-2d4c6b7a8e91")
SUMMARY = CheckSummary(check_id=CHECK_ID, name="homepage", healthy=True, detail="HTTP 200", checked_at=NOW)
CHECK = CheckView(
    id=CHECK_ID, host_id=HOST_ID, name="homepage", check_type="http", enabled=True, critical=True,
    interval_seconds=60, timeout_seconds=10, failures_before_unhealthy=1, successes_before_healthy=1,
    url="https://web-1.example.com/healthz", method="GET", expected_status="2xx", status="healthy",
    last_result=CheckResultView(healthy=True, reason="ok", detail="HTTP 200", latency_ms=12.5, checked_at=NOW),
    created_at=NOW, updated_at=NOW,
)  # fmt: skip
SAMPLES: dict[str, EventModel] = {
    "job.start": JobStart(job_id="patch-1", host_id=HOST_ID, window_ends_at=NOW),
    "job.cancel": JobCancel(job_id="patch-1", host_id=HOST_ID),
    "job.waiting": JobWaiting(job_id="patch-1", host_id=HOST_ID, window_ends_at=NOW, failing_checks=[SUMMARY]),
    "job.released": JobReleased(job_id="patch-1", host_id=HOST_ID, released_at=NOW, waited_seconds=1.5, checks=[]),
    "job.failed": JobFailed(
        job_id="patch-1", host_id=HOST_ID, failed_at=NOW, reason="overridden", detail="failed by alice: no",
        checks=[SUMMARY], overridden_by="alice", override_reason="no",
    ),
    "job.cancelled": JobCancelled(job_id="patch-1", host_id=HOST_ID, cancelled_at=NOW),
    "job.finished": JobFinished(job_id="patch-1", host_id=HOST_ID, outcome="succeeded", detail="patched in 42 s"),
    "job.verified": JobVerified(job_id="patch-1", host_id=HOST_ID, verified_at=NOW, outcome="succeeded", checks=[]),
    "job.verification_failed": JobVerificationFailed(
        job_id="patch-1", host_id=HOST_ID, failed_at=NOW, outcome=None, detail="web: HTTP 503", checks=[SUMMARY]
    ),
    "job.halted": JobHalted(
        job_id="patch-1", at=NOW, reason="max_failed_hosts", failed_hosts=[HOST_ID], detail="2 hosts failed", by=None
    ),
    "job.resumed": JobResumed(job_id="patch-1", at=NOW, detail="fixed the patch", by="alice"),
    "check.result": CheckResult(
        check_id=CHECK_ID, host_id=HOST_ID, healthy=False, reason="timeout", status="unhealthy",
        detail="no answer within 10 s", latency_ms=10000.0, checked_at=NOW,
    ),
    "check.status_changed": CheckStatusChanged(
        check_id=CHECK_ID, host_id=HOST_ID, previous="healthy", current="unhealthy", detail="HTTP 503", at=NOW
    ),
    "host.status_changed": HostStatusChanged(host_id=HOST_ID, previous="healthy", current="degraded", at=NOW),
    "check.config.created": CheckConfigChanged(check=CHECK),
    "check.config.updated": CheckConfigChanged(check=CHECK),
    "check.config.deleted": CheckConfigChanged(check=CHECK),
}  # fmt: skip


def _payload_validator(document: dict[str, Any], routing_key: str) -> jsonschema.Draft7Validator:
    registry = Registry().with_resource("urn:asyncapi", Resource.from_contents(document, DRAFT7))
    schema = {"$ref": f"urn:asyncapi#/components/messages/{channel_id(routing_key)}/payload"}
    return jsonschema.Draft7Validator(schema, registry=registry, format_checker=jsonschema.FormatChecker())


def test_samples_cover_every_event() -> None:
    assert set(SAMPLES) == set(ALL_EVENTS)
    assert all(isinstance(SAMPLES[key], model) for key, model in ALL_EVENTS.items())


@pytest.mark.parametrize("routing_key", list(OUTBOUND_EVENTS))
def test_sent_cloudevents_match_their_payload_schema(document: dict[str, Any], routing_key: str) -> None:
    _, body = encode_cloudevent(routing_key, SAMPLES[routing_key], source="/healthgate/test", time=NOW)
    _payload_validator(document, routing_key).validate(json.loads(body))


@pytest.mark.parametrize("routing_key", list(INBOUND_EVENTS))
def test_both_inbound_forms_match_the_payload_schema_and_are_accepted(
    document: dict[str, Any], routing_key: str
) -> None:
    model = INBOUND_EVENTS[routing_key]
    data = SAMPLES[routing_key].model_dump(mode="json")
    structured = {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "/scheduler", "type": f"healthgate.{routing_key}",
        "datacontenttype": "application/json", "data": data,
    }  # fmt: skip
    validator = _payload_validator(document, routing_key)
    for form in (structured, data):
        validator.validate(form)
        assert decode_event(json.dumps(form).encode(), model) == SAMPLES[routing_key]
    assert not validator.is_valid({**data, "host_id": "not-a-uuid"})
