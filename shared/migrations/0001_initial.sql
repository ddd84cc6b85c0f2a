-- The schema of the whole contract: hosts, checks and their state, results, gate jobs, audit,
-- tokens and the transactional outbox.

CREATE TABLE hosts (
    id uuid PRIMARY KEY,
    name text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 255),
    "group" text NOT NULL CHECK (char_length("group") BETWEEN 1 AND 100),
    agent_url text,
    -- Summary of the host's enabled checks, kept current by whoever changes a check or its state,
    -- so listing and filtering hosts never aggregates their checks.
    health_check_status text NOT NULL DEFAULT 'no_checks'
        CHECK (health_check_status IN ('healthy', 'degraded', 'unhealthy', 'unknown', 'no_checks')),
    checks_total integer NOT NULL DEFAULT 0,
    checks_healthy integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT hosts_name_unique UNIQUE (name)
);
-- Pages are ordered by (name, id), optionally within a group or a status.
CREATE INDEX hosts_group_name_idx ON hosts ("group", name, id);
CREATE INDEX hosts_status_name_idx ON hosts (health_check_status, name, id);

CREATE TABLE health_checks (
    id uuid PRIMARY KEY,
    host_id uuid NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    name text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    check_type text NOT NULL CHECK (check_type IN ('service', 'http', 'tcp')),
    enabled boolean NOT NULL DEFAULT true,
    critical boolean NOT NULL DEFAULT true,
    interval_seconds integer NOT NULL CHECK (interval_seconds BETWEEN 10 AND 86400),
    timeout_seconds double precision NOT NULL CHECK (timeout_seconds BETWEEN 0.1 AND 60),
    failures_before_unhealthy smallint NOT NULL DEFAULT 1 CHECK (failures_before_unhealthy BETWEEN 1 AND 10),
    successes_before_healthy smallint NOT NULL DEFAULT 1 CHECK (successes_before_healthy BETWEEN 1 AND 10),
    -- service
    service_name text,
    -- http
    url text,
    method text CHECK (method IN ('GET', 'HEAD')),
    expected_status text,
    expected_body text,
    ignore_cert_errors boolean,
    follow_redirects boolean,
    basic_auth_user text,
    basic_auth_pass_encrypted bytea,
    -- tcp
    port integer CHECK (port BETWEEN 1 AND 65535),
    address text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT health_checks_host_name_unique UNIQUE (host_id, name),
    -- A check holds only its own type's fields.
    CONSTRAINT health_checks_fields_match_type CHECK (
        CASE check_type
            WHEN 'service' THEN service_name IS NOT NULL
                AND num_nonnulls(url, method, expected_status, expected_body, ignore_cert_errors,
                                 follow_redirects, basic_auth_user, basic_auth_pass_encrypted,
                                 port, address) = 0
            WHEN 'http' THEN url IS NOT NULL AND method IS NOT NULL AND expected_status IS NOT NULL
                AND ignore_cert_errors IS NOT NULL AND follow_redirects IS NOT NULL
                AND num_nonnulls(service_name, port, address) = 0
                AND (basic_auth_pass_encrypted IS NULL OR basic_auth_user IS NOT NULL)
            WHEN 'tcp' THEN port IS NOT NULL
                AND num_nonnulls(service_name, url, method, expected_status, expected_body,
                                 ignore_cert_errors, follow_redirects, basic_auth_user,
                                 basic_auth_pass_encrypted) = 0
        END
    )
);

-- What the pollers learnt about a check: its status, streaks and last result. One row per check.
CREATE TABLE check_state (
    check_id uuid PRIMARY KEY REFERENCES health_checks (id) ON DELETE CASCADE,
    host_id uuid NOT NULL REFERENCES hosts (id) ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'unknown' CHECK (status IN ('healthy', 'unhealthy', 'unknown')),
    consecutive_failures integer NOT NULL DEFAULT 0,
    consecutive_successes integer NOT NULL DEFAULT 0,
    last_healthy boolean,
    last_reason text,
    last_detail text,
    last_latency_ms double precision,
    last_checked_at timestamptz,
    -- When the scheduler next dispatches the check; NULL while the check is disabled.
    next_run_at timestamptz,
    status_changed_at timestamptz
);
CREATE INDEX check_state_host_idx ON check_state (host_id);
CREATE INDEX check_state_due_idx ON check_state (next_run_at) WHERE next_run_at IS NOT NULL;

-- Results, one partition per UTC day so expired days are dropped whole.
CREATE TABLE check_results (
    id uuid NOT NULL,
    check_id uuid NOT NULL,
    host_id uuid NOT NULL,
    checked_at timestamptz NOT NULL,
    healthy boolean NOT NULL,
    reason text NOT NULL,
    status text NOT NULL,
    detail text NOT NULL,
    latency_ms double precision NOT NULL,
    PRIMARY KEY (check_id, checked_at, id)
) PARTITION BY RANGE (checked_at);
-- The primary key serves "latest per check" and a check's time-range reads (newest first).

CREATE TABLE gate_jobs (
    job_id text NOT NULL CHECK (char_length(job_id) BETWEEN 1 AND 200),
    host_id uuid NOT NULL,
    status text NOT NULL
        CHECK (status IN ('waiting_health_check', 'released', 'failed', 'cancelled')),
    window_ends_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz,
    reason text,
    detail text,
    checks jsonb NOT NULL DEFAULT '[]',
    next_retry_at timestamptz,
    overridden_by text,
    override_reason text,
    PRIMARY KEY (job_id, host_id),
    CONSTRAINT gate_jobs_decided_has_time CHECK ((status = 'waiting_health_check') = (decided_at IS NULL))
);
CREATE INDEX gate_jobs_waiting_host_idx ON gate_jobs (host_id) WHERE status = 'waiting_health_check';
CREATE INDEX gate_jobs_waiting_window_idx ON gate_jobs (window_ends_at) WHERE status = 'waiting_health_check';
CREATE INDEX gate_jobs_received_idx ON gate_jobs (received_at DESC, job_id, host_id);

CREATE TABLE audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    host_id uuid,
    changes jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE api_tokens (
    id uuid PRIMARY KEY,
    name text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    role text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    groups text[] NOT NULL DEFAULT '{}',
    -- SHA-256 of the token: tokens are 256-bit random strings, so a fast hash is safe to store.
    token_sha256 bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT api_tokens_name_unique UNIQUE (name),
    CONSTRAINT api_tokens_hash_unique UNIQUE (token_sha256)
);

CREATE TABLE outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL,
    routing_key text NOT NULL,
    correlation_id text,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);
CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL;
