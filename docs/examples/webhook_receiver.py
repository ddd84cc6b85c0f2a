"""A receiver of healthgate's webhook notifications (docs/notifications.md): verifies the Standard Webhooks signature
with the `standardwebhooks` library and drops duplicates by webhook-id.

    HEALTHGATE_WEBHOOK_SECRET=whsec_... python docs/examples/webhook_receiver.py   # listens on 127.0.0.1:9000
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def verified_event(secret: str, body: bytes, headers: Mapping[str, str], seen: set[str]) -> dict[str, Any] | None:
    """The CloudEvent of a delivery whose signature is valid, or None for a delivery seen before (healthgate
    delivers at least once: the same webhook-id may come again). Raises WebhookVerificationError for a bad
    signature or a timestamp more than 5 minutes off."""
    Webhook(secret).verify(body, dict(headers))
    webhook_id = headers["webhook-id"]
    if webhook_id in seen:
        return None
    seen.add(webhook_id)
    event: dict[str, Any] = json.loads(body)
    return event


def application(secret: str) -> web.Application:
    seen: set[str] = set()  # a real receiver keeps these in its database, for longer than healthgate retries (24 h)

    async def receive(request: web.Request) -> web.Response:
        try:
            event = verified_event(secret, await request.read(), request.headers, seen)
        except WebhookVerificationError:
            return web.Response(status=400, text="bad signature")
        if event is not None:
            print(event["type"], event["data"])
        return web.Response(status=204)  # any 2xx: delivered

    app = web.Application()
    app.router.add_post("/healthgate", receive)
    return app


if __name__ == "__main__":
    web.run_app(application(os.environ["HEALTHGATE_WEBHOOK_SECRET"]), host="127.0.0.1", port=9000)
