"""An operator's mistakes and odd inputs against `healthgate apply`/`export` and the operator commands (issue 15),
on the session's real API, database and broker: YAML aliases (a cycle, an exponential "billion laughs", a node
shared by several hosts), a HEALTHGATE_URL with credentials or that redirects, stdin that is not UTF-8, empty ids,
and applies with tokens that may not make the plan's changes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.fleet import FleetApi, run_apply, run_export
from tests.support.cli_forks import CliForks
from tests.support.processes import ServiceProcess, free_port, start_service
from tests.support.tokens import TokenFactory

HEALTHGATE = [sys.executable, "-m", "services.cli"]


async def apply(admin: httpx.AsyncClient, text: str, environ: dict[str, str], **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_apply(FleetApi(admin), text, "fleet.yaml", out, err, environ=environ, **options)
    return code, out.getvalue(), err.getvalue()


Healthgate = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def healthgate(cli_forks: CliForks) -> Healthgate:
    """healthgate(*ARGUMENTS, env=..., stdin=b"..."): `python -m services.cli ARGUMENTS` with this process's
    environment and `env`, as a fork of one process that imported it (tests/support/cli_forks.py)."""

    def run(*arguments: str, env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return cli_forks.run(*arguments, env=env, timeout=120, stdin=stdin)

    return run


# ---- YAML aliases ------------------------------------------------------------------------------------------------


async def test_a_file_whose_alias_holds_itself_is_a_bad_file_not_a_traceback(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # (The line-keeping loader that reports a bad file's problems reads the self-reference as null.)
    code, out, err = await apply(admin, "hosts: &loop\n  - *loop\n", {})
    assert code == 2, (out, err)
    assert err.startswith("fleet.yaml:1: hosts[0]: "), err
    code, out, err = await apply(admin, "hosts:\n  - &host {name: a, group: web, checks: [*host]}\n", {})
    assert code == 2, (out, err)
    assert err.startswith("fleet.yaml:2: hosts[0].checks[0]"), err


async def test_a_file_nested_too_deeply_is_a_bad_file_not_a_traceback(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    code, out, err = await apply(admin, "hosts: " + "[" * 2000 + "]" * 2000 + "\n", {})
    assert code == 2, (out, err)
    assert "nested more than 32 levels deep" in err and "Traceback" not in err, err


async def test_a_billion_laughs_file_is_refused_quickly(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    started = time.monotonic()
    code, out, err = await apply(admin, "\n".join([*lines, "hosts: []"]) + "\n", {})
    assert code == 2, (out, err)
    assert "alias" in err, err
    assert time.monotonic() - started < 10


async def test_a_check_shared_by_an_alias_is_substituted_once(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    # `$${HOME}` stands for a literal `${HOME}` on both hosts, and a variable's value is never read again for
    # variables: the node the alias shares must not be substituted once per host that names it.
    text = (
        "hosts:\n"
        "  - name: s1\n    group: web\n    checks: &common\n"
        "      - {name: live, check_type: http, url: 'http://127.0.0.1:9/$${HOME}/${PART}', enabled: false}\n"
        "  - name: s2\n    group: web\n    checks: *common\n"
    )
    code, out, err = await apply(admin, text, {"HOME": "/root", "PART": "${HOME}"})
    assert code == 0, (out, err)
    urls = {row["url"] for row in await db.fetch("SELECT url FROM health_checks")}
    assert urls == {"http://127.0.0.1:9/${HOME}/${HOME}"}, urls


# ---- HEALTHGATE_URL ----------------------------------------------------------------------------------------------

SECRET = "s3cretPW-in-the-url"
FLEET = b"hosts:\n  - {name: url-test, group: web}\n"


def one_line(completed: subprocess.CompletedProcess[str], *fragments: str) -> str:
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "command", [("hosts", "list"), ("jobs", "get", "j-1"), ("export",), ("apply", "-f", "-", "--dry-run")]
)
async def test_credentials_in_healthgate_url_are_refused_and_never_printed(
    healthgate: Healthgate, api: ServiceProcess, admin: httpx.AsyncClient, command: tuple[str, ...]
) -> None:
    # The API takes the bearer token: a user:password in the URL would replace it (httpx sends them as Basic
    # auth), and every error message named the URL, password included.
    token = admin.headers["Authorization"].removeprefix("Bearer ")
    for url in (api.base_url.replace("http://", f"http://ops:{SECRET}@"), f"http://ops:{SECRET}@127.0.0.1:1"):
        completed = healthgate(*command, env={"HEALTHGATE_URL": url, "HEALTHGATE_TOKEN": token}, stdin=FLEET)
        assert completed.returncode == 1, (completed.stdout, completed.stderr)
        assert SECRET not in completed.stdout + completed.stderr
        one_line(completed, "HEALTHGATE_URL", "credentials")


@pytest.mark.parametrize("command", [("hosts", "list"), ("export",), ("apply", "-f", "-")])
def test_a_healthgate_url_that_is_no_url_is_one_line(healthgate: Healthgate, command: tuple[str, ...]) -> None:
    for url in ("http://[::1", "127.0.0.1:8080", f"http://127.0.0.1:1/?key={SECRET}"):
        completed = healthgate(*command, env={"HEALTHGATE_URL": url, "HEALTHGATE_TOKEN": "x"}, stdin=FLEET)
        assert completed.returncode == 1, (completed.stdout, completed.stderr)
        assert SECRET not in completed.stdout + completed.stderr
        one_line(completed, "HEALTHGATE_URL")


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 answering with `handler` (its request log silenced), as its base URL."""
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def redirecting(api: ServiceProcess) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every request with a 301 to the API (as a proxy that sends
    http to https does): the base URL of it."""

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(301)
            self.send_header("Location", api.base_url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = do_GET

    with serving(Redirect) as url:
        yield url


@pytest.mark.parametrize(
    "command",
    [
        ("hosts", "list"),
        ("jobs", "get", "j-1"),
        ("jobs", "halt", "j-1", "--reason", "x"),
        ("export",),
        ("apply", "-f", "-"),
    ],
)
async def test_an_api_url_that_redirects_is_one_line_saying_so(
    healthgate: Healthgate, redirecting: str, admin: httpx.AsyncClient, command: tuple[str, ...]
) -> None:
    token = admin.headers["Authorization"].removeprefix("Bearer ")
    completed = healthgate(*command, env={"HEALTHGATE_URL": redirecting, "HEALTHGATE_TOKEN": token}, stdin=FLEET)
    assert completed.returncode == 1, (completed.stdout, completed.stderr)
    assert token not in completed.stdout + completed.stderr
    one_line(completed, "redirect")


@pytest.mark.parametrize(
    "command",
    [
        ("jobs", "get", ""),
        ("jobs", "halt", "", "--reason", "x"),
        ("jobs", "resume", "", "--reason", "x"),
        ("jobs", "override", "", "h", "--decision", "release", "--reason", "x"),
    ],
)
async def test_an_empty_job_id_is_bad_usage(
    healthgate: Healthgate, api: ServiceProcess, admin: httpx.AsyncClient, command: tuple[str, ...]
) -> None:
    token = admin.headers["Authorization"].removeprefix("Bearer ")
    completed = healthgate(*command, env={"HEALTHGATE_URL": api.base_url, "HEALTHGATE_TOKEN": token})
    assert completed.returncode == 2, (completed.stdout, completed.stderr)
    assert "Traceback" not in completed.stderr and "JOB_ID" in completed.stderr, completed.stderr


# ---- apply with a token that may not make the plan's changes -----------------------------------------------------


async def test_an_operators_apply_that_needs_an_admin_applies_nothing(
    admin: httpx.AsyncClient, db: asyncpg.Connection, make_token: TokenFactory
) -> None:
    before = (
        "hosts:\n  - name: web-1\n    group: web\n    checks:\n"
        "      - {name: old, check_type: tcp, port: 22, address: 127.0.0.1, enabled: false}\n"
        "      - {name: ssh, check_type: tcp, port: 22, address: 127.0.0.1, enabled: false}\n"
    )
    assert (await apply(admin, before, {}))[0] == 0
    rows_before = [tuple(row) for row in await db.fetch("SELECT id, name, port, updated_at FROM health_checks")]
    # With --prune, the operator's file drops the check `old` (which an operator may delete), changes `ssh` and
    # adds a host (which only an admin may): apply deleted `old`, then failed on the host.
    after = (
        "hosts:\n  - name: web-1\n    group: web\n    checks:\n"
        "      - {name: ssh, check_type: tcp, port: 2222, address: 127.0.0.1, enabled: false}\n"
        "  - {name: web-2, group: web}\n"
    )
    operator = httpx.AsyncClient(base_url=str(admin.base_url), timeout=30)
    operator.headers["Authorization"] = f"Bearer {await make_token('operator', ('web',))}"
    async with operator:
        code, out, err = await apply(operator, after, {}, prune=True)
        assert code == 1, (out, err)
        assert "operator" in err and "host web-2" in err and "nothing applied" in err, err
        assert rows_before == [
            tuple(row) for row in await db.fetch("SELECT id, name, port, updated_at FROM health_checks")
        ]
        assert await db.fetchval("SELECT count(*) FROM hosts") == 1
        # --dry-run says so as well, without failing: a read-only token may preview a file.
        code, out, err = await apply(operator, after, {}, prune=True, dry_run=True)
        assert code == 0 and "operator" in err and "host web-2" in err, (out, err)
        # What an operator may do, it does.
        checks_only = after.replace("  - {name: web-2, group: web}\n", "")
        code, out, err = await apply(operator, checks_only, {}, prune=True)
        assert code == 0, (out, err)
        assert {row["name"]: row["port"] for row in await db.fetch("SELECT name, port FROM health_checks")} == {
            "ssh": 2222
        }
    viewer = httpx.AsyncClient(base_url=str(admin.base_url), timeout=30)
    viewer.headers["Authorization"] = f"Bearer {await make_token('viewer', ('web',))}"
    async with viewer:
        code, out, err = await apply(viewer, before, {}, prune=True)
        assert code == 1 and "viewer" in err and "nothing applied" in err, (out, err)
        assert await db.fetchval("SELECT count(*) FROM health_checks") == 1


async def test_a_fleet_on_stdin_that_is_not_utf8_is_a_bad_file(
    healthgate: Healthgate, api: ServiceProcess, admin: httpx.AsyncClient
) -> None:
    token = admin.headers["Authorization"].removeprefix("Bearer ")
    env = {"HEALTHGATE_URL": api.base_url, "HEALTHGATE_TOKEN": token}
    completed = healthgate("apply", "-f", "-", env=env, stdin=b"hosts:\n  - {name: caf\xe9, group: web}\n")
    assert completed.returncode == 2, (completed.stdout, completed.stderr)
    one_line(completed, "<stdin>", "UTF-8")
    completed = healthgate(
        "apply", "-f", "-", "--dry-run", env=env, stdin="hosts:\n  - {name: café, group: web}\n".encode()
    )
    assert completed.returncode == 0 and "café" in completed.stdout, (completed.stdout, completed.stderr)


# ---- export -------------------------------------------------------------------------------------------------------


async def test_export_of_names_and_values_holding_dollar_braces_applies_as_they_are(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # A `${...}` in an exported value was read back by apply as a variable: a host named `${HOME}` became one
    # named after the home directory, `$${X}` became `${X}`.
    for name in ("${HOME}", "$${X}", "$$${Y}"):
        assert (await admin.post("/api/v1/hosts", json={"name": name, "group": "dollars"})).status_code == 201
    assert (await admin.post("/api/v1/hosts", json={"name": "g", "group": "${G}"})).status_code == 201
    answer = await admin.put("/api/v1/groups/%24%7BG%7D/policy", json={"max_unavailable": 3})
    assert answer.status_code == 200, answer.text
    host = (await admin.post("/api/v1/hosts", json={"name": "web", "group": "dollars"})).json()
    check = {"name": "${C}", "check_type": "http", "url": "http://127.0.0.1:9/${PATH}", "enabled": False}
    answer = await admin.post(f"/api/v1/hosts/{host['id']}/health-checks", json=check | {"expected_body": "${B}"})
    assert answer.status_code == 201, answer.text
    out, err = io.StringIO(), io.StringIO()
    assert await run_export(FleetApi(admin), out, err) == 0, err.getvalue()
    before = [tuple(row) for row in await db.fetch("SELECT id, name, updated_at FROM hosts ORDER BY 1")]
    environ = {"HOME": "/root", "X": "x", "Y": "y", "C": "c", "PATH": "p", "B": "b", "G": "g"}
    code, plan_out, plan_err = await apply(admin, out.getvalue(), environ, prune=True)
    assert (code, plan_err) == (0, ""), (out.getvalue(), plan_out)
    assert plan_out.startswith("No changes"), plan_out
    assert before == [tuple(row) for row in await db.fetch("SELECT id, name, updated_at FROM hosts ORDER BY 1")]


async def test_export_gives_checks_whose_names_differ_only_in_punctuation_their_own_password_variables(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    host = (await admin.post("/api/v1/hosts", json={"name": "web-1", "group": "web"})).json()
    for name, password in (("a-b", "first-Pa55"), ("a_b", "second-Pa55"), ("a.b", "third-Pa55")):
        check = {"name": name, "check_type": "http", "url": "http://127.0.0.1:9/", "enabled": False}
        check |= {"basic_auth_user": "u", "basic_auth_pass": password}
        assert (await admin.post(f"/api/v1/hosts/{host['id']}/health-checks", json=check)).status_code == 201
    out, err = io.StringIO(), io.StringIO()
    assert await run_export(FleetApi(admin), out, err) == 0, err.getvalue()
    variables = re.findall(r"basic_auth_pass: \$\{(\w+)\}", out.getvalue())
    assert len(variables) == 3 and len(set(variables)) == 3, out.getvalue()


# ---- HEALTHGATE_TOKEN ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("hosts", "list"), ("export",), ("apply", "-f", "-", "--dry-run")])
async def test_a_token_with_a_trailing_newline_works_and_a_malformed_one_is_one_line_that_never_shows_it(
    healthgate: Healthgate, api: ServiceProcess, admin: httpx.AsyncClient, command: tuple[str, ...]
) -> None:
    token = admin.headers["Authorization"].removeprefix("Bearer ")
    # A token read from a file (a Kubernetes Secret's key, `--from-file`) keeps its newline.
    completed = healthgate(
        *command, env={"HEALTHGATE_URL": api.base_url, "HEALTHGATE_TOKEN": token + "\n"}, stdin=FLEET
    )
    assert completed.returncode == 0, (completed.stdout, completed.stderr)
    for bad in (token[:10] + " " + token[10:], token + "ö"):
        completed = healthgate(*command, env={"HEALTHGATE_URL": api.base_url, "HEALTHGATE_TOKEN": bad}, stdin=FLEET)
        assert completed.returncode == 1, (completed.stdout, completed.stderr)
        assert token[10:] not in completed.stdout + completed.stderr
        one_line(completed, "HEALTHGATE_TOKEN")


@pytest.fixture
def not_healthgate() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that is not healthgate: 200 to everything, HTML for the hosts and JSON of
    another shape for the rest (a single-page app's server on the port HEALTHGATE_URL names). Its base URL."""

    class Other(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            html = self.path.startswith("/api/v1/hosts?")
            body = b"<html>an app</html>" if html else b'{"something": "else"}'
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if html else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(Other) as url:
        yield url


@pytest.mark.parametrize(
    "command",
    [
        ("hosts", "list"),
        ("groups", "list"),
        ("jobs", "list"),
        ("checks", "list", "h"),
        ("export",),
        ("apply", "-f", "-"),
    ],
)
def test_a_healthgate_url_that_is_another_web_server_is_one_line(
    healthgate: Healthgate, not_healthgate: str, command: tuple[str, ...]
) -> None:
    completed = healthgate(*command, env={"HEALTHGATE_URL": not_healthgate, "HEALTHGATE_TOKEN": "hg_x"}, stdin=FLEET)
    assert completed.returncode == 1, (completed.stdout, completed.stderr)
    one_line(completed, not_healthgate)


# ---- an API that goes away during an apply ------------------------------------------------------------------------


async def test_an_api_that_dies_during_an_apply_gives_a_short_clear_error_and_a_rerun_converges(
    healthgate: Healthgate,
    service_env: dict[str, str],
    make_token: TokenFactory,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    port = free_port()
    own_api = start_service("api", service_env | {"HEALTHGATE_API_PORT": str(port)}, tmp_path / "api.log", port=port)
    try:
        env = {"HEALTHGATE_URL": own_api.base_url, "HEALTHGATE_TOKEN": await make_token("admin")}
        lines = ["hosts:"]
        for index in range(300):
            lines += [f"  - name: dying-{index}", "    group: dying", "    checks:"]
            lines += ["      - {name: a, check_type: tcp, port: 9, address: 127.0.0.1, enabled: false}"]
        fleet = ("\n".join(lines) + "\n").encode()
        process = await asyncio.create_subprocess_exec(
            *HEALTHGATE, "apply", "-f", "-", env={**os.environ, **env},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        communicating = asyncio.create_task(process.communicate(fleet))
        deadline = time.monotonic() + 60
        while await db.fetchval("SELECT count(*) FROM hosts") < 20:
            assert time.monotonic() < deadline and process.returncode is None, "the apply did not create hosts"
            await asyncio.sleep(0.01)
        own_api.process.kill()
        own_api.process.wait()
        stdout, stderr = await asyncio.wait_for(communicating, 120)
        assert process.returncode == 1, (stdout, stderr)
        lines_out = stderr.decode().splitlines()
        assert "Traceback" not in stderr.decode()
        # A few examples, not one line per change that could not be made ...
        assert len(lines_out) <= 12, stderr.decode()
        # ... and a last line saying what happened and what to do.
        assert "failed" in lines_out[-1] and "apply again" in lines_out[-1], lines_out[-1]
        own_api.restart()
        assert (await asyncio.to_thread(healthgate, "apply", "-f", "-", env=env, stdin=fleet)).returncode == 0
        again = await asyncio.to_thread(healthgate, "apply", "-f", "-", env=env, stdin=fleet)
        assert again.returncode == 0 and again.stdout.startswith("No changes: 300 host(s), 300 check(s)"), again
    finally:
        own_api.stop()


async def test_a_bad_files_messages_never_show_an_environment_variables_value(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # `${VAR}` is there for secrets: a value that does not fit its field is named by its variable, not shown.
    secret = "us:S3cret-" + "x" * 300
    text = (
        "hosts:\n  - name: '${SECRET}'\n    group: web\n    checks:\n"
        "      - {name: a, check_type: tcp, port: '${SECRET}', address: 127.0.0.1}\n"
        "  - name: h2\n    group: 'g-${SECRET}'\n"
    )
    code, out, err = await apply(admin, text, {"SECRET": secret})
    assert code == 2, (out, err)
    assert "S3cret" not in out + err, err
    assert err.count("${SECRET}") == 3, err
    assert await db.fetchval("SELECT count(*) FROM hosts") == 0


async def test_a_file_with_a_nul_character_is_one_line_per_problem(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    code, out, err = await apply(admin, "hosts:\n  - {name: a, group: web}\n\x00\n", {})
    assert code == 2, (out, err)
    assert len(err.splitlines()) == 1 and err.startswith("fleet.yaml"), err


async def test_ids_and_names_that_are_dot_segments_reach_their_own_paths(
    healthgate: Healthgate, api: ServiceProcess, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # `..` and `.` are a job id, a group or a host name like any other; in a URL's path they were resolved away
    # (`jobs get .` read the jobs list and crashed with KeyError: 'hosts').
    env = {"HEALTHGATE_URL": api.base_url, "HEALTHGATE_TOKEN": admin.headers["Authorization"].removeprefix("Bearer ")}
    for name in (".", ".."):
        assert (await admin.post("/api/v1/hosts", json={"name": f"h{name}", "group": name})).status_code == 201
        answer = await admin.put(f"/api/v1/groups/{'%2E' * len(name)}/policy", json={"max_unavailable": len(name)})
        assert answer.status_code == 200, answer.text
        completed = await asyncio.to_thread(healthgate, "groups", "get-policy", name, "--json", env=env)
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout)["max_unavailable"] == len(name)
        for command in (("jobs", "get", name), ("jobs", "halt", name, "--reason", "x")):
            completed = await asyncio.to_thread(healthgate, *command, env=env)
            assert completed.returncode == 1, completed.stderr
            one_line(completed, "job not found")
