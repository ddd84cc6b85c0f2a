-- The poller's schedule lives apart from check state: the scheduler rewrites next_run_at hundreds of
-- times a second, and keeping it off the check_state rows (which result writes update) spares both
-- writers each other's row locks and index churn.
CREATE TABLE check_schedule (
    check_id uuid PRIMARY KEY REFERENCES health_checks (id) ON DELETE CASCADE,
    -- NULL while the check is disabled.
    next_run_at timestamptz
);
CREATE INDEX check_schedule_due_idx ON check_schedule (next_run_at) WHERE next_run_at IS NOT NULL;

INSERT INTO check_schedule (check_id, next_run_at) SELECT check_id, next_run_at FROM check_state;
DROP INDEX check_state_due_idx;
ALTER TABLE check_state DROP COLUMN next_run_at;

-- The scheduled slot of the last stored result: a tick delivered twice (a poller died before its
-- ack) stores its results once.
ALTER TABLE check_state ADD COLUMN last_slot timestamptz;
