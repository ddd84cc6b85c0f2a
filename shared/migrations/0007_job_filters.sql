-- GET /api/v1/jobs?status=&host_id= pages job hosts newest first (CONTRACT §3): keyset pagination on
-- (received_at, job_id, host_id), all descending. One index per way in, each in exactly that order, so that a
-- page is one index range scan that starts at the cursor and stops after `limit` rows.
-- The old index had job_id and host_id ascending, against the list's order: it served received_at alone.
DROP INDEX gate_jobs_received_idx;
CREATE INDEX gate_jobs_received_idx ON gate_jobs (received_at DESC, job_id DESC, host_id DESC);
-- ?host_id=: a host's jobs (the primary key (job_id, host_id) cannot find them).
CREATE INDEX gate_jobs_host_received_idx ON gate_jobs (host_id, received_at DESC, job_id DESC);
-- ?status=: a rare status (cancelled) would otherwise mean scanning every newer job host.
CREATE INDEX gate_jobs_status_received_idx ON gate_jobs (status, received_at DESC, job_id DESC, host_id DESC);
