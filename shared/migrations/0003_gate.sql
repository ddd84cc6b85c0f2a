-- The gate: an invalid request is decided too (failed, invalid_request) before its window is known,
-- so that a later valid job.start for the same job host is not decided a second time.
ALTER TABLE gate_jobs ALTER COLUMN window_ends_at DROP NOT NULL;
-- Whether job.waiting went out: it is published once, not on every retry.
ALTER TABLE gate_jobs ADD COLUMN waiting_announced boolean NOT NULL DEFAULT false;
-- Timers live here: the retry and window timers of every gate process read these two indexes.
CREATE INDEX gate_jobs_waiting_retry_idx ON gate_jobs (next_retry_at) WHERE status = 'waiting_health_check';
