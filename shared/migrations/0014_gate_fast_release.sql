-- A job.start decided in two statements (issue 16). Before, the gate recorded a job.start in one transaction and
-- judged it in a second: about ten round trips to PostgreSQL per release, each a wait for CPU on a busy machine.
-- Now `gate_record_start` records the job host and returns everything its turn is judged on (`gate_turn`) in one
-- call; the gate applies the rules (shared/gate_rules.py) in Python, and `gate_decide_fast` writes the decision
-- and its event in a second call, only if the turn is still what it was judged on. A job host that must wait
-- goes on through the release pass as before (services/gate/evaluation.py).
--
-- Functions, not single statements: a statement's snapshot is taken when it starts, before it waits for the
-- group's advisory lock, so what it read could miss a release committed during that wait. Each statement of a
-- VOLATILE PL/pgSQL function takes a new snapshot, so what these read after taking the lock is current.
--
-- Owners (docs/architecture.md, "Who writes which table"): `outbox_enqueue` is shared/outbox.py's, the gate_*
-- functions shared/jobs.py's; only their owner's Python calls them, and the gate_* functions write the outbox only
-- through `outbox_enqueue`. A change to any of them is a new migration (CREATE OR REPLACE).

-- An outbox row, and the relays woken at commit (NOTIFY is delivered at commit, never for a rolled-back
-- transaction). One round trip where an INSERT and a NOTIFY were two.
CREATE FUNCTION outbox_enqueue(p_event_id uuid, p_routing_key text, p_correlation_id text, p_body bytea)
RETURNS void LANGUAGE sql VOLATILE AS $$
    INSERT INTO outbox (event_id, routing_key, correlation_id, body) VALUES (p_event_id, p_routing_key, p_correlation_id, p_body);
    SELECT pg_notify('healthgate_outbox', '');
$$;

-- A host's enabled critical checks and what the pollers last learnt of each (shared/gating.py reads them through
-- `gate_gating_checks`; the fields are GatingCheck's).
CREATE TYPE gate_gating_check AS (
    host_id uuid,
    id uuid,
    name text,
    interval_seconds integer,
    status text,
    last_healthy boolean,
    last_detail text,
    last_checked_at timestamptz,
    healthy_since timestamptz
);

-- The gating checks of each of `p_host_ids` by host and name; a known host without one gives one row with id NULL
-- (so that "no checks" and "unknown host" differ), an unknown host none.
CREATE FUNCTION gate_gating_checks(p_host_ids uuid[]) RETURNS SETOF gate_gating_check
LANGUAGE sql STABLE AS $$
    SELECT h.id, c.id, c.name, c.interval_seconds, s.status, s.last_healthy, s.last_detail, s.last_checked_at,
           s.healthy_since
    FROM hosts h
    LEFT JOIN health_checks c ON c.host_id = h.id AND c.enabled AND c.critical
    LEFT JOIN check_state s ON s.check_id = c.id
    WHERE h.id = ANY(p_host_ids)
    ORDER BY h.id, c.name
$$;

-- A host of a group with what makes it unavailable (CONTRACT §6): its health_check_status unhealthy, and the
-- earliest (by decision) of its job hosts released or verifying (NULL when none is).
CREATE TYPE gate_group_host AS (host_id uuid, name text, unhealthy boolean, patching_job text);

CREATE FUNCTION gate_group_hosts(p_group text) RETURNS SETOF gate_group_host
LANGUAGE sql STABLE AS $$
    SELECT h.id, h.name, h.health_check_status = 'unhealthy',
           (SELECT j.job_id FROM gate_jobs j
            WHERE j.host_id = h.id AND j.status IN ('released', 'verifying')
            ORDER BY j.decided_at, j.job_id LIMIT 1)
    FROM hosts h
    WHERE h."group" = p_group
    ORDER BY h.id
$$;

-- What a waiting job host is judged on, as the group's release pass would read it for a job host with no other
-- waiting before it: its host's group (NULL: unknown host), the group's policy row (NULL: the defaults), the
-- gating checks (NULL for an unknown host), with a disruption budget the group's hosts, whether its job is halted,
-- and `queued`: with a budget, whether another job host of the group waits before it (it is then judged in the
-- group's order, by the release pass, not alone).
CREATE TYPE gate_turn AS (
    "group" text,
    policy group_policies,
    checks gate_gating_check[],
    hosts gate_group_host[],
    halted boolean,
    queued boolean
);

CREATE FUNCTION gate_turn(p_key text, p_host_id uuid, p_received_at timestamptz) RETURNS gate_turn
LANGUAGE plpgsql STABLE AS $$
DECLARE
    turn gate_turn;
BEGIN
    turn.halted := EXISTS (SELECT 1 FROM jobs WHERE job_id = p_key AND halted_at IS NOT NULL);
    turn.queued := false;
    SELECT h."group" INTO turn."group" FROM hosts h WHERE h.id = p_host_id;
    IF turn."group" IS NULL THEN
        RETURN turn;
    END IF;
    turn.policy := (SELECT p FROM group_policies p WHERE p."group" = turn."group");
    turn.checks := ARRAY(SELECT c FROM gate_gating_checks(ARRAY[p_host_id]) c WHERE c.id IS NOT NULL);
    IF (turn.policy).max_unavailable_count IS NOT NULL OR (turn.policy).max_unavailable_percent IS NOT NULL THEN
        turn.hosts := ARRAY(SELECT g FROM gate_group_hosts(turn."group") g);
        turn.queued := EXISTS (
            SELECT 1 FROM gate_jobs j
            WHERE j.status = 'waiting_health_check'
              AND j.host_id IN (SELECT id FROM hosts WHERE "group" = turn."group")
              AND (j.received_at, j.job_id, j.host_id) < (p_received_at, p_key, p_host_id)
        );
    END IF;
    RETURN turn;
END;
$$;

-- Record a valid job.start (its job, and its job host waiting, first evaluation due at once) under its group's
-- lock, and return its turn read after the insert under that lock, with a fingerprint of it, the database's clock
-- then (`now`, read after the lock: the decision's time) and the row's `received_at`. No row when the job host
-- existed already (a repeated job.start, or one decided before it came). The job.start's group lock orders the
-- group's job hosts as their inserts commit (CONTRACT §6: FIFO), as shared/jobs.py `record_start` explains.
CREATE FUNCTION gate_record_start(p_key text, p_host_id uuid, p_window_ends_at timestamptz, p_max_failed_hosts integer)
RETURNS TABLE (locked_group text, received_at timestamptz, now timestamptz, turn gate_turn, fingerprint text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_group text;
    v_received timestamptz;
    v_turn gate_turn;
BEGIN
    SELECT h."group" INTO v_group FROM hosts h WHERE h.id = p_host_id;
    IF v_group IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('healthgate.group:' || v_group, 0));
    END IF;
    INSERT INTO jobs (job_id, max_failed_hosts) VALUES (p_key, p_max_failed_hosts)
    ON CONFLICT (job_id) DO UPDATE SET max_failed_hosts = EXCLUDED.max_failed_hosts
    WHERE jobs.max_failed_hosts IS NULL AND EXCLUDED.max_failed_hosts IS NOT NULL;
    INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, next_retry_at, received_at)
    VALUES (p_key, p_host_id, 'waiting_health_check', p_window_ends_at, now(), clock_timestamp())
    ON CONFLICT (job_id, host_id) DO NOTHING
    RETURNING gate_jobs.received_at INTO v_received;
    IF v_received IS NULL THEN
        RETURN;
    END IF;
    v_turn := gate_turn(p_key, p_host_id, v_received);
    RETURN QUERY SELECT v_group, v_received, clock_timestamp(), v_turn, md5(v_turn::text);
END;
$$;

-- A waiting job host decided (shared/jobs.py `decide` and `gate_decide_fast`): the row after, none when it was not
-- waiting any more.
CREATE FUNCTION gate_decide_waiting(
    p_key text, p_host_id uuid, p_status text, p_reason text, p_detail text, p_checks jsonb, p_at timestamptz,
    p_overridden_by text, p_override_reason text
) RETURNS SETOF gate_jobs LANGUAGE sql VOLATILE AS $$
    UPDATE gate_jobs j
    SET status = p_status, reason = p_reason, detail = p_detail, checks = COALESCE(p_checks, j.checks),
        decided_at = p_at, overridden_by = p_overridden_by, override_reason = p_override_reason,
        next_retry_at = NULL, waiting_for = '{}',
        -- What verification after patching waits for (CONTRACT §6): the gating checks as they were at release.
        release_checks = CASE WHEN p_status = 'released' THEN COALESCE(p_checks, j.checks) END
    WHERE j.job_id = p_key AND j.host_id = p_host_id AND j.status = 'waiting_health_check'
    RETURNING j.*
$$;

-- Decide a waiting job host judged on the turn `gate_record_start` returned (`p_fingerprint`), with its event,
-- if it is still waiting, its turn read now under the group's lock is the same, and the database's clock is
-- before `p_valid_until` (when the verdict could change with time alone: a window closing, a result growing
-- stale). Returns 'decided', or why nothing was written: 'changed', 'late' or 'not_waiting'. The row is written
-- by `gate_decide_waiting`, as shared/jobs.py `decide` writes it.
CREATE FUNCTION gate_decide_fast(
    p_key text, p_host_id uuid, p_fingerprint text, p_valid_until timestamptz, p_received_at timestamptz,
    p_status text, p_reason text, p_detail text, p_checks jsonb, p_at timestamptz,
    p_event_id uuid, p_routing_key text, p_correlation_id text, p_body bytea
) RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_group text;
    v_turn gate_turn;
BEGIN
    SELECT h."group" INTO v_group FROM hosts h WHERE h.id = p_host_id;
    IF v_group IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('healthgate.group:' || v_group, 0));
    END IF;
    -- An assignment: SELECT INTO a composite variable would put the whole turn into its first field.
    v_turn := gate_turn(p_key, p_host_id, p_received_at);
    -- A host moved to another group meanwhile: the lock taken is not its group's.
    IF md5(v_turn::text) IS DISTINCT FROM p_fingerprint OR v_turn."group" IS DISTINCT FROM v_group THEN
        RETURN 'changed';
    END IF;
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
