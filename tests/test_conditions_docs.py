"""The examples of docs/conditions.md, read out of the page so that they cannot drift: every condition compiles,
and is true for each answer shown with it and false (not an error) for each answer marked `fails`.

Each answer is served as written by a raw server on 127.0.0.1 (over TLS with a certificate of `tls-days` days where
the block says so) and judged by the poller's own prober in this process, with its own condition evaluator: the same
path as a scheduled run, without the database and broker around it. The status rule is left out (every status is
expected) so that the condition alone decides."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.poller.conditions import ConditionEvaluator
from services.poller.probes import CheckTarget, Prober, probe_session
from shared.conditions import compile_condition
from tests.support.raw_http import RawHttpServer, response
from tests.test_conditions import in_days, tls_context

PAGE = Path(__file__).resolve().parent.parent / "docs" / "conditions.md"
FENCE = re.compile(r"^```(?P<language>\w+)(?P<info>[^\n]*)\n(?P<text>.*?)\n```$", re.MULTILINE | re.DOTALL)
EVERY_STATUS = "1xx,2xx,3xx,4xx,5xx"


@dataclass
class Answer:
    raw: str
    holds: bool
    tls_days: int | None


@dataclass
class Example:
    title: str
    condition: str = ""
    answers: list[Answer] = field(default_factory=list)


def examples() -> list[Example]:
    """The page's "## Examples": one per "### " heading, its ```http answers and its one ```cel condition."""
    section = PAGE.read_text().split("\n## Examples\n", 1)[1]
    found = []
    for part in section.split("\n### ")[1:]:
        example = Example(part.split("\n", 1)[0])
        for block in FENCE.finditer(part):
            words = block["info"].split()
            if block["language"] == "cel":
                assert not example.condition, f"{example.title}: one condition per example"
                example.condition = block["text"]
            elif block["language"] == "http":
                days = next((int(word.split("=", 1)[1]) for word in words if word.startswith("tls-days=")), None)
                example.answers.append(Answer(block["text"], "fails" not in words, days))
        found.append(example)
    return found


def served(answer: Answer) -> bytes:
    """The answer as a server sends it: CRLF line ends in the head, a Content-Length for the body as written."""
    head, body = answer.raw.split("\n\n", 1)
    status_line, *header_lines = head.split("\n")
    headers = [(name, value) for name, value in (line.split(": ", 1) for line in header_lines)]
    return response(status_line.removeprefix("HTTP/1.1 "), headers, (body + "\n").encode("utf-8"))


EXAMPLES = examples()


def test_the_page_has_ten_examples_or_more_each_true_and_false_once_at_least() -> None:
    assert len(EXAMPLES) >= 10
    for example in EXAMPLES:
        assert example.condition, example.title
        assert any(answer.holds for answer in example.answers), example.title
        assert any(not answer.holds for answer in example.answers), example.title


def test_every_condition_on_the_page_compiles() -> None:
    for block in FENCE.finditer(PAGE.read_text()):
        if block["language"] == "cel":
            compile_condition(block["text"])


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    async with probe_session([]) as session, ConditionEvaluator() as conditions:
        yield Prober(session, [], None, conditions=conditions)


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.title.split(".")[0] for example in EXAMPLES])
async def test_each_example_holds_for_its_answers(prober: Prober, example: Example, tmp_path: Path) -> None:
    for number, answer in enumerate(example.answers):
        context = tls_context(tmp_path, in_days(answer.tls_days)) if answer.tls_days is not None else None
        with RawHttpServer(ssl_context=context) as server:
            server.set("/", served(answer))
            target = CheckTarget(
                check_id=uuid.uuid4(), host_id=uuid.uuid4(), check_type="http", timeout_seconds=10,
                host_name="127.0.0.1", url=server.url("/"), expected_status=EVERY_STATUS,
                condition=example.condition,
            )  # fmt: skip
            outcome = await prober.run(target)
        where = f"{example.title}, answer {number + 1}: {outcome.detail}"
        if answer.holds:
            assert (outcome.healthy, outcome.reason) == (True, "ok"), where
        else:
            assert (outcome.healthy, outcome.reason) == (False, "condition"), where
            assert ", but the condition is false: " in outcome.detail, where  # false, not an error
        if answer.tls_days is not None:
            assert outcome.cert_expires_at is not None, where
