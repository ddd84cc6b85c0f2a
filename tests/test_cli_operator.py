"""The operator commands over the HTTP API (CONTRACT §1, issue 15): `healthgate hosts|checks|jobs|groups ...` run as a
process against the session's real API (database, broker, poller and gate), `--json` equal to the API's own answer
for the same request, tables readable, exit statuses 0/1/2/3, and the token never printed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from tests.support.cli_forks import CliForks
from tests.support.messages import Publisher
from tests.support.processes import ServiceProcess, free_port
from tests.support.tokens import TokenFactory

HEALTHGATE = [sys.executable, "-m", "services.cli"]


class Cli:
    """Runs `healthgate ...` against the API with a token (HEALTHGATE_URL, HEALTHGATE_TOKEN)."""

    def __init__(self, base_url: str, token: str | None, forks: CliForks) -> None:
        self.forks = forks
        self.env = {**os.environ, "HEALTHGATE_URL": base_url}
        self.env.pop("HEALTHGATE_TOKEN", None)
        if token:
            self.env["HEALTHGATE_TOKEN"] = token
        self.token = token

    def run(self, *arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # `python -m services.cli ARGUMENTS` as a fork of one process that imported it (tests/support/cli_forks.py):
        # the same code path from main(), without a second of Python start-up per command.
        completed = self.forks.run(
            *arguments, env=self.env, timeout=120, stdin=None if stdin is None else stdin.encode()
        )
        if self.token:
            assert self.token not in completed.stdout + completed.stderr
        return completed

    def ok(self, *arguments: str, stdin: str | None = None) -> str:
        completed = self.run(*arguments, stdin=stdin)
        assert completed.returncode == 0, (arguments, completed.stdout, completed.stderr)
        return completed.stdout

    def json(self, *arguments: str) -> Any:
        return json.loads(self.ok(*arguments, "--json"))


def one_line(stderr: str, *fragments: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


async def same_as_api(admin: httpx.AsyncClient, path: str, cli: Cli, *arguments: str) -> Any:
    """The CLI's `--json` answer, asserted equal to the API's for `path` just before or just after."""
    before = (await admin.get(path)).json()
    answer = cli.json(*arguments)
    after = (await admin.get(path)).json()
    assert answer in (before, after)
    return answer


@pytest.fixture
async def cli(api: ServiceProcess, admin: httpx.AsyncClient, cli_forks: CliForks) -> Cli:
    return Cli(api.base_url, admin.headers["Authorization"].removeprefix("Bearer "), cli_forks)


async def test_hosts_commands(cli: Cli, admin: httpx.AsyncClient) -> None:
    created = cli.json("hosts", "create", "--name", "web-1", "--group", "web", "--agent-url", "http://127.0.0.1:9/")
    assert created == (await admin.get(f"/api/v1/hosts/{created['id']}")).json()
    assert created["name"] == "web-1" and created["agent_url"] == "http://127.0.0.1:9/"
    body = json.dumps({"name": "db-1", "group": "db"})
    db_host = json.loads(cli.ok("hosts", "create", "--from-json", "-", "--json", stdin=body))
    assert db_host["group"] == "db"

    assert cli.json("hosts", "list") == (await admin.get("/api/v1/hosts")).json()
    assert cli.json("hosts", "list", "--group", "db") == (await admin.get("/api/v1/hosts?group=db")).json()
    paged = cli.json("hosts", "list", "--limit", "1")
    assert paged == (await admin.get("/api/v1/hosts?limit=1")).json() and paged["next_cursor"]
    second = cli.json("hosts", "list", "--limit", "1", "--cursor", paged["next_cursor"])
    assert [host["name"] for host in second["items"]] == ["web-1"]

    for ref in ("web-1", created["id"]):
        assert cli.json("hosts", "get", ref) == (await admin.get(f"/api/v1/hosts/{created['id']}")).json()

    updated = cli.json("hosts", "update", "web-1", "--group", "frontend", "--no-agent-url")
    assert updated == (await admin.get(f"/api/v1/hosts/{created['id']}")).json()
    assert updated["group"] == "frontend" and updated["agent_url"] is None and updated["name"] == "web-1"

    listed = cli.ok("hosts", "list")
    header, *rows = listed.splitlines()
    assert header.split()[:3] == ["NAME", "GROUP", "STATUS"]
    assert rows[0].split()[:4] == ["db-1", "db", "no_checks", "0/0"]
    assert "web-1" in rows[1] and "frontend" in rows[1] and created["id"] in rows[1]
    shown = cli.ok("hosts", "get", "web-1")
    assert "health_check_status  no_checks" in shown and f"id                   {created['id']}" in shown

    cli.ok("hosts", "delete", "web-1")
    assert (await admin.get(f"/api/v1/hosts/{created['id']}")).status_code == 404
    missing = cli.run("hosts", "get", "web-1")
    assert missing.returncode == 1
    one_line(missing.stderr, "no host 'web-1'")


async def test_checks_commands(cli: Cli, admin: httpx.AsyncClient, api: ServiceProcess, poller: ServiceProcess) -> None:
    host = (await admin.post("/api/v1/hosts", json={"name": "127.0.0.1", "group": "web"})).json()
    checks = f"/api/v1/hosts/{host['id']}/health-checks"
    live = f"{api.base_url}/health/live"
    added = cli.json(
        "checks", "add", "127.0.0.1", "--name", "homepage", "--type", "http", "--url", live,
        "--expected-status", "200", "--expected-body", "pass", "--interval-seconds", "600", "--non-critical",
    )  # fmt: skip
    assert added == (await admin.get(f"{checks}/{added['id']}")).json() | {
        key: added[key] for key in ("status", "last_result", "healthy_since", "uptime_24h", "updated_at")
    }
    assert added["expected_status"] == "200" and added["critical"] is False and added["interval_seconds"] == 600
    closed = free_port()
    tcp = cli.json(
        "checks", "add", host["id"], "--name", "port", "--type", "tcp", "--port", str(closed), "--address", "127.0.0.1"
    )
    assert tcp["check_type"] == "tcp" and tcp["port"] == closed

    # A run now: healthy → 0, unhealthy → 3 (for scripts).
    healthy = cli.run("checks", "test", "127.0.0.1", "homepage", "--json")
    assert healthy.returncode == 0, healthy.stderr
    assert json.loads(healthy.stdout)["healthy"] is True
    unhealthy = cli.run("checks", "test", "127.0.0.1", "port")
    assert unhealthy.returncode == 3, unhealthy.stderr
    assert "healthy" in unhealthy.stdout and "connect" in unhealthy.stdout

    # The session's poller may store a run between the two reads: the API's answer just before or just after.
    await same_as_api(admin, checks, cli, "checks", "list", "127.0.0.1")
    for ref in ("homepage", added["id"]):
        await same_as_api(admin, f"{checks}/{added['id']}", cli, "checks", "get", "127.0.0.1", ref)

    # update changes only what is given; PUT's other fields keep their values.
    updated = cli.json("checks", "update", "127.0.0.1", "homepage", "--expected-status", "2xx", "--disabled")
    assert updated == (await admin.get(f"{checks}/{added['id']}")).json()
    assert updated["expected_status"] == "2xx" and updated["enabled"] is False
    assert updated["expected_body"] == "pass" and updated["interval_seconds"] == 600 and updated["critical"] is False
    changed_type = cli.json("checks", "update", "127.0.0.1", "port", "--type", "grpc", "--port", str(closed))
    assert changed_type["check_type"] == "grpc" and changed_type["address"] is None

    table = cli.ok("checks", "list", "127.0.0.1")
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["NAME", "TYPE", "TARGET", "STATUS"]
    homepage = next(row for row in rows if row.startswith("homepage"))
    assert f"GET {live} → 2xx" in homepage and "disabled" in homepage

    # An API problem: the detail as one line, exit 1.
    clash = cli.run("checks", "add", "127.0.0.1", "--name", "homepage", "--type", "tcp", "--port", "1")
    assert clash.returncode == 1
    one_line(clash.stderr, "healthgate:", "homepage", "409")
    invalid = cli.run("checks", "add", "127.0.0.1", "--name", "x", "--type", "http", "--url", "ftp://x", "--port", "1")
    assert invalid.returncode == 1
    one_line(invalid.stderr, "url", "port", "422")

    cli.ok("checks", "delete", "127.0.0.1", "port")
    assert [check["name"] for check in (await admin.get(checks)).json()["items"]] == ["homepage"]


async def test_jobs_commands(
    cli: Cli, admin: httpx.AsyncClient, jobs: Publisher, gate: ServiceProcess, poller: ServiceProcess
) -> None:
    host = (await admin.post("/api/v1/hosts", json={"name": "127.0.0.1", "group": "web"})).json()
    closed = free_port()
    await admin.post(
        f"/api/v1/hosts/{host['id']}/health-checks",
        json={"name": "port", "check_type": "tcp", "port": closed, "address": "127.0.0.1"},
    )
    job_id = "patch/2026-01 #1"
    await jobs.start(job_id, host["id"], window_seconds=600)
    path = "/api/v1/jobs/" + job_id.replace("/", "%2F").replace(" ", "%20").replace("#", "%23")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = await admin.get(path)
        if answer.status_code == 200 and answer.json()["hosts"][0]["status"] == "waiting_health_check":
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"the job did not wait: {answer.text}")

    # The gate re-runs the waiting host's check every 2 s (its checks' summaries change): the CLI's answer is the
    # API's of just before or just after.
    await same_as_api(admin, path, cli, "jobs", "get", job_id)
    await same_as_api(admin, "/api/v1/jobs", cli, "jobs", "list")
    filtered = f"/api/v1/jobs?host_id={host['id']}&status=waiting_health_check"
    by_host = await same_as_api(
        admin, filtered, cli, "jobs", "list", "--host", "127.0.0.1", "--status", "waiting_health_check"
    )
    assert len(by_host["items"]) == 1
    listed = cli.ok("jobs", "list")
    assert job_id in listed and "127.0.0.1" in listed and "waiting_health_check" in listed and "checks" in listed

    halted = cli.json("jobs", "halt", job_id, "--reason", "bad patch")
    assert halted == (await admin.get(path)).json() and halted["halted"] and halted["halt_reason"] == "manual"
    assert halted["hosts"][0]["status"] == "failed"
    again = cli.run("jobs", "halt", job_id, "--reason", "bad patch")
    assert again.returncode == 1
    one_line(again.stderr, "409")
    resumed = cli.ok("jobs", "resume", job_id, "--reason", "fixed")
    assert "halted" in resumed and job_id in resumed
    assert (await admin.get(path)).json()["halted"] is False

    # Halting failed the waiting host; a new job to decide by hand.
    other = "patch-2"
    await jobs.start(other, host["id"], window_seconds=600)
    deadline = time.monotonic() + 60
    while (await admin.get(f"/api/v1/jobs/{other}")).status_code != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    overridden = cli.json("jobs", "override", other, "127.0.0.1", "--decision", "release", "--reason", "urgent")
    assert overridden == (await admin.get(f"/api/v1/jobs/{other}")).json()["hosts"][0]
    assert overridden["status"] == "released" and overridden["override_reason"] == "urgent"
    bad_decision = cli.run("jobs", "override", other, "127.0.0.1", "--decision", "maybe", "--reason", "x")
    assert bad_decision.returncode == 2


async def test_groups_commands(cli: Cli, admin: httpx.AsyncClient) -> None:
    await admin.post("/api/v1/hosts", json={"name": "web-1", "group": "web"})
    assert cli.json("groups", "get-policy", "web") == (await admin.get("/api/v1/groups/web/policy")).json()
    policy = cli.json("groups", "set-policy", "web", "--max-unavailable", "25%", "--stable-seconds", "30")
    assert policy == (await admin.get("/api/v1/groups/web/policy")).json()
    assert policy["max_unavailable"] == "25%" and policy["stable_seconds"] == 30
    kept = cli.json("groups", "set-policy", "web", "--no-checks", "fail")
    assert kept["max_unavailable"] == "25%" and kept["stable_seconds"] == 30 and kept["no_checks"] == "fail"
    cleared = cli.json("groups", "set-policy", "web", "--max-unavailable", "none")
    assert cleared["max_unavailable"] is None
    fresh = cli.json("groups", "set-policy", "db", "--max-unavailable", "2")  # a group without hosts yet
    assert fresh["max_unavailable"] == 2
    assert cli.json("groups", "list") == (await admin.get("/api/v1/groups")).json()
    table = cli.ok("groups", "list")
    assert table.splitlines()[0].split()[:2] == ["GROUP", "HOSTS"]
    assert any(line.split()[:2] == ["web", "1"] for line in table.splitlines())
    assert "stable_seconds          0" in cli.ok("groups", "get-policy", "db")
    # The budget column: a share as the hosts it allows now, a count as it is, none as no limit.
    budgets = {line.split()[0]: line.split(maxsplit=4)[4] for line in table.splitlines()[1:] if line.strip()}
    assert budgets["web"].strip() == "0 (no limit)" and budgets["db"].strip() == "0 of 2"
    await admin.post("/api/v1/hosts", json={"name": "web-2", "group": "web"})
    cli.json("groups", "set-policy", "web", "--max-unavailable", "60%")
    shares = {line.split()[0]: line.split(maxsplit=4)[4] for line in cli.ok("groups", "list").splitlines()[1:]}
    assert shares["web"].strip() == "0 of 1 (60% of 2 hosts)"


async def test_errors_exit_codes_and_roles(cli: Cli, api: ServiceProcess, make_token: TokenFactory) -> None:
    # Bad usage: 2 (Click's usage errors), nothing sent.
    assert cli.run("hosts", "create", "--group", "web").returncode == 2
    assert cli.run("hosts", "list", "--limit", "many").returncode == 2
    assert cli.run("hosts", "frobnicate").returncode == 2
    assert cli.run("hosts", "create", "--from-json", "/nonexistent/file.json").returncode == 2
    # The API's problem: one line, exit 1.
    too_many = cli.run("hosts", "list", "--limit", "501")
    assert too_many.returncode == 1
    one_line(too_many.stderr, "healthgate:", "limit", "422")
    # No token, a viewer's token: the API's 401 and 403 as one line.
    anonymous = Cli(api.base_url, None, cli.forks).run("hosts", "list")
    assert anonymous.returncode == 1
    one_line(anonymous.stderr, "401", "HEALTHGATE_TOKEN")
    viewer = Cli(api.base_url, await make_token("viewer", ("web",)), cli.forks)
    assert viewer.json("hosts", "list") == {"items": [], "next_cursor": None}
    forbidden = viewer.run("hosts", "create", "--name", "x", "--group", "web")
    assert forbidden.returncode == 1
    one_line(forbidden.stderr, "403")
    # No API there: one clear line, exit 1.
    nobody = Cli(f"http://127.0.0.1:{free_port()}", cli.token, cli.forks).run("hosts", "list")
    assert nobody.returncode == 1
    one_line(nobody.stderr, "cannot reach the healthgate API at http://127.0.0.1:")


def test_help_and_shell_completion(cli_forks: CliForks) -> None:
    # Typer finds the user's shell among the process's ancestors (shellingham), and a test's ancestors may hold none
    # (pytest-xdist's workers): its test hook makes --show-completion take the shell named instead.
    shown = cli_forks.run("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert shown.returncode == 0 and "_HEALTHGATE_COMPLETE" in shown.stdout, shown.stderr
    completion = {"_HEALTHGATE_COMPLETE": "complete_bash", "COMP_WORDS": "healthgate ch", "COMP_CWORD": "1"}
    completed = cli_forks.run(env=completion)
    assert "checks" in completed.stdout, completed.stderr
    for group in ("hosts", "checks", "jobs", "groups"):
        helped = cli_forks.run(group, "--help", env={})
        assert helped.returncode == 0 and "list" in helped.stdout


@pytest.mark.parametrize(
    "body",
    [b'{"name": "caf\xe9", "group": "web"}', b'{"name": "x\\ud800", "group": "web"}'],
    ids=["latin-1", "surrogate"],
)
async def test_a_from_json_body_that_is_not_utf8_is_bad_usage(
    cli: Cli, admin: httpx.AsyncClient, body: bytes, tmp_path: Any
) -> None:
    path = tmp_path / "host.json"
    path.write_bytes(body)
    for source, stdin in ((str(path), None), ("-", body)):
        completed = await asyncio.to_thread(
            subprocess.run, [*HEALTHGATE, "hosts", "create", "--from-json", source], env=cli.env,
            capture_output=True, timeout=60, input=stdin,
        )  # fmt: skip
        stderr = completed.stderr.decode()
        assert completed.returncode == 2, stderr
        assert "Traceback" not in stderr and "--from-json" in stderr, stderr
    assert (await admin.get("/api/v1/hosts")).json()["items"] == []


@pytest.mark.parametrize(
    "arguments",
    [
        ("hosts", "create", "--name", b"caf\xe9", "--group", "web"),
        ("hosts", "list", "--group", b"g\xe9"),
        ("jobs", "get", b"j\xe9"),
        ("token", "create", "--name", b"n\xe9", "--role", "viewer"),
    ],
)
async def test_an_argument_that_is_not_utf8_is_bad_usage(
    cli: Cli, admin: httpx.AsyncClient, arguments: tuple[Any, ...]
) -> None:
    completed = await asyncio.to_thread(
        subprocess.run, [*HEALTHGATE, *arguments], env=cli.env, capture_output=True, timeout=60
    )
    stderr = completed.stderr.decode()
    assert completed.returncode == 2, stderr
    assert stderr.count("\n") == 1 and "UTF-8" in stderr and "Traceback" not in stderr, stderr
    assert (await admin.get("/api/v1/hosts")).json()["items"] == []
