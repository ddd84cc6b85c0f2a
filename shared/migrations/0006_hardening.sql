-- A check that succeeds more slowly than this is unhealthy, reason `slow` (CONTRACT §3; every type).
ALTER TABLE health_checks ADD COLUMN max_latency_ms integer CHECK (max_latency_ms BETWEEN 1 AND 60000);
