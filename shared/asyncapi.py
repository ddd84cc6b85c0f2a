"""The AsyncAPI 3.0 document of every event (CONTRACT §5), generated from the models in `shared.events`.

Regenerate the checked-in copy after changing an event model:

    python -m shared.asyncapi > docs/asyncapi.json

One channel per routing key (its address), all on the one durable topic exchange. Each message's
payload is the CloudEvents 1.0 structured-mode envelope whose `data` is the event model's JSON schema;
inbound messages may also be the bare data object. healthgate `receive`s the inbound events and
`send`s the outbound ones.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import sys
from typing import Any

from shared.events import (
    CLOUDEVENTS_CONTENT_TYPE,
    EVENT_TYPE_PREFIX,
    INBOUND_EVENTS,
    OUTBOUND_EVENTS,
    CloudEvent,
    EventModel,
)

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
DEFAULT_EXCHANGE = "healthgate"
SCHEMA_REF = "#/components/schemas/{model}"
REGENERATE_COMMAND = "python -m shared.asyncapi > docs/asyncapi.json"

# When each event is published (outbound) or what it asks for (inbound): CONTRACT §5 in prose.
EVENT_DESCRIPTIONS: dict[str, str] = {
    "job.start": (
        "A job is about to start on a host. The gate answers with exactly one decision per (job_id, host_id): "
        "job.released, or job.failed; job.waiting first when the host's gating checks are not all healthy."
    ),
    "job.cancel": (
        "Withdraws a waiting job host. The gate answers job.cancelled; a job host already decided is left alone."
    ),
    "job.finished": (
        "The executor is done with a released host (outcome succeeded or failed). The gate verifies the host: "
        "job.verified or job.verification_failed, once. For a job host that is not released (a duplicate, an "
        "unknown job, a waiting job) it changes nothing; outcome failed counts toward the job's max_failed_hosts."
    ),
    "job.verified": (
        "After job.finished (or the window's end, outcome null), every gating check that was healthy at release is "
        "healthy again, and has been for the group's stable_seconds since the patch finished."
    ),
    "job.verification_failed": (
        "The host did not become healthy (and stable) within verify_delay_seconds + verify_timeout_seconds after "
        "job.finished; detail names each failing check."
    ),
    "job.halted": (
        "The job stops releasing hosts: more hosts failed than its max_failed_hosts (reason max_failed_hosts), or "
        "an admin halted it (reason manual, by = the token's name). Its waiting hosts fail with job_halted."
    ),
    "job.resumed": "An admin let a halted job go on: new job.start messages of the job are gated again.",
    "job.waiting": (
        "A job host must wait: some gating checks are failing, stale or have no result yet. Sent at most once "
        "per job host; failing_checks names them."
    ),
    "job.released": (
        "The job may start on the host: all gating checks are healthy by a result no older than their interval, "
        "or the host is unknown or has no enabled critical checks (checks is empty then), or an admin released "
        "it by override (overridden_by and override_reason are set)."
    ),
    "job.failed": (
        "The job must not start on the host. reason window_closed: the maintenance window closed (or had already "
        "closed) while checks were not healthy; invalid_request: the job.start was malformed (job_id is then the "
        "job_id as received, whatever it holds); unknown_host: the host is not known to healthgate and "
        "HEALTHGATE_GATE_UNKNOWN_HOST is fail; overridden: an admin failed it by override; no_checks: the host has no "
        "enabled critical checks and its group's policy says fail; job_halted: the job is halted."
    ),
    "job.cancelled": "A waiting job host was cancelled by job.cancel.",
    "check.result": "Every stored result of a health check, with the check's status after it.",
    "check.status_changed": "A check's status flipped (healthy, unhealthy, unknown).",
    "host.status_changed": "A host's health_check_status flipped.",
    "check.config.created": "A health check was created over the API (without secrets).",
    "check.config.updated": "A health check was changed over the API (without secrets).",
    "check.config.deleted": "A health check was deleted over the API; check is its last state (without secrets).",
}

DOCUMENT_DESCRIPTION = """\
healthgate holds patch and deployment jobs until a host's health checks pass. Other services publish \
`job.start` and `job.cancel`; healthgate publishes job decisions, check results and status changes.

All messages go through one durable topic exchange (`HEALTHGATE_EXCHANGE`, default `healthgate`); the \
channel address is the routing key, and the routing key, not the CloudEvent `type`, says what a message is.

- Outbound messages are CloudEvents 1.0 in structured JSON mode (`content_type` \
`application/cloudevents+json`), persistent, published with confirms, with AMQP `message_id` = CloudEvent \
`id` and, for job events, `correlation_id` = `job_id`.
- Inbound messages may be structured CloudEvents or the bare `data` object as JSON.
- Delivery is at least once: an event may arrive twice, always with the same id. Job decisions have \
deterministic ids, so a repeated decision has the same id.
- Messages that cannot be processed end in the durable queue `<exchange>.dead` with their original routing \
key and body.

Generated from shared/events.py; see docs/events.md."""


def channel_id(routing_key: str) -> str:
    """`check.status_changed` -> `checkStatusChanged`."""
    words = routing_key.replace("_", ".").split(".")
    return words[0] + "".join(word.capitalize() for word in words[1:])


def _model_schema(model: type[EventModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """Add `model` and its nested models to `schemas`; return a reference to it."""
    schema = model.model_json_schema(ref_template=SCHEMA_REF)
    for name, definition in schema.pop("$defs", {}).items():
        _add_schema(schemas, name, definition)
    _add_schema(schemas, model.__name__, schema)
    return {"$ref": SCHEMA_REF.format(model=model.__name__)}


def _add_schema(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    if name in schemas and schemas[name] != schema:
        raise ValueError(f"two different JSON schemas are named {name!r}")
    schemas[name] = schema


def _envelope_schema(routing_key: str, data_ref: dict[str, Any], *, inbound: bool) -> dict[str, Any]:
    """The CloudEvent model's schema with `data` = the event's schema and its `type` spelled out."""
    envelope = copy.deepcopy(CloudEvent.model_json_schema(ref_template=SCHEMA_REF))
    properties = envelope["properties"]
    event_type = EVENT_TYPE_PREFIX + routing_key
    properties["id"]["description"] = "Event id; also the AMQP message_id. A redelivered event keeps its id."
    properties["source"]["description"] = "The healthgate service that published the event, e.g. /healthgate/gate."
    if inbound:
        properties["type"]["description"] = (
            f"Conventionally {event_type}; not checked: the routing key says what the message is."
        )
        properties["type"]["examples"] = [event_type]
    else:
        properties["type"] = {"const": event_type, "title": "Type", "type": "string"}
    properties["data"] = data_ref
    # specversion marks a structured CloudEvent (`decode_event`), and healthgate always sends it and
    # datacontenttype; inbound, the gate reads only data, and `time` is optional as in CloudEvents.
    required = ["specversion", *envelope["required"]]
    if inbound:
        required.remove("time")
    else:
        required.append("datacontenttype")
    envelope["required"] = required
    envelope["title"] = f"{routing_key} CloudEvent"
    return envelope


def _amqp_channel_binding(exchange: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": exchange, "type": "topic", "durable": True, "autoDelete": False},
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def build_asyncapi(exchange: str = DEFAULT_EXCHANGE) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of every inbound and outbound event, for the named exchange."""
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    directions = [(key, model, True) for key, model in INBOUND_EVENTS.items()]
    directions += [(key, model, False) for key, model in OUTBOUND_EVENTS.items()]
    for routing_key, model, inbound in directions:
        name = channel_id(routing_key)
        data_ref = _model_schema(model, schemas)
        envelope = _envelope_schema(routing_key, data_ref, inbound=inbound)
        message: dict[str, Any] = {
            "name": name,
            "title": routing_key,
            "summary": EVENT_DESCRIPTIONS[routing_key],
            "contentType": CLOUDEVENTS_CONTENT_TYPE,
            "tags": [{"name": routing_key.split(".")[0]}],
        }
        if inbound:
            message["payload"] = {"oneOf": [envelope, data_ref]}
            message["description"] = (
                "A CloudEvents 1.0 structured-mode JSON object, or the bare data object as JSON "
                "(content_type application/json). Publish it persistent, with publisher confirms."
            )
        else:
            message["payload"] = envelope
            message["description"] = (
                "A CloudEvents 1.0 structured-mode JSON object; AMQP message_id = id, persistent (delivery_mode 2)."
            )
        if routing_key.startswith("job."):
            message["correlationId"] = {"$ref": "#/components/correlationIds/jobId"}
        messages[name] = message
        channels[name] = {
            "address": routing_key,
            "title": routing_key,
            "description": EVENT_DESCRIPTIONS[routing_key],
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": _amqp_channel_binding(exchange),
        }
        action = "receive" if inbound else "send"
        operation: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
            "summary": ("healthgate receives " if inbound else "healthgate sends ") + routing_key,
        }
        if inbound:
            operation["bindings"] = {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}}
        else:
            operation["bindings"] = {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "timestamp": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            }
        operations[action + name[0].upper() + name[1:]] = operation
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "healthgate",
            "version": importlib.metadata.version("healthgate"),
            "description": DOCUMENT_DESCRIPTION,
        },
        "defaultContentType": CLOUDEVENTS_CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ, as configured by HEALTHGATE_AMQP_URL (default amqp://guest:guest@localhost:5672/).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "messages": messages,
            "correlationIds": {
                "jobId": {
                    "description": (
                        "The AMQP message property correlation_id: the job_id (data.job_id) on every job event "
                        "healthgate sends. Optional on inbound job events."
                    ),
                    "location": "$message.header#/correlation_id",
                }
            },
        },
    }


def render(document: dict[str, Any]) -> str:
    """The document as docs/asyncapi.json holds it."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main() -> None:
    sys.stdout.write(render(build_asyncapi()))


if __name__ == "__main__":
    main()
