-- Patch campaigns (CONTRACT §6): group policies, jobs (halting), verification after patching, and each
-- check's healthy_since (stable_seconds).

-- A group's policy (owner: shared/group_policies.py). A group without a row has the defaults.
-- max_unavailable is null (no limit), a count (max_unavailable_count) or a share of the group's hosts
-- (max_unavailable_percent), never both.
CREATE TABLE group_policies (
    "group" text PRIMARY KEY CHECK (char_length("group") BETWEEN 1 AND 100),
    stable_seconds integer NOT NULL DEFAULT 0 CHECK (stable_seconds BETWEEN 0 AND 86400),
    release_cutoff_seconds integer NOT NULL DEFAULT 0 CHECK (release_cutoff_seconds BETWEEN 0 AND 86400),
    no_checks text NOT NULL DEFAULT 'release' CHECK (no_checks IN ('release', 'fail')),
    max_unavailable_count integer CHECK (max_unavailable_count >= 1),
    max_unavailable_percent integer CHECK (max_unavailable_percent BETWEEN 1 AND 100),
    verify_delay_seconds integer NOT NULL DEFAULT 0 CHECK (verify_delay_seconds BETWEEN 0 AND 3600),
    verify_timeout_seconds integer NOT NULL DEFAULT 900 CHECK (verify_timeout_seconds BETWEEN 10 AND 86400),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT group_policies_one_budget CHECK (num_nonnulls(max_unavailable_count, max_unavailable_percent) <= 1)
);

-- A job (all job hosts with one job_id, keyed like gate_jobs.job_id) and its halt state (owner: shared/jobs.py).
-- max_failed_hosts comes from the job's first job.start that carries it.
CREATE TABLE jobs (
    job_id text PRIMARY KEY,
    max_failed_hosts integer CHECK (max_failed_hosts >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    halted_at timestamptz,
    halt_reason text CHECK (halt_reason IN ('max_failed_hosts', 'manual')),
    halt_detail text,
    halted_by text,
    -- How many times the job halted: part of each job.halted / job.resumed event id (a job may halt again
    -- after a resume), so that each is published once.
    halt_count integer NOT NULL DEFAULT 0,
    CONSTRAINT jobs_halt_consistent CHECK ((halted_at IS NULL) = (halt_reason IS NULL))
);

-- Verification after patching. A released job host is in patch until its verification outcome:
-- released → verifying (finished_at, outcome; verify_from_at = finished_at + verify_delay_seconds,
-- verify_deadline_at = verify_from_at + verify_timeout_seconds, fixed when it starts verifying) →
-- verified | verification_failed (verified_at). next_retry_at is the timer of waiting and verifying rows alike.
ALTER TABLE gate_jobs DROP CONSTRAINT gate_jobs_status_check;
ALTER TABLE gate_jobs ADD CONSTRAINT gate_jobs_status_check CHECK (status IN (
    'waiting_health_check', 'released', 'failed', 'cancelled', 'verifying', 'verified', 'verification_failed'
));
ALTER TABLE gate_jobs
    ADD COLUMN waiting_for text[] NOT NULL DEFAULT '{}',
    ADD COLUMN finished_at timestamptz,
    ADD COLUMN outcome text CHECK (outcome IN ('succeeded', 'failed')),
    ADD COLUMN verify_from_at timestamptz,
    ADD COLUMN verify_deadline_at timestamptz,
    ADD COLUMN verified_at timestamptz,
    -- The gating checks as they were at release (job.released's `checks`): verification waits for those
    -- that were healthy then.
    ADD COLUMN release_checks jsonb;
-- In patch: the budget counts these per group, maintenance reads them per host.
CREATE INDEX gate_jobs_in_patch_host_idx ON gate_jobs (host_id) WHERE status IN ('released', 'verifying');
-- Released rows whose window ends without job.finished start verifying then; verifying rows have timers.
CREATE INDEX gate_jobs_released_window_idx ON gate_jobs (window_ends_at) WHERE status = 'released';
CREATE INDEX gate_jobs_verifying_retry_idx ON gate_jobs (next_retry_at) WHERE status = 'verifying';
CREATE INDEX gate_jobs_job_idx ON gate_jobs (job_id, status);

-- When the check last became healthy (null unless healthy): stable_seconds counts from it.
ALTER TABLE check_state ADD COLUMN healthy_since timestamptz;
UPDATE check_state SET healthy_since = COALESCE(status_changed_at, last_checked_at) WHERE status = 'healthy';
