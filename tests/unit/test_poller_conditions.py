"""services/poller/conditions.py in this process: the variables a condition reads (CONTRACT §3), the verdicts and
their details (the values read, credentials redacted, the 1,000-character limit), which evaluations run inline and
which in the worker pool, and the pool itself: a runaway is stopped at its deadline while the event loop keeps
running, memory is capped, a cancelled evaluation's worker is killed, and `close` leaves no process behind.

The same module runs inside a real poller in tests/test_conditions.py."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.poller import conditions
from services.poller.conditions import (
    REDACTED,
    ConditionEvaluator,
    ConditionVerdict,
    ProgramCache,
    ResponseFacts,
    ResponseHeaders,
    WorkerPool,
    evaluate,
    parse_json,
    response_headers,
    variables_for,
)
from shared.conditions import VARIABLES
from shared.details import DETAIL_LIMIT, safe_detail

# 9 million comparisons, all true: about 3 s of CPU with the GIL held, were it run in this process.
RUNAWAY = "json.all(x, json.all(y, x == y))"
LIST_3000 = json.dumps([1] * 3000)


def facts(body: str = '{"status":"UP"}', **fields: Any) -> ResponseFacts:
    values: dict[str, Any] = {
        "status": 200, "headers": {"content-type": "application/json"}, "body": body, "latency_ms": 12.5,
        "cert_days_left": None,
    } | fields  # fmt: skip
    return ResponseFacts(**values)


def judge_here(expression: str, response: ResponseFacts) -> ConditionVerdict:
    compiled = ProgramCache().get(expression)
    assert not isinstance(compiled, Exception), compiled
    return evaluate(compiled, expression, response)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
async def evaluator() -> AsyncIterator[ConditionEvaluator]:
    async with ConditionEvaluator() as made:
        yield made


# ---- the variables ----------------------------------------------------------------------------------------


def test_headers_are_lower_case_and_repeated_ones_joined() -> None:
    pairs = [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("X-Trace", "t"), ("set-cookie", "b=2")]
    assert response_headers(pairs) == {"content-type": "text/plain", "set-cookie": "a=1, b=2", "x-trace": "t"}


def test_undecodable_header_bytes_become_replacement_characters() -> None:
    # aiohttp keeps bytes that are not UTF-8 as lone surrogates (surrogateescape); the library cannot take those.
    value = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert response_headers([("X-Name", value)]) == {"x-name": "caf\ufffd"}
    assert judge_here('headers["x-name"] == "caf\ufffd"', facts(headers=response_headers([("X-Name", value)]))).holds


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        ('{"status": "UP"}', {"status": "UP"}),
        ("[1, 2.5, null, true]", [1, 2.5, None, True]),
        ('"text"', "text"),
        ("not json", None),
        ("", None),
        ('{"a": NaN}', None),  # RFC 8259 has no NaN or Infinity
        ("[Infinity]", None),
        ("[" * 100_000 + "]" * 100_000, None),  # too deep for the parser
        ("1" * 5000, None),  # more digits than Python converts
        ('{"a": 1} trailing', None),
    ],
)
def test_json_is_strict_json_or_null(body: str, parsed: Any) -> None:
    assert parse_json(body) == parsed


def test_json_with_a_huge_integer_or_a_byte_order_mark_is_read() -> None:
    # An integer past what CEL holds (64 bits) and past a double's range: the condition fails for no field it reads
    # ("Conversion Error: Failed to convert Python object of type int to Value") unless it is read as a double.
    huge = "9" * 400
    body = f'{{"status": "UP", "id": {huge}, "ids": [-{huge}, 18446744073709551615, -9223372036854775808]}}'
    assert parse_json(body) == {
        "status": "UP", "id": math.inf, "ids": [-math.inf, 18446744073709551615, -9223372036854775808]
    }  # fmt: skip
    assert judge_here('json.status == "UP"', facts(body)).holds
    assert judge_here("json.ids[1] == 18446744073709551615u && json.ids[2] < 0", facts(body)).holds
    # A UTF-8 byte order mark before the JSON text (some .NET services send one): RFC 8259 lets a parser ignore it.
    assert parse_json('\ufeff{"status": "UP"}') == {"status": "UP"}
    assert judge_here('json.status == "UP"', facts('\ufeff{"status": "UP"}')).holds


def test_only_the_variables_a_program_reads_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parse(body: str) -> Any:
        raise AssertionError("json was parsed for a condition that does not read it")

    def no_headers() -> Iterator[tuple[str, str]]:
        raise AssertionError("the headers were copied for a condition that does not read them")
        yield ("never", "reached")

    monkeypatch.setattr(conditions, "parse_json", no_parse)
    assert variables_for({"status", "latency_ms"}, facts()) == {"status": 200, "latency_ms": 12.5}
    lazy = facts(headers=ResponseHeaders(no_headers()))
    assert judge_here('status == 200 && body.contains("UP")', lazy).holds
    assert judge_here('headers["x-a"] == "1, 2"', facts(headers=ResponseHeaders([("X-A", "1"), ("x-a", "2")]))).holds


def test_every_variable_has_its_contract_type() -> None:
    values = variables_for(VARIABLES, facts(cert_days_left=40, latency_ms=3))
    assert values == {
        "status": 200, "headers": {"content-type": "application/json"}, "body": '{"status":"UP"}',
        "json": {"status": "UP"}, "latency_ms": 3.0, "cert_days_left": 40.0,
    }  # fmt: skip
    assert isinstance(values["latency_ms"], float) and isinstance(values["cert_days_left"], float)
    assert judge_here("type(latency_ms) == double && type(status) == int && type(json) == map", facts()).holds
    assert judge_here("cert_days_left == null", facts()).holds
    assert judge_here("cert_days_left > 30", facts(cert_days_left=40.5)).holds


# ---- verdicts and details ---------------------------------------------------------------------------------


def test_a_false_condition_names_the_expression_and_what_it_read() -> None:
    verdict = judge_here(
        'json.status == "UP" && latency_ms < 5', facts('{"status":"DOWN","db":{"ok":false}}', latency_ms=12.34567)
    )
    assert verdict == ConditionVerdict(
        False,
        'the condition is false: json.status == "UP" && latency_ms < 5; it read '
        'json={"status":"DOWN","db":{"ok":false}}, latency_ms=12.346',
    )


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("set-cookie", "session=abc123"),
        ("cookie", "session=abc123"),
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("proxy-authorization", "Bearer eyJhbGciOi"),
        ("www-authenticate", 'Digest realm="r", nonce="n0nce"'),
        ("proxy-authenticate", 'Basic realm="proxy"'),
    ],
)
def test_credentials_in_headers_are_never_shown(name: str, secret: str) -> None:
    verdict = judge_here('headers["x-request-id"] == "r-2"', facts(headers={name: secret, "x-request-id": "r-1"}))
    assert verdict.detail.endswith(f'; it read headers={{"{name}":"{REDACTED}","x-request-id":"r-1"}}')
    assert secret not in verdict.detail


PASSWORD = 'pa"ss\\w0rd!Tr0ub4dor'  # a quote and a backslash: JSON shows them escaped


@pytest.mark.parametrize(
    ("expression", "body"),
    [
        # The check's own password echoed back: escaped as JSON shows it, or cut at the 160 characters a value shows.
        ("json.ok == true", json.dumps({"ok": False, "you_sent": PASSWORD})),
        ("json.ok == true", json.dumps({"ok": False, "echo": "x" * 140 + PASSWORD})),
        ('body == "x"', "y" * 150 + PASSWORD),
        ("json.ok", json.dumps({"ok": PASSWORD})),  # a result that is not a bool
        ("json[json.echo] == 1", json.dumps({"echo": PASSWORD})),  # an error naming the value
    ],
)
def test_the_checks_password_never_shows_even_in_part(expression: str, body: str) -> None:
    verdict = judge_here(expression, facts(body, secrets=(PASSWORD,)))
    shown = safe_detail(verdict.detail, (PASSWORD,))  # what the poller stores
    for start in range(len(PASSWORD) - 5):  # no 6 characters of it, as sent or as JSON escapes them
        part = PASSWORD[start : start + 6]
        assert part not in shown and json.dumps(part)[1:-1] not in shown, (part, shown)


@pytest.mark.parametrize(
    ("expression", "secret"),
    [
        ("json.token", "s3cr3t-t0ken-8f2a"),  # a result that is not a bool: what the condition read, shown
        ("json.auth.accessToken", "s3cr3t-t0ken-8f2a"),
        ('headers["x-auth-token"]', "h3ad3r-t0ken-8f2a"),
        ('[json.token, "x"]', "s3cr3t-t0ken-8f2a"),
    ],
)
def test_a_result_read_from_a_secret_named_field_never_shows(expression: str, secret: str) -> None:
    body = json.dumps({"token": "s3cr3t-t0ken-8f2a", "auth": {"accessToken": "s3cr3t-t0ken-8f2a"}})
    verdict = judge_here(expression, facts(body, headers={"x-auth-token": "h3ad3r-t0ken-8f2a"}))
    assert not verdict.holds and "not true or false" in verdict.detail, verdict.detail
    assert secret not in safe_detail(verdict.detail), verdict.detail


def test_showing_a_large_value_costs_what_shows_of_it() -> None:
    # 1 MiB of empty objects: the 160 characters a detail shows are cleaned, not a copy of the megabyte (0.28 s of a
    # worker's 1 s deadline). Measured in memory, not time: a copy of the 349,000 objects allocates megabytes.
    body = "[" + ",".join(["{}"] * 349_000) + "]"
    response = facts(body, secrets=("not-there",))
    parsed = parse_json(body)
    tracemalloc.start()
    try:
        shown = conditions._shown(parsed, conditions._Hidden(response, {"json": parsed}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak
    assert shown == "[" + "{}," * 52 + "{}…"
    assert judge_here("json == 1", response).detail == f"the condition is false: json == 1; it read json={shown}"


@pytest.mark.parametrize(
    "body",
    [
        {"status": "DOWN", "password": 'ab"cd ef,gh'},
        {"status": "DOWN", "api_token": ["tok1-abcd", "tok2-abcd"], "secret": {"k": "v123-abcd"}},
        {"status": "DOWN", "clientSecret": "abcd 1234", "secretKey": "k-abcd-1234", "sessionId": "s-abcd-1234"},
        {"status": "DOWN", "token": "x" * 150 + "abcd-1234-secret"},
    ],
)
def test_values_of_secret_named_json_fields_never_show(body: dict[str, Any]) -> None:
    verdict = judge_here('json.status == "UP"', facts(json.dumps(body)))
    shown = safe_detail(verdict.detail)
    assert shown.startswith('the condition is false: json.status == "UP"; it read json={"status":"DOWN",'), shown
    for fragment in ("cd ef", "gh", "tok1", "tok2", "v123", "abcd", "1234"):
        assert fragment not in shown, (fragment, shown)


@pytest.mark.parametrize(
    "expression",
    [
        'headers["set-cookie"]',  # a result that is not a bool
        "headers",
        'json[headers["set-cookie"]] == 1',  # an error naming the key it did not find
        'headers["set-cookie"] == 1 || json[headers["set-cookie"]] == 1',
    ],
)
def test_credential_headers_never_show_through_results_or_errors(expression: str) -> None:
    cookie = "JSESSIONID=8F2A3B1C9D7E6F5A"
    response = facts("{}", headers=ResponseHeaders([("Set-Cookie", cookie), ("Set-Cookie", "b=c0ffee42"), ("A", "1")]))
    shown = safe_detail(judge_here(expression, response).detail)
    assert "8F2A3B1C" not in shown and "c0ffee42" not in shown, shown


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("json.nope == 1", "the condition failed (no such key: 'nope'): json.nope == 1; it read json="),
        ("json.status + 1 == 2", "the condition failed (Unsupported operation: string + int"),
        ("1 / (status - 200) == 1", "the condition failed (division by zero in CEL expression)"),
        ("json.items[5] == 1", "the condition failed (no such key: 'items')"),
        ("jsn.status == 1", "the condition failed (Undefined variable or function: 'jsn' (the variables are status,"),
        (
            'timestamp("2024-01-01T00:00:00Z").getHours("Europe/Paris") == 1',
            "the condition failed (getHours() does not take these arguments here):",
        ),
        ("timestamp(1700000000) == 1", "the condition failed (timestamp() does not take these arguments here):"),
        ("int(json.status) == 1", "the condition failed (Function 'int' error: string parse error"),
        ("json.status", 'the condition gave a string ("UP"), not true or false: json.status; it read json='),
        ("status", "the condition gave an int (200), not true or false"),
        ("[1, 2]", "the condition gave a list ([1,2]), not true or false"),
        ('duration("1s")', 'the condition gave a duration ("0:00:01"), not true or false'),
        ("null", "the condition gave null (null), not true or false"),
    ],
)
def test_errors_and_results_that_are_not_booleans(expression: str, words: str) -> None:
    verdict = judge_here(expression, facts())
    assert not verdict.holds and verdict.detail.startswith(words), verdict.detail


def test_a_lone_surrogate_in_the_json_becomes_a_replacement_character() -> None:
    assert parse_json('{"a\\uDC00": ["\\ud800", "\\ud83d\\ude00"]}') == {"a\ufffd": ["\ufffd", "😀"]}
    assert judge_here('json.name == "\ufffdx"', facts('{"name": "\\ud800x"}')).holds


def test_details_are_cut_to_the_limit() -> None:
    expression = " || ".join(['json.status == "' + "x" * 40 + '"'] * 15)
    verdict = judge_here(expression, facts(json.dumps({"status": "DOWN", "pad": "y" * 5000}), headers={"a": "b" * 900}))
    assert not verdict.holds and len(verdict.detail) <= DETAIL_LIMIT
    assert "…" in verdict.detail  # the expression (300) and the value (160) are cut, each marked
    huge = judge_here(
        "headers.size() == 0 && body == json && status == 1 && cert_days_left == 0.0 && latency_ms == 1.0",
        facts("[" + '"z", ' * 10**5 + "1]", headers={"h": "v" * 10**5}, cert_days_left=1e300),
    )
    assert len(huge.detail) <= DETAIL_LIMIT and "…" in huge.detail


async def test_a_stored_condition_that_no_longer_compiles(evaluator: ConditionEvaluator) -> None:
    verdict = await evaluator.judge("body.split(',') == []", facts(), time_left=5)
    assert not verdict.holds
    assert verdict.detail.startswith("the condition does not compile: line 1, column 6: unknown function split()")


# ---- inline or in a worker --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "body", "inline"),
    [
        ('json.status == "UP" && latency_ms < 500', '{"status":"UP"}', True),
        ('headers["content-type"] == "application/json"', "x" * 100_000, True),  # the body is not read
        ("status == 200", "x" * 10**6, True),
        ('json.status == "UP"', json.dumps({"status": "UP", "pad": "x" * 5000}), False),  # over 4 KiB
        ('body.contains("ok")', "ok" * 2048, True),  # exactly 4 KiB
        ('body.contains("ok")', "ok" * 2048 + "!", False),
        ("json.checks.all(c, c.ok)", '{"checks":[]}', False),  # a comprehension
        ("json.map(x, body + body).size() > 0", "[1]", False),  # its variable unused: not among the variables
        ("json.all(status, status > 0)", "[1]", False),  # its variable shadows one of the six
        ("[1, 2].exists(x, true)", "", False),
        ("json.filter(x, true).size() == 0", "[]", False),
        ('body.matches("^ok")', "ok", False),  # a regular expression
        ("latency_ms + 100.0 < 500.0", "", False),  # `+`: values may grow
        ("jsn == 1", "", False),  # unknown: fails at once, but not inline by the rule
        ("json.status ==", "", True),  # does not compile: evaluated nowhere
    ],
)
def test_what_runs_inline(evaluator: ConditionEvaluator, expression: str, body: str, inline: bool) -> None:
    assert evaluator.runs_inline(expression, facts(body)) is inline


# 4 KiB of JSON that is costly to hold: 819 maps nested (each reference to `json` is a copy of them all).
DEEP_MAPS = '{"":' * 819 + "0" + "}" * 819
assert len(DEEP_MAPS) == 4096


@pytest.mark.parametrize(
    ("references", "inline"),
    [(1, True), (8, True), (16, True), (17, False), (196, False)],
)
def test_many_references_to_the_data_go_to_a_worker(
    evaluator: ConditionEvaluator, references: int, inline: bool
) -> None:
    # Each reference to a variable copies its value: 196 of them to 4 KiB of nested maps held the loop 62 ms (the
    # module's docstring promised 7 ms at worst), 16 about 9 ms. Past 16 references times 4 KiB, a worker.
    expression = "size([" + ",".join(["json"] * references) + "]) == 0"
    assert evaluator.runs_inline(expression, facts(DEEP_MAPS)) is inline
    assert evaluator.runs_inline(expression, facts(DEEP_MAPS[: len(DEEP_MAPS) // 8])) is (references <= 8 * 16)


async def test_inline_evaluation_starts_no_process(evaluator: ConditionEvaluator) -> None:
    verdict = await evaluator.judge('json.status == "UP"', facts(), time_left=5)
    assert verdict == ConditionVerdict(True, "the condition holds")
    assert evaluator.worker_pids() == []


async def test_the_pool_gives_the_same_verdicts_as_inline(evaluator: ConditionEvaluator) -> None:
    response = facts(json.dumps({"checks": [{"ok": True}, {"ok": False}], "set": "x" * 5000}), cert_days_left=3.5)
    for expression in (
        "json.checks.all(c, c.ok)",
        "json.checks.exists(c, c.ok) && cert_days_left < 4.0",
        "json.checks.map(c, c.nope).size() > 0",
        "json.checks.size()",
    ):
        assert not evaluator.runs_inline(expression, response)
        in_pool = await evaluator.judge(expression, response, time_left=10)
        assert in_pool == judge_here(expression, response), expression
    assert len(evaluator.worker_pids()) == 1  # one request at a time: the first worker served them all


# ---- the worker pool --------------------------------------------------------------------------------------


async def ticks_during(work: asyncio.Future[Any], period: float = 0.01) -> list[float]:
    """The event loop's lateness (s) at each tick of `period` while `work` runs."""
    lateness = []
    while not work.done():
        before = time.perf_counter()
        await asyncio.sleep(period)
        lateness.append(time.perf_counter() - before - period)
    return lateness


async def test_a_runaway_is_stopped_at_its_deadline_and_the_loop_runs_on(evaluator: ConditionEvaluator) -> None:
    response = facts(LIST_3000)
    await evaluator.judge("json.all(x, x >= 0)", response, time_left=30)  # the worker has started
    started = time.perf_counter()
    runaway = asyncio.ensure_future(evaluator.judge(RUNAWAY, response, time_left=30))
    lateness = await ticks_during(runaway)
    verdict = await runaway
    assert 1.0 <= time.perf_counter() - started < 2.5
    assert verdict == ConditionVerdict(False, f"the condition took longer than 1 s and was stopped: {RUNAWAY}")
    assert len(lateness) > 50 and max(lateness) < 0.2, max(lateness)
    # The killed worker is replaced at the next use.
    assert await evaluator.judge("json.all(x, x >= 0)", response, time_left=30) == ConditionVerdict(
        True, "the condition holds"
    )


async def test_the_deadline_is_at_most_what_is_left_of_the_checks_timeout(evaluator: ConditionEvaluator) -> None:
    started = time.perf_counter()
    verdict = await evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=0.4)
    assert verdict.detail.startswith("the condition took longer than 0.4 s and was stopped")
    assert time.perf_counter() - started < 1.0 + 0.4  # the worker's start-up is not counted


async def test_memory_is_capped() -> None:
    async with ConditionEvaluator(memory_limit_bytes=192 * 1024 * 1024) as evaluator:
        expression = "json.map(x, body + body + body).size() > 0"
        verdict = await evaluator.judge(expression, facts(json.dumps([0] * 10_000) + " " * 500_000), time_left=30)
        assert verdict == ConditionVerdict(
            False, f"the condition ran out of memory (more than 192 MiB) and was stopped: {expression}"
        )
        assert (await evaluator.judge("json.exists(x, x == 0)", facts("[0]"), time_left=30)).holds


async def test_a_cancelled_evaluation_kills_its_worker(evaluator: ConditionEvaluator) -> None:
    await evaluator.judge("json.all(x, x >= 0)", facts("[1]"), time_left=30)
    (pid,) = evaluator.worker_pids()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):  # as the check's own timeout cancels it
            await evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=30)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not alive(pid) and evaluator.worker_pids() == []


async def test_evaluations_queue_for_the_workers_and_never_share_one() -> None:
    async with ConditionEvaluator(workers=2) as evaluator:
        response = facts(json.dumps(list(range(3000))))
        verdicts = await asyncio.gather(*(
            evaluator.judge(f"json.exists(x, x == {number})", response, time_left=30) for number in range(2990, 3010)
        ))  # fmt: skip
        assert [verdict.holds for verdict in verdicts] == [True] * 10 + [False] * 10
        assert len(evaluator.worker_pids()) == 2


async def test_close_leaves_no_process_idle_or_busy() -> None:
    evaluator = ConditionEvaluator(workers=2)
    await asyncio.gather(*(evaluator.judge("json.all(x, x >= 0)", facts(LIST_3000), time_left=30) for _ in range(2)))
    pids = evaluator.worker_pids()
    assert len(pids) == 2
    busy = asyncio.ensure_future(evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=30))
    await asyncio.sleep(0.3)  # one worker is busy with it, the other idle
    await evaluator.close()
    verdict = await busy
    assert verdict.detail.startswith("the condition was stopped: the poller is stopping")
    assert not any(alive(pid) for pid in pids)
    later = await evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=30)
    assert later.detail.startswith("the condition was not evaluated: the poller is stopping")


async def test_a_worker_sees_none_of_the_pollers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHGATE_DATABASE_URL", "postgresql://user:secret@127.0.0.1/db")
    async with ConditionEvaluator() as evaluator:
        await evaluator.judge("json.all(x, x >= 0)", facts("[1]"), time_left=30)
        (pid,) = evaluator.worker_pids()
        environment = (await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)).split(b"\0")
        assert not [entry for entry in environment if entry.startswith(b"HEALTHGATE_")]
        assert os.environ["HEALTHGATE_DATABASE_URL"]  # the poller keeps its own


async def test_the_memory_cap_leaves_room_for_the_largest_bodies() -> None:
    # The costliest 1 MiB JSON to hold (350,000 empty objects: a dict each in Python, a map each in CEL), read
    # whole twice over: under the default cap with room to spare (it fits in 192 MiB too). It takes 0.8 s on a quiet
    # machine: the deadline is longer here, this is about memory.
    async with ConditionEvaluator(deadline_seconds=20) as evaluator:
        body = "[" + ",".join(["{}"] * 349_000) + "]"
        verdict = await evaluator.judge("json.all(x, x == x) && json == json", facts(body), time_left=30)
        assert verdict == ConditionVerdict(True, "the condition holds")


async def test_a_worker_that_dies_is_replaced() -> None:
    pool = WorkerPool(1, conditions.MEMORY_LIMIT_BYTES)
    holds = ConditionVerdict(True, "the condition holds")
    try:
        assert await pool.evaluate("json.all(x, x > 0)", facts("[1]"), 5) == holds
        (pid,) = pool.pids()
        os.kill(pid, 9)  # while idle: the next request starts a new one
        while alive(pid):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the event loop has seen it exit
        assert await pool.evaluate("json.all(x, x > 0)", facts("[1]"), 5) == holds
        (pid,) = pool.pids()
        asyncio.get_running_loop().call_later(0.3, os.kill, pid, 9)  # while busy: that request fails in words
        answer = await pool.evaluate(RUNAWAY, facts(LIST_3000), 5)
        assert answer == "was stopped: its worker process ended (signal 9)"
        assert await pool.evaluate("json.all(x, x > 0)", facts("[1]"), 5) == holds
    finally:
        await pool.close()


async def test_a_known_runaway_finding_every_worker_busy_is_not_evaluated() -> None:
    # A runaway that was stopped once does not queue behind the others (each of which would wait up to its timeout).
    async with ConditionEvaluator(workers=1) as evaluator:
        first = await evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=30)
        assert first.detail.startswith("the condition took longer than 1 s and was stopped")
        running = asyncio.ensure_future(evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=30))  # a free worker
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        refused = await evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=30)
        # Queued, it would wait for the busy worker's runaway, which its 1 s deadline stops 0.5 s from now.
        assert time.perf_counter() - started < 0.4
        assert refused == ConditionVerdict(
            False,
            "the condition was not evaluated: it was stopped at its last evaluation, and every condition worker is "
            f"busy: {RUNAWAY}",
        )
        assert (await running).detail.startswith("the condition took longer than 1 s and was stopped")
        # One that finishes in time is a runaway no more: it may wait for a worker again.
        assert (await evaluator.judge(RUNAWAY, facts("[1, 1]"), time_left=30)).holds
        running = asyncio.ensure_future(evaluator.judge("json.all(x, x >= 0)", facts(LIST_3000), time_left=30))
        await asyncio.sleep(0)
        assert (await evaluator.judge(RUNAWAY, facts("[1]"), time_left=30)).holds
        assert (await running).holds


async def test_a_freed_worker_goes_to_a_condition_that_is_not_a_runaway_first() -> None:
    async with ConditionEvaluator(workers=1) as evaluator:
        finished: list[str] = []

        async def judge(name: str, expression: str, body: str) -> ConditionVerdict:
            verdict = await evaluator.judge(expression, facts(body), time_left=30)
            finished.append(name)
            return verdict

        first = asyncio.ensure_future(judge("first runaway", RUNAWAY, LIST_3000))
        await asyncio.sleep(0.3)  # it runs; the next two wait, the runaway first
        second = asyncio.ensure_future(judge("second runaway", RUNAWAY, LIST_3000))
        await asyncio.sleep(0.05)
        quick = asyncio.ensure_future(judge("quick", "json.exists(x, x == 1)", LIST_3000))
        verdicts = await asyncio.gather(first, second, quick)
        # The first was stopped: the second is a known runaway when the worker is freed, and waits for the quick one.
        assert finished == ["first runaway", "quick", "second runaway"], verdicts
        assert verdicts[2].holds
        assert verdicts[1].detail.startswith("the condition took longer than 1 s and was stopped")


async def test_a_check_that_times_out_waiting_for_a_worker_leaves_none_taken() -> None:
    async with ConditionEvaluator(workers=1) as evaluator:
        running = asyncio.ensure_future(evaluator.judge(RUNAWAY, facts(LIST_3000), time_left=30))
        await asyncio.sleep(0.3)
        for _ in range(3):  # cancelled while waiting (the check's own timeout), some as the worker is handed over
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.25):
                    await evaluator.judge("json.all(x, x == 1)", facts(LIST_3000), time_left=30)
        await running
        verdicts = await asyncio.gather(
            *(evaluator.judge("json.all(x, x == 1)", facts(LIST_3000), time_left=30) for _ in range(3))
        )
        assert all(verdict.holds for verdict in verdicts) and len(evaluator.worker_pids()) == 1
