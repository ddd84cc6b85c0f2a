"""Adversarial tests of patch campaigns (CONTRACT §6) with the real broker, database, poller, gates and api: bad
job.start input, halts racing the release passes, and a whole campaign driven as an executor would (duplicate
job.finished, several gates, one of them killed) checked from the event stream for budget overruns and double
decisions or outcomes."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import EventCapture
from tests.support.processes import ServiceProcess
from tests.support.services import BackingServices
from tests.test_budget import group_name, make_hosts
from tests.test_gate import Publisher, drain_dead_letters, in_seconds
from tests.test_verification import finish, jobs, start  # noqa: F401  (jobs: fixture)

pytestmark = pytest.mark.usefixtures("poller", "gate")
DECISIONS = ("job.released", "job.failed", "job.cancelled")
OUTCOMES = ("job.verified", "job.verification_failed")


def of_job(job_id: str) -> object:
    return lambda event: event.data["job_id"] == job_id


# ---- job.start with a max_failed_hosts the database cannot hold -----------------------------------------


@pytest.mark.parametrize("max_failed_hosts", [2**31, 10**30])
async def test_a_max_failed_hosts_too_large_to_store_is_an_invalid_request_at_once(
    max_failed_hosts: int, jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient,  # noqa: F811
    backing: BackingServices, exchange_name: str, gate: ServiceProcess,
) -> None:  # fmt: skip
    """A count no job can reach is still a count the jobs table (integer) cannot hold: the job.start must be
    answered invalid_request at once and dead-lettered, never retried until its delivery limit."""
    group = group_name()
    [(host_id, _)] = await make_hosts(admin, group, 1)
    job = f"huge-{uuid.uuid4().hex[:6]}"
    await jobs.send(
        "job.start",
        {"job_id": job, "host_id": host_id, "window_ends_at": in_seconds(60), "max_failed_hosts": max_failed_hosts},
    )
    [failed] = await events.wait_for("job.failed", of_job(job))
    assert failed.data["reason"] == "invalid_request"
    assert "max_failed_hosts" in str(failed.data["detail"])
    dead = await drain_dead_letters(backing.amqp_url, f"{exchange_name}.dead", expected=1)
    assert job.encode() in dead[0].body
    assert not events.matching("job.released", of_job(job))
