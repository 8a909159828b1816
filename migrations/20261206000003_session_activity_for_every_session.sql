-- Every session has its row in session_activity, made by the database when the session is stored.
--
-- The expired-session sweep and the live-sessions count find idle sessions by reading this narrow
-- table (about 65 bytes a row), not the sessions table (about 1.6 KB a row): a million sessions
-- are some 65 MB here against some 2.3 GB there. That needs every session to have its row,
-- including the sessions that a replica of an earlier version stores during a rolling upgrade
-- (its INSERT names only sessions). The trigger makes the row in the same statement, whoever
-- inserts; ON CONFLICT DO NOTHING: the previous version inserts it itself.
--
-- Then the rows that such replicas stored before this migration ran get theirs (the trigger is
-- created first, so no insert falls between the two). This replaces what …_session_activity.sql
-- says of such sessions (that each gets its row at its first touch): the touch no longer makes
-- rows, it only updates them.
CREATE OR REPLACE FUNCTION session_activity_for_new_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO session_activity (id, last_seen_at) VALUES (NEW.id, NEW.last_seen_at)
    ON CONFLICT (id) DO NOTHING;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS session_activity_for_new_session ON sessions;
CREATE TRIGGER session_activity_for_new_session
    AFTER INSERT ON sessions
    FOR EACH ROW EXECUTE FUNCTION session_activity_for_new_session();

INSERT INTO session_activity (id, last_seen_at)
SELECT s.id, s.last_seen_at FROM sessions s
WHERE NOT EXISTS (SELECT 1 FROM session_activity a WHERE a.id = s.id)
ON CONFLICT (id) DO NOTHING;
