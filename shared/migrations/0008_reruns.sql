-- The gate asks for a re-run of a failing check by pulling its schedule forward (next_run_at), in the
-- transaction that evaluated the waiting job: the request is as durable as the evaluation, survives a
-- gate crash or a broker outage, and the pollers' scheduler runs it as an ordinary slot. This column
-- records when it last did so, so that a check is re-run at most once per retry period however many
-- jobs wait on it. NULL: never asked.
ALTER TABLE check_schedule ADD COLUMN rerun_requested_at timestamptz;
