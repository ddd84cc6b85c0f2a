"""`healthgate apply` and `healthgate export` (CONTRACT §1) against the real API, database and broker.

Most tests call services/fleet.py's `run_apply`/`run_export` with the test's admin client (the same code the
command runs); one runs the `healthgate` command itself for its exit code and message. Every check's target is
on 127.0.0.1 (nothing is looked up in DNS, no traffic leaves the machine).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from services.fleet import FleetApi, fleet_schema, password_variable, run_apply, run_export
from tests.support.processes import ServiceProcess
from tests.support.tokens import TokenFactory

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-Pa55"
ENV = {"WEB_PASSWORD": PASSWORD}


def fleet_yaml(hosts: int = 50, *, policy: str = "max_unavailable: 2", skip: frozenset[str] = frozenset()) -> str:
    """A fleet file: `hosts` hosts in groups web and db, each with 2-3 checks of every type, and web's policy."""
    lines = ["hosts:"]
    for index in range(hosts):
        name = f"host-{index:02d}"
        if name in skip:
            continue
        group = "web" if index % 2 == 0 else "db"
        lines += [f"  - name: {name}", f"    group: {group}", f"    agent_url: http://127.0.0.1:{9100 + index}"]
        lines += ["    checks:", "      - name: ssh", "        check_type: tcp", "        port: 22"]
        lines += ["        address: 127.0.0.1", "        enabled: false"]
        if group == "web":
            lines += ["      - name: homepage", "        check_type: http", f"        url: http://127.0.0.1:9/{name}"]
            lines += ["        basic_auth_user: monitor", "        basic_auth_pass: ${WEB_PASSWORD}"]
            lines += ["        expected_status: 2XX", "        interval_seconds: 60", "        enabled: false"]
        else:
            lines += ["      - name: resolver", "        check_type: dns", "        dns_name: db.internal"]
            lines += [
                "        dns_server: 127.0.0.1:53",
                "        expected_values: [10.0.0.1]",
                "        enabled: false",
            ]
            lines += [
                "      - name: grpc",
                "        check_type: grpc",
                "        port: 50051",
                "        address: 127.0.0.1",
            ]
            lines += ["        critical: false", "        enabled: false"]
    lines += ["groups:", "  web:", f"    {policy}"]
    return "\n".join(lines) + "\n"


async def apply(admin: httpx.AsyncClient, text: str, **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    environ = options.pop("environ", ENV)
    code = await run_apply(FleetApi(admin), text, "fleet.yaml", out, err, environ=environ, **options)
    return code, out.getvalue(), err.getvalue()


async def state(db: asyncpg.Connection) -> dict[str, Any]:
    """Everything an apply could change, to compare before and after."""
    return {
        "hosts": [
            tuple(r) for r in await db.fetch('SELECT id, name, "group", agent_url, updated_at FROM hosts ORDER BY 1')
        ],
        "checks": [
            tuple(r) for r in await db.fetch("SELECT id, host_id, name, updated_at FROM health_checks ORDER BY 1")
        ],
        "policies": [tuple(r) for r in await db.fetch('SELECT "group", updated_at FROM group_policies ORDER BY 1')],
        "audit": await db.fetchval("SELECT count(*) FROM audit_log"),
    }


def changed_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.lstrip()[:1] in ("+", "~", "-")]


async def test_apply_creates_a_50_host_file_and_a_second_apply_plans_nothing(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    code, out, err = await apply(admin, fleet_yaml())
    assert code == 0, err
    assert "Plan: 176 to create, 0 to update, 0 to delete, 0 unchanged." in out  # 50 hosts, 125 checks, 1 policy
    assert PASSWORD not in out
    assert await db.fetchval("SELECT count(*) FROM hosts") == 50
    assert await db.fetchval("SELECT count(*) FROM health_checks") == 125
    homepage = (await admin.get("/api/v1/health-checks", params={"group": "web", "limit": 500})).json()["items"]
    assert {check["basic_auth_pass_set"] for check in homepage if check["check_type"] == "http"} == {True}
    policy = (await admin.get("/api/v1/groups/web/policy")).json()
    assert policy["max_unavailable"] == 2

    before = await state(db)
    code, out, err = await apply(admin, fleet_yaml())
    assert (code, err) == (0, "")
    assert changed_lines(out) == []
    assert "No changes: 50 host(s), 125 check(s) and 1 policy(ies) match the file." in out
    assert await state(db) == before


async def test_a_changed_file_plans_exactly_the_changes(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    assert (await apply(admin, fleet_yaml()))[0] == 0
    changed = (
        fleet_yaml(policy="max_unavailable: 25%")
        .replace("agent_url: http://127.0.0.1:9103\n", "agent_url: http://127.0.0.1:19103\n")
        .replace("url: http://127.0.0.1:9/host-04\n", "url: http://127.0.0.1:9/host-04/ready\n")
        .replace("  - name: host-07\n    group: db\n", "  - name: host-07\n    group: web\n")
    )
    changed = changed.replace("groups:\n", "  - name: host-50\n    group: web\ngroups:\n", 1)
    code, out, err = await apply(admin, changed, dry_run=True)
    assert (code, err) == (0, "")
    assert changed_lines(out) == [
        "~ policy web",
        '    ~ max_unavailable: 2 → "25%"',
        "~ host host-03",
        '    ~ agent_url: "http://127.0.0.1:9103" → "http://127.0.0.1:19103"',
        "  ~ check host-04/homepage",
        '      ~ url: "http://127.0.0.1:9/host-04" → "http://127.0.0.1:9/host-04/ready"',
        "~ host host-07",
        '    ~ group: "db" → "web"',
        "+ host host-50 (group web)",
    ]
    assert "Plan: 1 to create, 4 to update, 0 to delete, 172 unchanged." in out
    code, out, err = await apply(admin, changed)
    assert code == 0, err
    host = (await admin.get("/api/v1/hosts", params={"group": "web", "limit": 500})).json()["items"]
    assert {h["name"] for h in host} >= {"host-07", "host-50"}
    code, out, err = await apply(admin, changed)
    assert changed_lines(out) == [], out


async def test_prune_deletes_only_what_is_absent_within_the_files_groups(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    assert (await apply(admin, fleet_yaml(10)))[0] == 0
    outsider = (await admin.post("/api/v1/hosts", json={"name": "elsewhere", "group": "other"})).json()
    await admin.post(
        f"/api/v1/hosts/{outsider['id']}/health-checks",
        json={"name": "ssh", "check_type": "tcp", "port": 22, "address": "127.0.0.1", "enabled": False},
    )
    hosts = {h["name"]: h for h in (await admin.get("/api/v1/hosts")).json()["items"]}
    extra = {"name": "extra", "check_type": "tcp", "port": 2222, "address": "127.0.0.1", "enabled": False}
    assert (await admin.post(f"/api/v1/hosts/{hosts['host-01']['id']}/health-checks", json=extra)).status_code == 201
    smaller = fleet_yaml(10, skip=frozenset({"host-02", "host-05"}))

    code, out, err = await apply(admin, smaller)
    assert (code, changed_lines(out)) == (0, []), out  # without --prune nothing is deleted

    code, out, err = await apply(admin, smaller, prune=True, dry_run=True)
    assert changed_lines(out) == ["  - check host-01/extra", "- host host-02", "- host host-05"]
    code, out, err = await apply(admin, smaller, prune=True)
    assert code == 0, err
    names = {h["name"] for h in (await admin.get("/api/v1/hosts")).json()["items"]}
    assert names == {f"host-{i:02d}" for i in range(10)} - {"host-02", "host-05"} | {"elsewhere"}
    checks = (await admin.get(f"/api/v1/hosts/{hosts['host-01']['id']}/health-checks")).json()["items"]
    assert {c["name"] for c in checks} == {"ssh", "resolver", "grpc"}
    assert len((await admin.get(f"/api/v1/hosts/{outsider['id']}/health-checks")).json()["items"]) == 1
    assert changed_lines((await apply(admin, smaller, prune=True))[1]) == []


async def test_dry_run_changes_nothing(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    await admin.post("/api/v1/hosts", json={"name": "host-00", "group": "web", "agent_url": "http://127.0.0.1:1"})
    before = await state(db)
    code, out, err = await apply(admin, fleet_yaml(20), dry_run=True, prune=True)
    assert (code, err) == (0, "")
    assert "~ host host-00" in out and "+ host host-19 (group db)" in out
    assert await state(db) == before


async def test_a_file_with_an_error_on_line_17_says_line_17_and_applies_nothing(
    api: ServiceProcess, db: asyncpg.Connection, make_token: TokenFactory, tmp_path: Path
) -> None:
    text = fleet_yaml(3)
    lines = text.splitlines()
    assert lines[16] == "        interval_seconds: 60"  # line 17: host-00's http check
    lines[16] = "        interval_seconds: 5"
    path = tmp_path / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    env = os.environ | ENV | {"HEALTHGATE_URL": api.base_url, "HEALTHGATE_TOKEN": await make_token("admin")}
    before = await state(db)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "apply", "-f", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"{path}:17: hosts[0].checks[1].interval_seconds: 5 is less than the minimum of 10"
    assert done.stdout == ""
    assert await state(db) == before


async def test_a_missing_variable_names_its_line_and_a_rule_of_the_api_is_checked_too(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    text = fleet_yaml(1).replace(
        "        expected_status: 2XX\n",
        "        expected_status: 2XX\n        method: HEAD\n        expected_body: ok\n",
    )
    code, _out, err = await apply(admin, text, environ={})
    assert code == 2
    assert err.splitlines() == [
        "fleet.yaml:15: hosts[0].checks[1].basic_auth_pass: environment variable WEB_PASSWORD is not set"
    ]
    code, _out, err = await apply(admin, text)
    assert code == 2
    assert "fleet.yaml:18: hosts[0].checks[1].expected_body: a HEAD answer has no body" in err
    assert await db.fetchval("SELECT count(*) FROM hosts") == 0


async def test_export_then_apply_plans_nothing(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    assert (await apply(admin, fleet_yaml(12)))[0] == 0
    out, err = io.StringIO(), io.StringIO()
    assert await run_export(FleetApi(admin), out, err) == 0, err.getvalue()
    exported = out.getvalue()
    assert PASSWORD not in exported
    variable = password_variable("host-00", "homepage")
    assert f"basic_auth_pass: ${{{variable}}}" in exported
    environ = {password_variable(f"host-{i:02d}", "homepage"): PASSWORD for i in range(0, 12, 2)}
    before = await state(db)
    code, plan_out, err_text = await apply(admin, exported, environ=environ, prune=True)
    assert (code, err_text) == (0, ""), plan_out
    assert changed_lines(plan_out) == []
    assert await state(db) == before


def test_the_published_schema_is_the_one_apply_validates_with() -> None:
    published = json.loads((ROOT / "docs" / "fleet.schema.json").read_text())
    assert published == fleet_schema(), "regenerate docs/fleet.schema.json (docs/fleet.md says how)"


async def test_a_json_fleet_file_is_the_same_fleet_and_its_errors_have_lines(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    from ruamel.yaml import YAML

    document = YAML(typ="safe").load(fleet_yaml(6))
    as_json = json.dumps(document, indent=2)
    code, out, err = await apply(admin, as_json)
    assert code == 0, err
    before = await state(db)
    code, out, err = await apply(admin, fleet_yaml(6))  # the YAML form of the same fleet plans nothing
    assert (code, err) == (0, "") and changed_lines(out) == [], out
    assert await state(db) == before

    bad = as_json.replace('"port": 22', '"port": "22"', 1)  # a string where the schema wants an integer
    code, _out, err = await apply(admin, bad)
    line = next(number for number, text in enumerate(bad.splitlines(), 1) if '"port": "22"' in text)
    assert code == 2 and err.startswith(f"fleet.yaml:{line}: hosts[0].checks[0].port:"), err
    twice = as_json.replace('"group": "web"', '"group": "web", "group": "db"', 1)  # YAML refuses a key twice
    code, _out, err = await apply(admin, twice)
    line = next(number for number, text in enumerate(twice.splitlines(), 1) if '"group": "db"' in text)
    assert code == 2 and err.startswith(f"fleet.yaml:{line}: not valid YAML: found duplicate key"), err
    assert await state(db) == before


async def test_apply_with_an_operator_token_says_what_it_may_not_do_and_creates_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection, make_token: TokenFactory
) -> None:
    client.headers["Authorization"] = f"Bearer {await make_token('operator', groups=['web', 'db'])}"
    code, out, err = await apply(client, fleet_yaml(4).split("groups:\n")[0])  # hosts only, no policy
    assert code == 1
    assert "Plan: 14 to create" in out
    assert "role 'operator'" in err and "need an admin token (create host host-00" in err, err
    assert err.rstrip().endswith("nothing applied"), err
    assert await db.fetchval("SELECT count(*) FROM hosts") == 0


async def test_an_apply_failing_partway_reports_it_and_a_second_apply_converges(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The plan is made, then another admin creates one of its hosts before it is applied: that host's batch
    (100 hosts, all or none) fails with the API's reason and the other batches are applied; a second apply
    plans exactly what is left and leaves the API matching the file."""
    from services.fleet import apply_plan, load_fleet, plan, read_current

    text = fleet_yaml(250)
    fleet = load_fleet(text, "fleet.yaml", ENV)
    result = plan(fleet, await read_current(FleetApi(admin)), prune=False)
    created = await admin.post("/api/v1/hosts", json={"name": "host-120", "group": "db"})
    assert created.status_code == 201
    failures = await apply_plan(FleetApi(admin), result, io.StringIO())
    assert len(failures) == 1, failures
    assert "'host-120'" in failures[0] and "nothing was created" in failures[0]
    assert await db.fetchval("SELECT count(*) FROM hosts") == 151  # two batches of 100 hosts + host-120 alone

    code, out, err = await apply(admin, text)
    assert code == 0, err
    # hosts 100-199 but host-120 with their checks (49 web hosts of 2, 50 db hosts of 3), host-120's 2 checks;
    # host-120 itself is updated (its group and agent_url).
    assert "Plan: 349 to create, 1 to update, 0 to delete," in out, out
    assert '~ host host-120\n    ~ group: "db" → "web"' in out
    assert await db.fetchval("SELECT count(*) FROM hosts") == 250
    code, out, err = await apply(admin, text)
    assert (code, err) == (0, "") and changed_lines(out) == [], out


def test_a_bad_or_unreachable_api_url_is_one_line_without_its_password(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("hosts: []\n")
    for url, command in (
        ("http://monitor:url-Pa55@127.0.0.1:1", ["apply", "-f", str(path)]),  # nothing listens on port 1
        ("http://monitor:url-Pa55@127.0.0.1:notaport", ["export"]),
        ("http://[::1", ["apply", "-f", str(path)]),
        ("ftp://monitor:url-Pa55@127.0.0.1:1", ["hosts", "list"]),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *command],
            cwd=ROOT, env=os.environ | {"HEALTHGATE_URL": url, "HEALTHGATE_TOKEN": "t"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, (url, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, (url, done.stderr)
        assert "url-Pa55" not in done.stderr + done.stdout, (url, done.stderr)
        assert "HEALTHGATE_URL" in done.stderr or "cannot reach the healthgate API" in done.stderr, done.stderr


async def test_policies_of_groups_named_like_dot_segments_reach_their_own_path(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    text = 'groups:\n  "..": {max_unavailable: 1}\n  ".": {max_unavailable: 2}\n  "a/b": {max_unavailable: 3}\n'
    code, _out, err = await apply(admin, text)
    assert code == 0, err
    stored = dict(await db.fetch('SELECT "group", max_unavailable_count FROM group_policies'))
    assert stored == {"..": 1, ".": 2, "a/b": 3}, stored
    assert changed_lines((await apply(admin, text))[1]) == []
