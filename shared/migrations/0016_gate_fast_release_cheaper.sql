-- The per-release functions of 0014 that were LANGUAGE sql, now PL/pgSQL (issue 16). PostgreSQL (before 18)
-- parses and plans every statement of a non-inlined SQL function on each call, while PL/pgSQL keeps its
-- statements' plans for the session; `outbox_enqueue` and `gate_decide_waiting` run once per decision, so that
-- planning was a share of the database's CPU per release (bench/gate.py prints it). Same arguments, same results,
-- same owners (docs/architecture.md, "Who writes which table").

CREATE OR REPLACE FUNCTION outbox_enqueue(p_event_id uuid, p_routing_key text, p_correlation_id text, p_body bytea)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO outbox (event_id, routing_key, correlation_id, body)
    VALUES (p_event_id, p_routing_key, p_correlation_id, p_body);
    -- Delivered at commit, never for a rolled-back transaction; repeated ones in a transaction fold into one.
    PERFORM pg_notify('healthgate_outbox', '');
END;
$$;

CREATE OR REPLACE FUNCTION gate_decide_waiting(
    p_key text, p_host_id uuid, p_status text, p_reason text, p_detail text, p_checks jsonb, p_at timestamptz,
    p_overridden_by text, p_override_reason text
) RETURNS SETOF gate_jobs LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    UPDATE gate_jobs j
    SET status = p_status, reason = p_reason, detail = p_detail, checks = COALESCE(p_checks, j.checks),
        decided_at = p_at, overridden_by = p_overridden_by, override_reason = p_override_reason,
        next_retry_at = NULL, waiting_for = '{}',
        -- What verification after patching waits for (CONTRACT §6): the gating checks as they were at release.
        release_checks = CASE WHEN p_status = 'released' THEN COALESCE(p_checks, j.checks) END
    WHERE j.job_id = p_key AND j.host_id = p_host_id AND j.status = 'waiting_health_check'
    RETURNING j.*;
END;
$$;

-- The group's lock for a job.start's fast release, SHARED when the group has no disruption budget (issue 16).
-- Every job host of a group took the group's lock exclusively, twice (record, decide), each held to its commit; with
-- no budget to count that serialised the group's releases for nothing: at 200 job.start/s in one group they queued
-- behind each other's commits (a lock convoy: p50 600 ms and more on a busy 2-core machine). Without a budget a fast
-- release reads and writes only its own job host's rows (locked one by one), so fast releases may run side by side;
-- everything that counts or reorders the group (a release pass, a policy PUT, an override) still takes the lock
-- EXCLUSIVELY, which waits for the shared holders and holds off new ones, so a pass still sees a prefix of the
-- arrival order (each shared holder's `received_at` is read after its lock), and a budget set by a PUT applies to
-- every release that locks after it commits. The budget is read before the lock (a plain read: the caller
-- re-reads its turn after the lock and checks, see `gate_decide_fast`). Returns whether the lock is exclusive.
CREATE FUNCTION gate_lock_group_for_release(p_group text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_budget boolean;
BEGIN
    v_budget := EXISTS (
        SELECT 1 FROM group_policies p
        WHERE p."group" = p_group
          AND (p.max_unavailable_count IS NOT NULL OR p.max_unavailable_percent IS NOT NULL)
    );
    IF v_budget THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('healthgate.group:' || p_group, 0));
    ELSE
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('healthgate.group:' || p_group, 0));
    END IF;
    RETURN v_budget;
END;
$$;

-- 0014's, with three changes.
-- 1. The group's lock from `gate_lock_group_for_release`. A budget set between the read of the policy and the lock
--    is in the turn read after the lock: `gate_decide_fast` then writes nothing and the release pass judges the job
--    host under the exclusive lock.
-- 2. The job's row locked FOR SHARE when it exists. ON CONFLICT DO UPDATE locked it exclusively even when it changed
--    nothing, so the job.starts of ONE job on many hosts (a campaign) queued behind each other's commits as a
--    group's did. job.starts share the lock; a halt or a resume (shared/jobs.py `lock_job`: FOR UPDATE) still waits
--    for them and holds them off. max_failed_hosts is still written only by the first job.start to carry one
--    (CONTRACT §6 "Halting a job").
-- 3. The job host's first evaluation by the timers is due 2 s after its record, not at once: the gate that recorded
--    it decides it within milliseconds (`gate_decide_fast`, else a release pass); a timer that found it in between
--    ran a pass of its own (the group's exclusive lock, holding off every fast release of the group) for a job host
--    about to be decided anyway, and made that decision fall back to a second pass. A gate that dies between the
--    two calls leaves the job host to the timers of any gate, 2 s later.
CREATE OR REPLACE FUNCTION gate_record_start(p_key text, p_host_id uuid, p_window_ends_at timestamptz, p_max_failed_hosts integer)
RETURNS TABLE (locked_group text, received_at timestamptz, now timestamptz, turn gate_turn, fingerprint text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_group text;
    v_received timestamptz;
    v_turn gate_turn;
BEGIN
    SELECT h."group" INTO v_group FROM hosts h WHERE h.id = p_host_id;
    IF v_group IS NOT NULL THEN
        PERFORM gate_lock_group_for_release(v_group);
    END IF;
    INSERT INTO jobs (job_id, max_failed_hosts) VALUES (p_key, p_max_failed_hosts) ON CONFLICT (job_id) DO NOTHING;
    IF NOT FOUND THEN
        IF p_max_failed_hosts IS NOT NULL THEN
            UPDATE jobs SET max_failed_hosts = p_max_failed_hosts WHERE job_id = p_key AND max_failed_hosts IS NULL;
        END IF;
        PERFORM 1 FROM jobs WHERE job_id = p_key FOR SHARE;
    END IF;
    INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, next_retry_at, received_at)
    VALUES (p_key, p_host_id, 'waiting_health_check', p_window_ends_at, now() + interval '2 seconds', clock_timestamp())
    ON CONFLICT (job_id, host_id) DO NOTHING
    RETURNING gate_jobs.received_at INTO v_received;
    IF v_received IS NULL THEN
        RETURN;
    END IF;
    v_turn := gate_turn(p_key, p_host_id, v_received);
    RETURN QUERY SELECT v_group, v_received, clock_timestamp(), v_turn, md5(v_turn::text);
END;
$$;

-- 0015's, with the group's lock from `gate_lock_group_for_release`: a release judged without a budget but locked
-- shared after a budget was set answers 'changed' (its turn's policy differs too), for the release pass to judge.
CREATE OR REPLACE FUNCTION gate_decide_fast(
    p_key text, p_host_id uuid, p_fingerprint text, p_valid_until timestamptz, p_received_at timestamptz,
    p_status text, p_reason text, p_detail text, p_checks jsonb, p_at timestamptz,
    p_event_id uuid, p_routing_key text, p_correlation_id text, p_body bytea
) RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_group text;
    v_exclusive boolean := true;
    v_turn gate_turn;
BEGIN
    SELECT h."group" INTO v_group FROM hosts h WHERE h.id = p_host_id;
    IF v_group IS NOT NULL THEN
        v_exclusive := gate_lock_group_for_release(v_group);
    END IF;
    PERFORM 1 FROM gate_jobs j
    WHERE j.job_id = p_key AND j.host_id = p_host_id AND j.status = 'waiting_health_check'
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_waiting';
    END IF;
    -- An assignment: SELECT INTO a composite variable would put the whole turn into its first field.
    v_turn := gate_turn(p_key, p_host_id, p_received_at);
    -- A host moved to another group meanwhile: the lock taken is not its group's.
    IF md5(v_turn::text) IS DISTINCT FROM p_fingerprint OR v_turn."group" IS DISTINCT FROM v_group THEN
        RETURN 'changed';
    END IF;
    -- A budget counts the group's releases: only under the exclusive lock.
    IF NOT v_exclusive AND ((v_turn.policy).max_unavailable_count IS NOT NULL
                            OR (v_turn.policy).max_unavailable_percent IS NOT NULL) THEN
        RETURN 'changed';
    END IF;
    -- Read with the row locked: nothing can hold the write back past it.
    IF clock_timestamp() >= p_valid_until THEN
        RETURN 'late';
    END IF;
    PERFORM 1 FROM gate_decide_waiting(p_key, p_host_id, p_status, p_reason, p_detail, p_checks, p_at, NULL, NULL);
    IF NOT FOUND THEN
        RETURN 'not_waiting';
    END IF;
    PERFORM outbox_enqueue(p_event_id, p_routing_key, p_correlation_id, p_body);
    RETURN 'decided';
END;
$$;
