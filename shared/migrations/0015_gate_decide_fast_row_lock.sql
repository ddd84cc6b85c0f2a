-- `gate_decide_fast` (0014) read the database's clock, then waited in its UPDATE for the job host's row when
-- another transaction held it (a job.cancel, a halt, an override of an unknown host's job host). When that
-- transaction rolled back, the release was written after the moment it was valid until (the window's cutoff, a
-- result growing older than its interval): a job host released after its window closed. Now the row is locked
-- first (after the group's lock: the lock order), and the turn and the clock are read after that lock, as the
-- release pass reads its time after the rows' locks (`locked_now`).
CREATE OR REPLACE FUNCTION gate_decide_fast(
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
