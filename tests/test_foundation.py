"""Settings, the key file, migrations, the CLI, health endpoints and event encoding."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from shared.crypto import KeyFileError, load_or_create_key
from shared.events import JobStart, MalformedEvent, decode_event, encode_cloudevent
from shared.schema import bundled_migrations, migrate
from shared.settings import SettingsError, load_settings
from tests.support.postgres import PostgresCluster
from tests.support.processes import ServiceProcess, free_port, start_service

HEALTHGATE = [sys.executable, "-m", "services.cli"]


def run_cli(
    *arguments: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HEALTHGATE, *arguments], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


# ---- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HEALTHGATE_POLL_INTERVAL_SECONDS", "5"),
        ("HEALTHGATE_CHECK_TIMEOUT_SECONDS", "abc"),
        ("HEALTHGATE_RESULT_RETENTION_HOURS", "-1"),
        ("HEALTHGATE_LOG_FORMAT", "xml"),
        ("HEALTHGATE_HEALTH_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-network"),
        ("HEALTHGATE_DATABASE_URL", "mysql://secret-password@db/x"),
        ("HEALTHGATE_API_PORT", "70000"),
        ("HEALTHGATE_DATABASE_URL", "postgresql://u:secret-password@127.0.0.1:abc/x"),
        ("HEALTHGATE_DATABASE_URL", "postgresql://u:secret-password@127.0.0.1:70000/x"),
        ("HEALTHGATE_AMQP_URL", "amqp://u:secret-password@127.0.0.1:0/"),
        ("HEALTHGATE_GATE_UNKNOWN_HOST", "ignore"),
        # Out of what a timestamp can be moved by (issue 10: accepted, then every evaluation failed).
        ("HEALTHGATE_GATE_RETRY_SECONDS", "1e300"),
        ("HEALTHGATE_GATE_RETRY_SECONDS", "inf"),
        ("HEALTHGATE_GATE_RETRY_SECONDS", "nan"),
        ("HEALTHGATE_RESULT_RETENTION_HOURS", "1e12"),
        ("HEALTHGATE_RESULT_RETENTION_HOURS", "inf"),
        ("HEALTHGATE_JOB_RETENTION_DAYS", "1e7"),
        ("HEALTHGATE_OUTBOX_RETENTION_HOURS", "Infinity"),
        ("HEALTHGATE_PRUNE_INTERVAL_SECONDS", "inf"),
    ],
)
def test_bad_setting_stops_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert variable in message and "\n" not in message and "secret-password" not in message


def test_service_refuses_to_start_on_a_bad_setting() -> None:
    result = run_cli("api", env={"HEALTHGATE_GATE_RETRY_SECONDS": "0"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "HEALTHGATE_GATE_RETRY_SECONDS" in result.stderr


def test_settings_defaults_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHGATE_BLOCKED_NETWORKS", "169.254.0.0/16, 10.1.2.3/32")
    monkeypatch.setenv("HEALTHGATE_RESULT_RETENTION_HOURS", "0.5")
    settings = load_settings()
    assert [str(network) for network in settings.blocked_networks] == ["169.254.0.0/16", "10.1.2.3/32"]
    assert settings.result_retention_hours == 0.5 and settings.health_port_for("gate") == 8082


# ---- key file ------------------------------------------------------------------------------------


def test_key_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "health-check.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key


@pytest.mark.parametrize("content", [b"", b"not base64!", b"c2hvcnQ=\n"])
def test_malformed_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "health-check.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="malformed"):
        load_or_create_key(path)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    "layout",
    ["{key}\r\n", "  {key}  \n\n", "\t{key}", "{head}\n{tail}\n", "{head}\r\n{tail}\r\n", "{key}"],
)
def test_a_key_with_whitespace_around_or_within_is_read(tmp_path: Path, layout: str) -> None:
    """CRLF line ends, blank lines, indentation and a key wrapped over two lines are whitespace, not key."""
    key = os.urandom(32)
    text = base64.b64encode(key).decode()
    path = tmp_path / "health-check.key"
    path.write_text(layout.format(key=text, head=text[:20], tail=text[20:]), newline="")
    assert load_or_create_key(path) == key


def test_a_key_file_created_by_many_at_once_is_one_whole_key(tmp_path: Path) -> None:
    """`healthgate up` starts the api and the poller together: each one creating the key at the same moment
    reads the same whole key (never a file still being written), and nothing else is left in the directory."""
    path = tmp_path / "keys" / "health-check.key"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        keys = list(pool.map(lambda _: load_or_create_key(path), range(64)))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert os.listdir(path.parent) == ["health-check.key"]


def test_api_with_unusable_key_stops_with_a_clear_error(tmp_path: Path, service_env: dict[str, str]) -> None:
    malformed = tmp_path / "bad.key"
    malformed.write_text("nope")
    result = run_cli("api", env=service_env | {"HEALTHGATE_KEY_FILE": str(malformed)})
    assert result.returncode == 1 and "malformed" in result.stderr and str(malformed) in result.stderr
    if os.geteuid() != 0:  # root reads any file, so unreadability cannot be shown as root
        unreadable = tmp_path / "locked.key"
        unreadable.write_text("x")
        unreadable.chmod(0)
        result = run_cli("api", env=service_env | {"HEALTHGATE_KEY_FILE": str(unreadable)})
        assert result.returncode == 1 and "cannot read" in result.stderr


# ---- migrations ----------------------------------------------------------------------------------


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [migration.version for migration in bundled_migrations()]
    assert versions == list(range(1, len(versions) + 1))


async def test_migrate_needs_no_connection_to_the_postgres_database_when_its_own_exists(
    own_postgres: PostgresCluster,
) -> None:
    """A managed PostgreSQL often lets a service's user connect to its own database only: migrate must not insist
    on `postgres` when the database is already there (deploy/kubernetes/README.md)."""
    name, role = f"tenant_{uuid.uuid4().hex[:8]}", f"tenant_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(own_postgres.url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"CREATE DATABASE {name} OWNER {role}")
        await admin.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
        dsn = urlunsplit(
            urlsplit(own_postgres.database_url(name))._replace(
                netloc=f"{role}@{urlsplit(own_postgres.url).netloc.split('@')[-1]}"
            )
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # as on such a server
            await (await asyncpg.connect(urlunsplit(urlsplit(dsn)._replace(path="/postgres")))).close()
        await migrate(dsn)
        tenant = await asyncpg.connect(dsn)
        assert await tenant.fetchval("SELECT count(*) FROM schema_migrations") == len(bundled_migrations())
        await tenant.close()
    finally:
        await admin.execute("GRANT CONNECT ON DATABASE postgres TO PUBLIC")
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_concurrent_migrate_creates_the_database_once(backing: object, session_id: str) -> None:
    name = f"healthgate_test_{session_id}_migrate"
    base = os.environ.get("HEALTHGATE_TEST_DATABASE_URL") or backing.database_url  # type: ignore[attr-defined]
    dsn = base.rsplit("/", 1)[0] + "/" + name
    processes = [
        await asyncio.create_subprocess_exec(
            *HEALTHGATE, "migrate", env={**os.environ, "HEALTHGATE_DATABASE_URL": dsn},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]  # fmt: skip
    results = [await process.communicate() for process in processes]
    try:
        assert [process.returncode for process in processes] == [0, 0, 0], results
        connection = await asyncpg.connect(dsn)
        versions = await connection.fetch("SELECT version FROM schema_migrations")
        partitions = await connection.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'check_results'::regclass"
        )
        await connection.close()
        assert len(versions) == len(bundled_migrations()) and partitions >= 8
    finally:
        admin = await asyncpg.connect(base)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# ---- CLI -----------------------------------------------------------------------------------------


def test_token_commands(service_env: dict[str, str]) -> None:
    name = f"ops-{uuid.uuid4().hex[:6]}"
    created = run_cli(
        "token", "create", "--name", name, "--role", "operator", "--group", "web", "--group", "db", env=service_env
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n" and token.startswith("hg_") and len(token) > 40
    duplicate = run_cli("token", "create", "--name", name, "--role", "viewer", env=service_env)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    listed = run_cli("token", "list", env=service_env)
    assert name in listed.stdout and "db,web" in listed.stdout and token not in listed.stdout
    assert run_cli("token", "revoke", name, env=service_env).returncode == 0
    assert name not in run_cli("token", "list", env=service_env).stdout
    assert run_cli("token", "revoke", name, env=service_env).returncode == 1
    bad_role = run_cli("token", "create", "--name", "x", "--role", "root", env=service_env)
    assert bad_role.returncode == 2


def test_up_runs_every_service_and_stops_cleanly_on_sigterm(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(
        [*HEALTHGATE, "up"], env={**os.environ, **service_env, "HEALTHGATE_API_PORT": str(port), "HEALTHGATE_HEALTH_PORT": "0"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("healthgate up did not bring the api up: " + (tmp_path / "up.log").read_text())
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(25) == 0
        assert time.monotonic() - started < 20
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


# ---- health endpoints ----------------------------------------------------------------------------


async def test_health_endpoints_and_metrics(api: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as client:
        live = await client.get("/health/live")
        assert live.status_code == 200 and live.headers["content-type"] == "application/health+json"
        for path in ("/health/ready", "/health"):
            ready = await client.get(path)
            body = ready.json()
            assert ready.status_code == 200 and body["status"] == "pass"
            assert {"postgresql:responseTime", "rabbitmq:responseTime"} <= body["checks"].keys()
        metrics = await client.get("/metrics")
        assert "healthgate_http_requests_total" in metrics.text and "healthgate_outbox_pending" in metrics.text


def test_health_details_only_for_allowed_networks(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = service_env | {"HEALTHGATE_API_PORT": str(port), "HEALTHGATE_HEALTH_ALLOWED_NETWORKS": "10.0.0.0/8"}
    api = start_service("api", env, tmp_path / "api.log", port=port)
    try:
        body = httpx.get(f"{api.base_url}/health/ready").json()
        assert body == {"status": "pass"}
    finally:
        api.stop()


def test_api_starts_while_the_database_is_down_and_reports_it(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    closed = free_port()
    env = service_env | {
        "HEALTHGATE_API_PORT": str(port),
        "HEALTHGATE_DATABASE_URL": f"postgresql://postgres:hunter2@127.0.0.1:{closed}/healthgate",
    }
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*HEALTHGATE, "api"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                live = httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        assert live.status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["checks"]["postgresql:responseTime"][0]["status"] == "fail"
        hosts = httpx.get(f"http://127.0.0.1:{port}/api/v1/hosts", headers={"Authorization": "Bearer x"}, timeout=5)
        assert hosts.status_code == 503 and hosts.headers["content-type"] == "application/problem+json"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert "hunter2" not in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()


# ---- events --------------------------------------------------------------------------------------


def test_inbound_events_accept_cloudevents_or_bare_data() -> None:
    data = {"job_id": "j-1", "host_id": str(uuid.uuid4()), "window_ends_at": "2030-01-01T00:00:00Z"}
    bare = decode_event(json.dumps(data).encode(), JobStart)
    wrapped = decode_event(
        json.dumps({"specversion": "1.0", "id": "1", "type": "x", "source": "/s", "data": data}).encode(), JobStart
    )
    assert bare == wrapped and bare.job_id == "j-1"
    for body in (
        b"{",
        b"[]",
        b'{"specversion": "1.0", "data": 3}',
        json.dumps(data | {"window_ends_at": "soon"}).encode(),
    ):
        with pytest.raises(MalformedEvent):
            decode_event(body, JobStart)


def test_outbound_events_are_structured_cloudevents() -> None:
    from shared.events import JobCancelled

    event = JobCancelled(job_id="j", host_id=uuid.uuid4(), cancelled_at="2030-01-01T00:00:00Z")  # type: ignore[arg-type]
    event_id, body = encode_cloudevent("job.cancelled", event, source="/healthgate/gate")
    document = json.loads(body)
    assert document["specversion"] == "1.0" and document["id"] == str(event_id)
    assert document["type"] == "healthgate.job.cancelled" and document["data"]["job_id"] == "j"
    with pytest.raises(TypeError):
        encode_cloudevent("job.released", event, source="/x")
