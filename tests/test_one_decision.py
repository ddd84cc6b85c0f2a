"""Exactly one decision per job host, whoever decides (CONTRACT §5; docs/architecture.md "Exactly one decision
per job host"): the gate's evaluation, a job.cancel and the api's override race on the same job hosts, and
each job host ends with one decision and one decision event. All of them decide through one function,
`shared.jobs.decide`.

The paths run in this process, as the gate and the api run them (their own transactions, on one pool),
against a database of the test's own, so that no gate of the session decides a job host meanwhile.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

import shared.jobs
from services.api.auth import Principal
from services.api.check_runs import CheckRunClient
from services.api.context import ApiContext, ApiMetrics
from services.api.jobs import halt_or_resume_on, override_on
from services.api.problems import Problem
from services.api.schemas import HaltRequest, OverrideRequest
from services.gate.evaluation import EVENT_SOURCE as GATE_SOURCE
from services.gate.evaluation import cancel, decide_at_once, evaluate_job_host
from shared import hosts
from shared.crypto import SecretBox
from shared.events import JobStart, decision_event_id
from shared.gate_rules import Verdict
from shared.group_policies import GroupPolicy, put_policy
from shared.jobs import StartedJobHost
from shared.messaging import Broker
from shared.notification_sending import NotificationSender
from shared.settings import load_settings
from shared.topology import Topology

JOB_HOSTS_PER_ROUND = 60
ROUNDS = 3
RETRY_SECONDS = 2.0
OPEN_WINDOW = "2099-01-01T00:00:00Z"
CLOSED_WINDOW = "2001-01-01T00:00:00Z"
DECISION_KEYS = ("job.released", "job.failed", "job.cancelled")


@pytest.fixture
def pool(private_pool: asyncpg.Pool) -> asyncpg.Pool:
    return private_pool


def api_context(pool: asyncpg.Pool) -> ApiContext:
    """The api's context as its lifespan builds it; the override needs only the pool (the broker is never
    connected: an override's event goes through the outbox)."""
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", Topology("hgtest-unused"), connection_name="test")
    return ApiContext(
        settings=load_settings(), pool=pool, broker=broker, secrets=SecretBox(bytes(32)),
        metrics=ApiMetrics(CollectorRegistry()), check_runs=CheckRunClient(broker),
        notifications=NotificationSender(()),  # never entered: an override sends no notification
    )  # fmt: skip


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """Every call of shared.jobs.decide and of the gate's fast release (shared.jobs.decide_fast): (source,
    status, whether it decided)."""
    calls: list[tuple[str, str, bool]] = []
    decide = shared.jobs.decide
    decide_fast = shared.jobs.decide_fast

    async def recorded(connection: asyncpg.Connection, decision: shared.jobs.JobDecision, **kwargs: Any) -> Any:
        row = await decide(connection, decision, **kwargs)
        calls.append((kwargs["source"], decision.status, row is not None))
        return row

    async def recorded_fast(
        connection: asyncpg.Connection, started: Any, decision: shared.jobs.JobDecision, **kwargs: Any
    ) -> Any:
        outcome = await decide_fast(connection, started, decision, **kwargs)
        calls.append((kwargs["source"], decision.status, outcome == "decided"))
        return outcome

    monkeypatch.setattr(shared.jobs, "decide", recorded)
    monkeypatch.setattr(shared.jobs, "decide_fast", recorded_fast)
    return calls


async def start(
    pool: asyncpg.Pool, job_id: str, host_id: uuid.UUID, window: str, *, recorded: list[StartedJobHost] | None = None
) -> JobStart:
    """Record a job.start as the gate does (`record_start`), and keep what it read in `recorded` (for the fast
    release)."""
    job = JobStart.model_validate({"job_id": job_id, "host_id": str(host_id), "window_ends_at": window})
    async with pool.acquire() as connection:
        started = await shared.jobs.record_start(connection, job)
    assert started is not None
    if recorded is not None:
        recorded.append(started)
    return job


def deciders(
    pool: asyncpg.Pool, context: ApiContext, job: JobStart, started: StartedJobHost | None = None
) -> dict[str, Callable[[], Awaitable[bool]]]:
    """The ways a waiting job host is decided; each says whether it decided it. With `started` (what recording
    its job.start read), also the gate's fast release of a job.start just recorded (`decide_at_once`)."""

    async def gate() -> bool:
        async with pool.acquire() as connection, connection.transaction():
            evaluation = await evaluate_job_host(
                connection, job.job_id, job.host_id, retry_seconds=RETRY_SECONDS, rerun_failing=True
            )
        return evaluation is not None and evaluation.verdict is not Verdict.WAIT

    async def cancelled() -> bool:
        async with pool.acquire() as connection, connection.transaction():
            return await cancel(connection, job.job_id, job.host_id)

    async def override() -> bool:
        body = OverrideRequest.model_validate({"decision": random.choice(["release", "fail"]), "reason": "by hand"})
        try:
            await override_on(context, "admin-1", job.job_id, job.host_id, body)
        except Problem as problem:
            assert problem.status == 409, problem.detail  # decided by another
            return False
        return True

    async def fast() -> bool:
        assert started is not None
        async with pool.acquire() as connection:
            return await decide_at_once(connection, started) is not None

    paths = {"gate": gate, "cancel": cancelled, "override": override}
    if started is not None:
        paths["fast"] = fast
    return paths


async def outcome(pool: asyncpg.Pool, job: JobStart) -> tuple[asyncpg.Record, list[asyncpg.Record], int]:
    """The job host's row, its decision events in the outbox, and its override audit entries."""
    async with pool.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT status, reason, overridden_by, decided_at FROM gate_jobs WHERE job_id = $1 AND host_id = $2",
            job.job_id, job.host_id,
        )  # fmt: skip
        events = await connection.fetch(
            "SELECT event_id, routing_key FROM outbox WHERE correlation_id = $1 AND routing_key = ANY($2)",
            job.job_id, list(DECISION_KEYS),
        )  # fmt: skip
        audits = await connection.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'job.override' AND entity_id = $1", job.job_id
        )
    return row, events, audits


def assert_one_decision(job: JobStart, won: list[str], row: asyncpg.Record, events: list[Any], audits: int) -> None:
    assert len(won) == 1, f"{job.job_id}: decided by {won}"
    assert row["status"] != "waiting_health_check" and row["decided_at"] is not None
    assert [event["event_id"] for event in events] == [decision_event_id(job.job_id, job.host_id)]
    assert events[0]["routing_key"] == f"job.{row['status']}"
    winner = won[0]
    assert (row["overridden_by"] == "admin-1") == (winner == "override") == (audits == 1)
    if winner == "cancel":
        assert row["status"] == "cancelled"
    elif winner in ("gate", "fast"):
        assert (row["status"], row["reason"]) in {("released", None), ("failed", "window_closed")}
    else:
        assert row["reason"] == ("overridden" if row["status"] == "failed" else None)


async def test_the_gate_a_cancel_and_an_override_racing_decide_each_job_host_once(
    pool: asyncpg.Pool, decisions: list[tuple[str, str, bool]]
) -> None:
    context = api_context(pool)
    known = uuid.uuid4()
    async with pool.acquire() as connection, connection.transaction():
        await hosts.insert_host(connection, known, name="db-1", group="team-a", agent_url=None)
    jobs: list[JobStart] = []
    wins: dict[str, int] = {"gate": 0, "cancel": 0, "override": 0, "fast": 0}
    for round_number in range(ROUNDS):
        started = []
        recorded: list[StartedJobHost] = []
        for index in range(JOB_HOSTS_PER_ROUND):
            # The gate releases a host without checks and an unknown host at once, and fails a closed window.
            host_id = known if index % 2 else uuid.uuid4()
            window = CLOSED_WINDOW if index % 5 == 0 else OPEN_WINDOW
            started.append(await start(pool, f"patch-{round_number}-{index}", host_id, window, recorded=recorded))

        async def race(job: JobStart, recorded: StartedJobHost) -> list[str]:
            paths = deciders(pool, context, job, recorded)

            async def run(name: str) -> str | None:
                await asyncio.sleep(random.random() * 0.004)  # a different order each time
                return name if await paths[name]() else None

            names = list(paths)
            random.shuffle(names)
            return [name for name in await asyncio.gather(*(run(name) for name in names)) if name]

        results = await asyncio.gather(*(race(job, read) for job, read in zip(started, recorded, strict=True)))
        for job, won in zip(started, results, strict=True):
            assert_one_decision(job, won, *await outcome(pool, job))
            wins[won[0]] += 1
        jobs += started

    # Every decision was written by shared.jobs.decide, once per job host, and never a second time.
    written = [(source, status) for source, status, decided in decisions if decided]
    assert len(written) == len(jobs) == sum(wins.values())
    assert sum(1 for source, _ in written if source == GATE_SOURCE) == wins["gate"] + wins["cancel"] + wins["fast"]
    assert all(wins.values()), wins  # each path won some races: each was raced
    assert sum(1 for source, _ in written if source == context.source) == wins["override"]
    async with pool.acquire() as connection:
        assert await connection.fetchval(
            "SELECT count(*) FROM outbox WHERE routing_key = ANY($1)", list(DECISION_KEYS)
        ) == len(jobs)
        assert await connection.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check'") == 0


async def test_the_gate_and_the_override_decide_through_the_same_function(
    pool: asyncpg.Pool, decisions: list[tuple[str, str, bool]]
) -> None:
    """Both orders, one after the other: whichever comes first decides, through `shared.jobs.decide`, and the
    other finds the job host decided (the gate: not waiting any more; the override: 409)."""
    context = api_context(pool)
    first_override = await start(pool, "override-first", uuid.uuid4(), OPEN_WINDOW)
    first_gate = await start(pool, "gate-first", uuid.uuid4(), OPEN_WINDOW)

    paths = deciders(pool, context, first_override)
    assert await paths["override"]() and not await paths["gate"]()
    paths = deciders(pool, context, first_gate)
    assert await paths["gate"]() and not await paths["override"]()

    assert [(source, decided) for source, _, decided in decisions] == [(context.source, True), (GATE_SOURCE, True)]
    assert_one_decision(first_override, ["override"], *await outcome(pool, first_override))
    assert_one_decision(first_gate, ["gate"], *await outcome(pool, first_gate))


HALT_ROUNDS = 30
HOSTS_PER_JOB = 6


async def test_a_manual_halt_racing_the_gate_overrides_and_a_cancel_decides_each_job_host_once(
    pool: asyncpg.Pool, decisions: list[tuple[str, str, bool]]
) -> None:
    """A manual halt (`POST /api/v1/jobs/{job_id}/halt`) fails every waiting job host of its job while the gate's
    release passes (a group with a disruption budget: each pass locks every waiting job host of the group), the
    api's overrides and a job.cancel decide the same job hosts. The job's hosts arrive in the opposite order of
    their ids, so a halt that locked them in another order than the passes' (arrival order) would deadlock with
    them. Every path answers (no deadlock, no 500), and each job host is decided once, with one decision event."""
    context = api_context(pool)
    admin = Principal("admin-1", "admin", ())
    group = "team-halt"
    host_ids = sorted((uuid.uuid4() for _ in range(HOSTS_PER_JOB)), reverse=True)
    async with pool.acquire() as connection, connection.transaction():
        for index, host_id in enumerate(host_ids):
            await hosts.insert_host(connection, host_id, name=f"halt-{index}", group=group, agent_url=None)
        await put_policy(connection, group, GroupPolicy(max_unavailable=2))
    for round_number in range(HALT_ROUNDS):
        job_id = f"halted-{round_number}"
        started = [await start(pool, job_id, host_id, OPEN_WINDOW) for host_id in host_ids]
        decisions.clear()

        async def halt(job_id: str = job_id) -> None:
            await asyncio.sleep(random.random() * 0.004)
            view = await halt_or_resume_on(context, admin, job_id, HaltRequest(reason="stop"), halt=True)
            assert view.halted

        async def path(job: JobStart, name: str) -> None:
            await asyncio.sleep(random.random() * 0.004)
            await deciders(pool, context, job)[name]()

        # A gate's pass for one job host may decide another (the budget's pass judges them all): whoever decides a
        # job host, it is decided once, through shared.jobs.decide.
        racers = [path(job, "gate") for job in started] + [path(job, "override") for job in started[::3]]
        await asyncio.gather(halt(), *racers, path(started[-1], "cancel"))
        assert sum(1 for _, _, decided in decisions if decided) == len(started), decisions
        for job in started:
            row, events, _ = await outcome(pool, job)  # the events of every job host of the job
            assert row["status"] != "waiting_health_check" and row["decided_at"] is not None
            assert [event["routing_key"] for event in events if event["event_id"] == decision_event_id(
                job.job_id, job.host_id
            )] == [f"job.{row['status']}"]  # fmt: skip
        assert len(events) == len(started)
        async with pool.acquire() as connection:
            assert (
                await connection.fetchval(
                    "SELECT count(*) FROM outbox WHERE routing_key = 'job.halted' AND correlation_id = $1", job_id
                )
                == 1
            )
