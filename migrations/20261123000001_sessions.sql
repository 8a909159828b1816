-- One row per browser session. The session ID itself is never stored: only its SHA-256.
-- Tokens are sealed with AES-256-GCM under the key named by key_id (see src/crypto.rs).
CREATE TABLE IF NOT EXISTS sessions (
    id                       uuid        PRIMARY KEY,
    id_hash                  bytea       NOT NULL UNIQUE,
    subject                  text        NOT NULL,
    idp_sid                  text,
    user_claims              jsonb       NOT NULL,
    key_id                   text        NOT NULL,
    id_token_sealed          bytea       NOT NULL,
    refresh_token_sealed     bytea,
    created_at               timestamptz NOT NULL,
    last_seen_at             timestamptz NOT NULL,
    expires_at               timestamptz NOT NULL
);

CREATE INDEX IF NOT EXISTS sessions_subject_idx ON sessions (subject);
CREATE INDEX IF NOT EXISTS sessions_idp_sid_idx ON sessions (idp_sid) WHERE idp_sid IS NOT NULL;
CREATE INDEX IF NOT EXISTS sessions_expires_at_idx ON sessions (expires_at);
