"""The gate rules of CONTRACT §5 and §6 as pure functions of a job host, its gating checks, its group's policy
and disruption budget: the gate applies them to a locked row (services/gate/evaluation.py), and the API's
preview to a host it only looks at, so both give the same verdict for the same state.

No I/O here: the callers read the checks (shared/gating.py), the policy (shared/group_policies.py), the
job's halt state and the group's unavailable hosts (shared/jobs.py), and pass them in.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from shared.events import FailureReason, WaitingFor
from shared.gating import GatingCheck
from shared.group_policies import GroupPolicy

UnknownHostPolicy = Literal["release", "fail"]
NO_RESULT_BEFORE_CLOSE = "no result before the window closed"
DEFAULT_POLICY = GroupPolicy()


class Verdict(Enum):
    RELEASE = "release"
    WINDOW_CLOSED = "window_closed"
    UNKNOWN_HOST = "unknown_host"
    INVALID_REQUEST = "invalid_request"  # never from `decide`: a job.start that did not validate
    NO_CHECKS = "no_checks"
    JOB_HALTED = "job_halted"
    WAIT = "wait"


# The verdicts that fail a job host, and the job.failed reason each gives (INVALID_REQUEST: never `decide`'s).
_FAILURE_REASONS: dict[Verdict, FailureReason] = {
    Verdict.WINDOW_CLOSED: "window_closed",
    Verdict.UNKNOWN_HOST: "unknown_host",
    Verdict.INVALID_REQUEST: "invalid_request",
    Verdict.NO_CHECKS: "no_checks",
    Verdict.JOB_HALTED: "job_halted",
}


# ---- the disruption budget (CONTRACT §6) -----------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A host of the group that is unavailable: in patch (`patching_job`: the earliest of its jobs released
    or verifying) and/or `unhealthy` (its health_check_status); or, in a preview only, `previewed`: released
    by a job.start previewed before it (the preview has no job id)."""

    host_id: uuid.UUID
    name: str
    patching_job: str | None = None
    unhealthy: bool = False
    previewed: bool = False

    def why(self) -> str:
        """ "job J patching", "unhealthy", or both, as the budget's detail names the holder ("released earlier
        in this preview" for a previewed one)."""
        patching = [f"job {self.patching_job} patching"] if self.patching_job is not None else []
        if self.previewed and self.patching_job is None:
            patching = ["released earlier in this preview"]
        return ", ".join(patching + (["unhealthy"] if self.unhealthy else []))


@dataclass(frozen=True)
class BudgetView:
    """A group's disruption budget as one waiting job host sees it: `limit` (`budget_limit` of the policy),
    the group's unavailable hosts (`holders`, each once), and whether the job host's own host is one of
    them (`counted`: it is counted once, so a second job on a host in patch does not take a second unit)."""

    group: str
    limit: int
    holders: tuple[Holder, ...]
    counted: bool = False

    @property
    def in_use(self) -> int:
        return len(self.holders)

    def fits(self) -> bool:
        """Whether releasing this host keeps the group within its budget (itself counted once)."""
        return self.in_use + (0 if self.counted else 1) <= self.limit

    def describe(self) -> str:
        """The detail naming who holds the budget (CONTRACT §6): "disruption budget of group web: 2 of 2
        unavailable: web-1 (job J patching), web-3 (unhealthy)"; holders by name."""
        text = f"disruption budget of group {self.group}: {self.in_use} of {self.limit} unavailable"
        if not self.holders:
            return text
        holders = sorted(self.holders, key=lambda holder: (holder.name, str(holder.host_id)))
        return text + ": " + ", ".join(f"{holder.name} ({holder.why()})" for holder in holders)


def budget_wait(view: BudgetView) -> str:
    """The waiting detail of a job host that waits for the budget alone (CONTRACT §6)."""
    return "waiting for the " + view.describe()


def budget_waiting_detail(budget: GroupBudget) -> str:
    """The waiting detail of every job host of the group that waits for the budget alone: it names the group's
    holders, the same for each of them."""
    return budget_wait(BudgetView(budget.group, budget.limit, tuple(budget.holders.values())))


@dataclass(frozen=True)
class GroupBudget:
    """A group's budget during one pass over its waiting job hosts (or one preview): the limit and the
    unavailable hosts by id, and the names of all its hosts. Each release in the pass adds its host
    (`patching`), so that the job hosts after it, in arrival order, see the budget it took."""

    group: str
    limit: int
    holders: dict[uuid.UUID, Holder]
    names: dict[uuid.UUID, str] = dataclasses.field(default_factory=dict)

    def view(self, host_id: uuid.UUID) -> BudgetView:
        return BudgetView(self.group, self.limit, tuple(self.holders.values()), counted=host_id in self.holders)

    @property
    def in_use(self) -> int:
        return len(self.holders)

    def patching(self, host_id: uuid.UUID, job_id: str | None) -> GroupBudget:
        """The budget after releasing `host_id` for `job_id` (a host already in patch keeps its first job);
        `job_id` None: a previewed job.start (`Holder.previewed`)."""
        holder = self.holders.get(host_id, Holder(host_id, self.names.get(host_id, str(host_id))))
        if job_id is None:
            holder = dataclasses.replace(holder, previewed=True)
        elif holder.patching_job is None:
            holder = dataclasses.replace(holder, patching_job=job_id)
        return GroupBudget(self.group, self.limit, self.holders | {host_id: holder}, self.names)


# ---- decisions -------------------------------------------------------------------------------------------


def stable(check: GatingCheck, now: dt.datetime, stable_seconds: int) -> bool:
    """Healthy for at least `stable_seconds` (CONTRACT §6): `healthy_since` at or before now - stable_seconds.
    With 0 every check is stable; a healthy check without a known `healthy_since` is not, with more."""
    if stable_seconds <= 0:
        return True
    # A difference of two instants, never an instant minus a duration: a preview may judge at any instant Python
    # holds (`at` in year 1), where now - stable_seconds would not be one.
    return check.healthy_since is not None and now - check.healthy_since >= dt.timedelta(seconds=stable_seconds)


def _unstable(
    checks: list[GatingCheck], not_ready: list[GatingCheck], now: dt.datetime, policy: GroupPolicy
) -> list[GatingCheck]:
    """The ready checks not yet healthy for `stable_seconds` (a check not ready is waited on as `checks`)."""
    return [check for check in checks if check not in not_ready and not stable(check, now, policy.stable_seconds)]


def closes_at(window_ends_at: dt.datetime, policy: GroupPolicy) -> dt.datetime:
    """The last moment a job host may be released: the window's end less the group's release cutoff."""
    if policy.release_cutoff_seconds <= 0:
        return window_ends_at
    try:
        return window_ends_at - dt.timedelta(seconds=policy.release_cutoff_seconds)
    except OverflowError:  # a window ending within the cutoff of datetime.min
        return dt.datetime.min.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Decision:
    """The verdict for a job host and what it was made on.

    `checks`: its gating checks; `not_ready`: those not healthy by a fresh result; `unstable`: those ready but
    not yet healthy for the policy's `stable_seconds`; `waiting_for`: for WAIT, each unmet condition among
    "checks", "stability" and "budget" (CONTRACT §6); `budget`: the budget view it was judged on (None: no
    budget applies); `policy`: the group's."""

    verdict: Verdict
    checks: list[GatingCheck]
    not_ready: list[GatingCheck]
    unstable: list[GatingCheck] = dataclasses.field(default_factory=list)
    waiting_for: list[WaitingFor] = dataclasses.field(default_factory=list)
    budget: BudgetView | None = None
    policy: GroupPolicy = DEFAULT_POLICY

    def failure_detail(self, window_ends_at: dt.datetime, received_at: dt.datetime | None = None) -> str:
        """The detail of a window_closed failure: each check not ready when the window closed (or, with a
        release cutoff, when the cutoff passed), and why; the cutoff named when there is one. With its checks
        ready and stable, a host that waited for its group's disruption budget says so and names the budget's
        holders (CONTRACT §6), as the gate saw the budget when it judged the host. A job.start received (at
        `received_at`) after its window's end is told so first: the host never had a chance, whatever its checks
        said (the window's end comes with the job.start; a release cutoff may have been set since)."""
        cutoff = self.policy.release_cutoff_seconds
        if cutoff > 0:
            closed = f"the release cutoff ({cutoff} s before the window's end, release_cutoff_seconds) passed"
            had_closed = closed
        else:
            closed, had_closed = "the maintenance window closed", "the maintenance window had closed"
        moment = closes_at(window_ends_at, self.policy)
        failing = "; ".join(
            f"{check.name}: {check.why_not_ready(moment, no_result=NO_RESULT_BEFORE_CLOSE)}" for check in self.not_ready
        )
        if received_at is not None and received_at >= window_ends_at:
            # Not the host's fault, whatever its checks: say so first, then (CONTRACT §5) the checks as they stood.
            late = (
                f"the job.start arrived (at {received_at.isoformat()}) after its maintenance window had ended"
                f" (at {window_ends_at.isoformat()})"
            )
            return f"{late}; checks not healthy when it closed: {failing}" if failing else late
        if self.not_ready:
            return f"{closed} while checks were not healthy: {failing}"
        if self.unstable:
            return f"{closed} while checks were not yet stable: {self.stability_detail(moment)}"
        if self.budget is not None and not self.budget.fits():
            return f"{closed} while the host waited for the {self.budget.describe()}"
        return had_closed

    def stability_detail(self, now: dt.datetime) -> str:
        """Each unstable check and how long it has been healthy, against `stable_seconds`."""
        parts = []
        for check in self.unstable:
            if check.healthy_since is None:
                parts.append(f"{check.name} (healthy since an unknown time)")
            else:
                healthy_for = max(0.0, (now - check.healthy_since).total_seconds())
                parts.append(f"{check.name} (healthy for {healthy_for:.0f} s)")
        return f"healthy for less than {self.policy.stable_seconds} s (stable_seconds): " + ", ".join(parts)

    def waiting_detail(self, now: dt.datetime) -> str:
        """What a waiting job host waits for, in words: the checks not ready, those not yet stable, the
        budget's holders (CONTRACT §6)."""
        parts = []
        if self.not_ready:
            parts.append("waiting for checks: " + ", ".join(check.name for check in self.not_ready))
        if self.unstable:
            parts.append("waiting for stability: " + self.stability_detail(now))
        if "budget" in self.waiting_for and self.budget is not None:
            parts.append(budget_wait(self.budget))
        return "; ".join(parts)

    def stable_at(self) -> dt.datetime | None:
        """When the last unstable check becomes stable, if it stays healthy: a waiting job host's timer need
        not wait a whole retry period past it. None without unstable checks (or one of unknown age)."""
        moments = [check.healthy_since for check in self.unstable]
        if not moments or any(moment is None for moment in moments):
            return None
        return max(moment for moment in moments if moment is not None) + dt.timedelta(
            seconds=self.policy.stable_seconds
        )

    @property
    def failure_reason(self) -> FailureReason | None:
        """The job.failed reason of a failing verdict (CONTRACT §5, §6); None for RELEASE and WAIT."""
        return _FAILURE_REASONS.get(self.verdict)

    def release_detail(self) -> str:
        """The detail of a release: its checks healthy (for stable_seconds), or none; the budget it fits in."""
        detail = "all gating checks healthy" if self.checks else "no gating checks on this host"
        if self.checks and self.policy.stable_seconds > 0:
            detail += f" for at least {self.policy.stable_seconds} s (stable_seconds)"
        if self.budget is not None:
            view = self.budget
            in_use = view.in_use + (0 if view.counted else 1)
            detail += f"; disruption budget of group {view.group}: {in_use} of {view.limit} unavailable with this host"
        return detail

    def detail(
        self,
        *,
        job_id: str | None,
        host_id: uuid.UUID,
        group: str | None,
        window_ends_at: dt.datetime | None,
        now: dt.datetime,
        received_at: dt.datetime | None = None,
    ) -> str:
        """The verdict in words, as the gate stores it with the decision (or the wait) and the preview shows it:
        `release_detail`, `waiting_detail(now)`, `failure_detail(window_ends_at, received_at)` for WINDOW_CLOSED
        (the gate first recomputes that decision with the checks as they were then, `window_closed`), or why the
        job host fails (`job_id`: its job, None in a preview; `group`: its host's, None for an unknown host;
        `window_ends_at` None: no window, as in a preview, which is never WINDOW_CLOSED; `received_at`: when the
        job.start was received, None if unknown)."""
        if self.verdict is Verdict.RELEASE:
            return self.release_detail()
        if self.verdict is Verdict.WINDOW_CLOSED and window_ends_at is not None:
            return self.failure_detail(window_ends_at, received_at)
        if self.verdict is Verdict.JOB_HALTED:
            return f"job {job_id} is halted: no more of its hosts are released"
        if self.verdict is Verdict.UNKNOWN_HOST:
            return (
                f"host {host_id} is not known to healthgate, and unknown hosts are failed "
                "(HEALTHGATE_GATE_UNKNOWN_HOST=fail)"
            )
        if self.verdict is Verdict.NO_CHECKS:
            return (
                f"host {host_id} has no enabled critical checks, and group {group} fails such hosts (no_checks: fail)"
            )
        return self.waiting_detail(now)


def decide(
    window_ends_at: dt.datetime | None,
    now: dt.datetime,
    checks: list[GatingCheck] | None,
    *,
    unknown_host: UnknownHostPolicy = "release",
    policy: GroupPolicy | None = None,
    halted: bool = False,
    budget: BudgetView | None = None,
) -> Decision:
    """The verdict for a waiting job host at `now`; `window_ends_at` None: no window (a preview names none, and
    none closes, whatever `now`: not even at the largest instant, which a far-future end could not exceed).

    `checks` are the host's enabled critical checks, None when the host is unknown. `policy`: its group's
    (None: the defaults, as for an unknown host); `halted`: whether its job is halted; `budget`: its group's
    disruption budget as this host sees it, None when none applies (no max_unavailable, unknown host).

    Rules in the order of CONTRACT §5 and §6:
    1. now at or past the window's end less `release_cutoff_seconds` → WINDOW_CLOSED (a job.start arriving
       after the cutoff fails at once);
    2. the job halted → JOB_HALTED;
    3. an unknown host → UNKNOWN_HOST when `unknown_host` is "fail" (HEALTHGATE_GATE_UNKNOWN_HOST), else it is
       released like a host without gating checks (no policy, no budget);
    4. a known host without gating checks and `no_checks: fail` → NO_CHECKS;
    5. gating checks not ready (`checks`) or ready but healthy for less than `stable_seconds` (`stability`;
       the two are exclusive per check) → WAIT;
    6. the budget: released only if the group then has at most `limit` unavailable hosts, itself counted
       once; otherwise WAIT for `budget`.
    `waiting_for` names "budget" only when checks and stability are met: whether a host that is not ready
    would fit depends on which hosts get ready first, and a host waiting on its own checks does not hold
    up the hosts behind it (FIFO among the ready ones), so "budget" would only be a guess there.
    7. → RELEASE."""
    policy = policy or DEFAULT_POLICY
    gating = checks or []
    not_ready = [check for check in gating if not check.ready(now)]
    if window_ends_at is not None and now >= closes_at(window_ends_at, policy):
        unstable = _unstable(gating, not_ready, now, policy)
        return Decision(Verdict.WINDOW_CLOSED, gating, not_ready, unstable, budget=budget, policy=policy)
    if halted:
        return Decision(Verdict.JOB_HALTED, gating, not_ready, policy=policy)
    if checks is None:
        verdict = Verdict.UNKNOWN_HOST if unknown_host == "fail" else Verdict.RELEASE
        return Decision(verdict, [], [], policy=policy)
    if not gating and policy.no_checks == "fail":
        return Decision(Verdict.NO_CHECKS, [], [], policy=policy)
    unstable = _unstable(gating, not_ready, now, policy)
    waiting_for: list[WaitingFor] = []
    if not_ready:
        waiting_for.append("checks")
    if unstable:
        waiting_for.append("stability")
    if not waiting_for and budget is not None and not budget.fits():
        waiting_for.append("budget")
    if waiting_for:
        return Decision(Verdict.WAIT, gating, not_ready, unstable, waiting_for, budget, policy)
    return Decision(Verdict.RELEASE, gating, [], budget=budget, policy=policy)


_LATEST = dt.datetime.max.replace(tzinfo=dt.UTC)


def holds_until(decision: Decision, window_ends_at: dt.datetime | None) -> dt.datetime:
    """The first moment at which the verdict `decision`, made at a moment before it, could change with time alone,
    all else being equal (the gate's fast release writes a verdict only before it: shared/jobs.py `decide_fast`).

    Only two rules depend on time against it: the window closing (`closes_at`, rule 1: any verdict but
    WINDOW_CLOSED becomes WINDOW_CLOSED) and, for RELEASE, a check's result growing older than its interval (not
    ready any more: healthy by a result no older than its interval, CONTRACT §5). Stability only grows with time,
    and the budget does not depend on it. WINDOW_CLOSED holds for ever (the largest instant). Raises ValueError for
    WAIT, which time changes in both directions (a check grows stale, another stable)."""
    if decision.verdict is Verdict.WAIT:
        raise ValueError("a WAIT verdict changes with time both ways; judge it again instead")
    if decision.verdict is Verdict.WINDOW_CLOSED or window_ends_at is None:
        until = _LATEST
    else:
        until = closes_at(window_ends_at, decision.policy)
    if decision.verdict is Verdict.RELEASE:
        for check in decision.checks:
            if check.last_checked_at is not None:
                try:
                    until = min(until, check.last_checked_at + dt.timedelta(seconds=check.interval_seconds))
                except OverflowError:  # a result dated within an interval of the largest instant
                    pass
    return until


@dataclass(frozen=True)
class Turn:
    """A job host judged in a group's release order: its job (`job_id`; None for a previewed job.start, which
    has none), host, window (None: none, a previewed job.start), gating checks (None: an unknown host) and whether
    its job is halted."""

    job_id: str | None
    host_id: uuid.UUID
    window_ends_at: dt.datetime | None
    checks: list[GatingCheck] | None
    halted: bool = False


class ReleaseOrder:
    """A group's job hosts judged one after the other in their release order (CONTRACT §6: the order their
    job.start arrived), each against the disruption budget the ones before it left: the gate's release pass
    (services/gate/evaluation.py) and the API's preview (services/api/preview.py) both judge through it, so
    they decide alike.

    `budget`: the group's (`shared.jobs.group_budget`), None when none applies (no max_unavailable, or a host
    of no group); each RELEASE of a known host takes its host's unit for the turns after it (`budget` is the
    budget after the turns judged so far). `now`, `policy` and `unknown_host` (HEALTHGATE_GATE_UNKNOWN_HOST)
    are the same for every turn."""

    def __init__(
        self,
        *,
        now: dt.datetime,
        policy: GroupPolicy | None,
        budget: GroupBudget | None,
        unknown_host: UnknownHostPolicy,
    ) -> None:
        self.now = now
        self.policy = policy or DEFAULT_POLICY
        self.budget = budget
        self.unknown_host: UnknownHostPolicy = unknown_host

    def judge(self, turn: Turn) -> Decision:
        """`decide` for the turn, its budget view the budget as the turns before it left it (an unknown host
        has none); a release then takes the host's unit."""
        known = turn.checks is not None
        view = self.budget.view(turn.host_id) if self.budget is not None and known else None
        decision = decide(
            turn.window_ends_at, self.now, turn.checks, unknown_host=self.unknown_host, policy=self.policy,
            halted=turn.halted, budget=view,
        )  # fmt: skip
        if decision.verdict is Verdict.RELEASE and self.budget is not None and known:
            self.budget = self.budget.patching(turn.host_id, turn.job_id)
        return decision


def window_closed(
    checks_then: list[GatingCheck],
    window_ends_at: dt.datetime,
    policy: GroupPolicy | None = None,
    budget: BudgetView | None = None,
) -> Decision:
    """The window_closed verdict, with the gating checks as they stood when the window closed — at the
    window's end, or at its release cutoff (`closes_at`) — (`checks_then`, see `gating_checks_as_of`) and
    those not ready at that moment.

    CONTRACT §5: still unhealthy when the window closes → job.failed naming each failing check and its
    detail; and a job still waiting when its window ends is failed, also when the gate was down then.
    Applied later (the gate was down, or a job.start arrived after its window), the checks must be
    described as they were at that moment, not as they are when the gate gets to it: a check that
    recovered since is still named, one that failed only since is not. `budget`: the host's view of its group's
    disruption budget as the gate judged it (None: none applies), named when the checks were ready."""
    policy = policy or DEFAULT_POLICY
    moment = closes_at(window_ends_at, policy)
    not_ready = [check for check in checks_then if not check.ready(moment)]
    unstable = _unstable(checks_then, not_ready, moment, policy)
    return Decision(Verdict.WINDOW_CLOSED, checks_then, not_ready, unstable, budget=budget, policy=policy)
