"""An operator's mistakes and odd inputs against `healthgate apply`/`export` and the operator commands (issue 15),
on the session's real API, database and broker: YAML aliases (a cycle, an exponential "billion laughs", a node
shared by several hosts), a HEALTHGATE_URL with credentials or that redirects, stdin that is not UTF-8, empty ids,
and applies with tokens that may not make the plan's changes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from typing import Any

import asyncpg
import httpx

from services.fleet import FleetApi, run_apply

HEALTHGATE = [sys.executable, "-m", "services.cli"]


async def apply(admin: httpx.AsyncClient, text: str, environ: dict[str, str], **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_apply(FleetApi(admin), text, "fleet.yaml", out, err, environ=environ, **options)
    return code, out.getvalue(), err.getvalue()


def healthgate(*arguments: str, env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [*HEALTHGATE, *arguments], env={**os.environ, **env}, capture_output=True, timeout=120, input=stdin
    )
    return subprocess.CompletedProcess(
        completed.args, completed.returncode, completed.stdout.decode(), completed.stderr.decode()
    )


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
