-- The latest access token, sealed like the other tokens (under the row's key_id), so that
-- forward-auth and the relay keep working while Redis, which caches it, is down.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS access_token_sealed     bytea;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS access_token_expires_at timestamptz;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS access_token_refresh_at timestamptz;
-- The refresh lease: whoever sets refresh_lease refreshes the session's tokens; everyone else
-- waits. refresh_lease_until (database clock) bounds a lease whose holder died.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS refresh_lease           uuid;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS refresh_lease_until     timestamptz;
