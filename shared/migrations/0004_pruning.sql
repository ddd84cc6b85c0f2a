-- The pruner deletes the expired rows of the boundary day in batches by time; an index on the time
-- alone serves those batches and the "oldest result" figure. Results arrive in time order, so the
-- index grows at its right edge and costs the writers little.
CREATE INDEX check_results_checked_at_idx ON check_results (checked_at);
-- Decided jobs are pruned by their decision time, sent outbox rows by their send time.
CREATE INDEX gate_jobs_decided_idx ON gate_jobs (decided_at) WHERE decided_at IS NOT NULL;
CREATE INDEX outbox_sent_idx ON outbox (sent_at) WHERE sent_at IS NOT NULL;
