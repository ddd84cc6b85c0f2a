"""The basic-auth password: encrypted at rest, bound to its check, never shown anywhere."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from shared.crypto import DecryptionError, SecretBox, load_or_create_key
from tests.support.messages import EventCapture
from tests.support.nginx import BASIC_AUTH_PASSWORD, BASIC_AUTH_USER, NginxServer
from tests.support.processes import ServiceProcess


async def create_host(admin: httpx.AsyncClient, group: str = "web") -> str:
    response = await admin.post("/api/v1/hosts", json={"name": f"host-{uuid.uuid4().hex[:8]}", "group": group})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def http_check(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "check_type": "http", "url": "https://127.0.0.1:8443/health", **fields}


async def test_password_never_leaves_the_service(
    admin: httpx.AsyncClient, db: asyncpg.Connection, events: EventCapture, api: ServiceProcess, key_file: Path
) -> None:
    first, second = f"first-{uuid.uuid4().hex}", f"second-{uuid.uuid4().hex}"
    host_id = await create_host(admin)
    seen: list[str] = []

    created = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks",
        json=http_check("login", basic_auth_user="monitor", basic_auth_pass=first),
    )
    assert created.status_code == 201, created.text
    check = created.json()
    assert "basic_auth_pass" not in check and check["basic_auth_pass_set"] is True
    check_url = f"/api/v1/hosts/{host_id}/health-checks/{check['id']}"
    seen.append(created.text)

    # PUT without the password keeps it; a new one replaces it; null clears it.
    kept = await admin.put(check_url, json=http_check("login", basic_auth_user="monitor", timeout_seconds=3))
    assert kept.status_code == 200 and kept.json()["basic_auth_pass_set"] is True
    stored = await db.fetchval(
        "SELECT basic_auth_pass_encrypted FROM health_checks WHERE id = $1", uuid.UUID(check["id"])
    )
    secrets = SecretBox(load_or_create_key(key_file))
    assert secrets.decrypt(stored, uuid.UUID(check["id"])) == first
    assert first.encode() not in stored

    replaced = await admin.put(check_url, json=http_check("login", basic_auth_user="monitor", basic_auth_pass=second))
    assert replaced.status_code == 200 and replaced.json()["basic_auth_pass_set"] is True
    stored = await db.fetchval(
        "SELECT basic_auth_pass_encrypted FROM health_checks WHERE id = $1", uuid.UUID(check["id"])
    )
    assert secrets.decrypt(stored, uuid.UUID(check["id"])) == second

    # A rejected request that carried the password does not echo it either.
    rejected = await admin.put(check_url, json=http_check("login", basic_auth_pass=first, port=5))
    assert rejected.status_code == 422
    seen.append(rejected.text)

    cleared = await admin.put(check_url, json=http_check("login", basic_auth_user="monitor", basic_auth_pass=None))
    assert cleared.status_code == 200 and cleared.json()["basic_auth_pass_set"] is False
    assert (
        await db.fetchval("SELECT basic_auth_pass_encrypted FROM health_checks WHERE id = $1", uuid.UUID(check["id"]))
        is None
    )

    for path in (check_url, f"/api/v1/hosts/{host_id}/health-checks", "/api/v1/audit?limit=500"):
        seen.append((await admin.get(path)).text)
    seen += [kept.text, replaced.text, cleared.text]

    await events.wait_for("check.config.updated", count=3)
    audit = await admin.get("/api/v1/audit?limit=500")
    changes = [entry["changes"] for entry in audit.json()["items"] if entry["entity_id"] == check["id"]]
    assert {"basic_auth_pass": "<changed>"}.items() <= changes[-1].items()  # the create
    assert sum(1 for change in changes if change.get("basic_auth_pass") == "<changed>") == 3  # create, replace, clear

    everything = "\n".join(seen) + "\n".join(event.body.decode() for event in events.events) + api.log_text()
    for password in (first, second):
        assert password not in everything


async def test_ciphertext_moved_to_another_check_does_not_decrypt(
    admin: httpx.AsyncClient, db: asyncpg.Connection, key_file: Path
) -> None:
    host_id = await create_host(admin)
    ids = []
    for name in ("a", "b"):
        response = await admin.post(
            f"/api/v1/hosts/{host_id}/health-checks",
            json=http_check(name, basic_auth_user="monitor", basic_auth_pass=f"secret-{name}"),
        )
        ids.append(uuid.UUID(response.json()["id"]))
    secrets = SecretBox(load_or_create_key(key_file))
    stolen = await db.fetchval("SELECT basic_auth_pass_encrypted FROM health_checks WHERE id = $1", ids[0])
    await db.execute("UPDATE health_checks SET basic_auth_pass_encrypted = $1 WHERE id = $2", stolen, ids[1])
    moved = await db.fetchval("SELECT basic_auth_pass_encrypted FROM health_checks WHERE id = $1", ids[1])
    with pytest.raises(DecryptionError):
        secrets.decrypt(moved, ids[1])
    assert secrets.decrypt(moved, ids[0]) == "secret-a"


def test_each_encryption_uses_a_fresh_nonce() -> None:
    box = SecretBox(bytes(32))
    check_id = uuid.uuid4()
    first, second = box.encrypt("same", check_id), box.encrypt("same", check_id)
    assert first[:12] != second[:12] and first != second
    assert box.decrypt(first, check_id) == box.decrypt(second, check_id) == "same"


def test_another_key_does_not_decrypt() -> None:
    check_id = uuid.uuid4()
    sealed = SecretBox(bytes(32)).encrypt("pw", check_id)
    with pytest.raises(DecryptionError):
        SecretBox(bytes([1]) * 32).decrypt(sealed, check_id)


# ---- a PUT and the stored password (CONTRACT §3: on PUT omitted = keep, null = clear) -------------------------


async def test_a_put_keeps_the_password_unless_it_says_null_and_never_drops_it_silently(
    admin: httpx.AsyncClient, db: asyncpg.Connection, nginx: NginxServer, poller: ServiceProcess, key_file: Path
) -> None:
    """A password is kept by a PUT that omits it, cleared only by null; a PUT that drops the user of a stored
    password without saying null is a 422 naming basic_auth_user (with the body's other problems) and changes
    nothing; the real target (nginx's basic auth) keeps accepting the kept password."""
    host_id = await create_host(admin)
    body = {"name": "login", "check_type": "http", "url": nginx.http_url("/basic"), "interval_seconds": 3600}
    with_auth = body | {"basic_auth_user": BASIC_AUTH_USER, "basic_auth_pass": BASIC_AUTH_PASSWORD}
    created = await admin.post(f"/api/v1/hosts/{host_id}/health-checks", json=with_auth)
    assert created.status_code == 201, created.text
    check_id = created.json()["id"]
    check_url = f"/api/v1/hosts/{host_id}/health-checks/{check_id}"
    secrets = SecretBox(load_or_create_key(key_file))

    async def stored() -> tuple[str | None, str | None]:
        row = await db.fetchrow(
            "SELECT basic_auth_user, basic_auth_pass_encrypted FROM health_checks WHERE id = $1", uuid.UUID(check_id)
        )
        encrypted = row["basic_auth_pass_encrypted"]
        return row["basic_auth_user"], None if encrypted is None else secrets.decrypt(encrypted, uuid.UUID(check_id))

    async def run_now() -> dict[str, object]:
        response = await admin.post(f"{check_url}/test")
        assert response.status_code == 200, response.text
        result: dict[str, object] = response.json()
        return result

    assert (await run_now())["healthy"] is True

    # Dropping the user (the password omitted, or the user null) is refused, listed with every other problem.
    for dropped in (body, body | {"basic_auth_user": None}, body | {"timeout_seconds": 3}):
        refused = await admin.put(check_url, json=dropped)
        assert refused.status_code == 422, refused.text
        (error,) = [error for error in refused.json()["errors"] if error["field"] == "basic_auth_user"]
        assert "basic_auth_pass: null" in error["message"] and "user" in error["message"]
    several = await admin.put(check_url, json=body | {"interval_seconds": 5, "expected_status": "600"})
    assert several.status_code == 422
    assert {error["field"] for error in several.json()["errors"]} == {
        "basic_auth_user", "interval_seconds", "expected_status",
    }  # fmt: skip
    assert await stored() == (BASIC_AUTH_USER, BASIC_AUTH_PASSWORD)
    assert (await admin.get(check_url)).json()["updated_at"] == created.json()["updated_at"]

    # The user with the password omitted keeps it: nginx still lets the check in.
    kept = await admin.put(check_url, json=body | {"basic_auth_user": BASIC_AUTH_USER, "timeout_seconds": 3})
    assert kept.status_code == 200, kept.text
    assert kept.json()["basic_auth_pass_set"] is True and kept.json()["basic_auth_user"] == BASIC_AUTH_USER
    assert await stored() == (BASIC_AUTH_USER, BASIC_AUTH_PASSWORD)
    assert (await run_now())["healthy"] is True

    # null clears it, with or without the user; then a PUT with the user alone does not bring it back.
    cleared = await admin.put(check_url, json=body | {"basic_auth_pass": None})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["basic_auth_pass_set"] is False and cleared.json()["basic_auth_user"] is None
    assert await stored() == (None, None)
    assert (await admin.put(check_url, json=body)).status_code == 200  # nothing stored: nothing to keep
    again = await admin.put(check_url, json=body | {"basic_auth_user": BASIC_AUTH_USER})
    assert again.status_code == 200 and again.json()["basic_auth_pass_set"] is False
    result = await run_now()
    assert result["healthy"] is False and "401" in str(result["detail"])

    # A new password with the user; null with the user clears the password and keeps the user.
    replaced = await admin.put(check_url, json=with_auth)
    assert replaced.status_code == 200 and replaced.json()["basic_auth_pass_set"] is True
    assert (await run_now())["healthy"] is True
    user_only = await admin.put(check_url, json=with_auth | {"basic_auth_pass": None})
    assert user_only.status_code == 200 and user_only.json()["basic_auth_pass_set"] is False
    assert await stored() == (BASIC_AUTH_USER, None)

    # Changing the type away from http drops every http field, the password included, without a 422.
    await admin.put(check_url, json=with_auth)
    as_tcp = await admin.put(check_url, json={"name": "login", "check_type": "tcp", "port": 9, "address": "127.0.0.1"})
    assert as_tcp.status_code == 200, as_tcp.text
    assert await stored() == (None, None)
    back = await admin.put(check_url, json=body | {"basic_auth_user": BASIC_AUTH_USER})
    assert back.status_code == 200 and back.json()["basic_auth_pass_set"] is False
