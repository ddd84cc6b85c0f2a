-- Dashboard sessions: the cookie holds a random session id; only its SHA-256 is stored, next to the
-- token it stands for (never the token). Revoking a token ends its sessions.
CREATE TABLE dashboard_sessions (
    id_sha256 bytea PRIMARY KEY,
    token_id uuid NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    csrf_token text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_expiry_idx ON dashboard_sessions (expires_at);
