-- The job_id as received, for a row keyed by an invalid job_id's key (CONTRACT §5: a job.start whose job_id is longer
-- than 200 characters or holds control characters is still answered, invalid_request). Such a job_id cannot be the
-- row's job_id: PostgreSQL text holds no NUL nor a lone surrogate, and gate_jobs holds 1-200 characters. The row is
-- keyed by shared.events.job_key (U+001A, "invalid-job-id:sha256:" and the SHA-256 of the job_id), and this column
-- holds the job_id's UTF-8 ("surrogatepass": a lone surrogate as its 3 bytes), so that the API shows the job_id as
-- received (CONTRACT §3, "every job id works") and finds the row by computing the same key from a path.
-- NULL for every row whose job_id is its own key. Rows keyed before this migration keep NULL: their job_id was never
-- stored, and the API shows their key.
ALTER TABLE gate_jobs ADD COLUMN received_job_id bytea
    CONSTRAINT gate_jobs_received_job_id_keyed
    CHECK (received_job_id IS NULL OR starts_with(job_id, E'\x1ainvalid-job-id:sha256:'));
