-- Last-seen times in a narrow table of their own, so that the write a session gets when it is used
-- (src/flows/touch.rs) changes a row of about 50 bytes instead of one of about 1.6 KB.
--
-- What that saves is WAL. The first change to a page after a checkpoint writes the whole page
-- to the WAL (full_page_writes). A session's row fills a good part of a page, so after a Redis
-- flush, when every session used is read from PostgreSQL and most are due for a touch, nearly
-- every touch wrote 8 KB of WAL: enough to start the next checkpoint within seconds, after which
-- every page paid again. About 120 of these rows share a page, so a million sessions' times fill
-- about 8,500 pages: once each after a checkpoint, however many touches follow.
--
-- sessions.last_seen_at stays: it is written at login, and a replica of an earlier version (in a
-- rolling upgrade) still moves it. A session's last-seen time is the later of the two; a session
-- without a row here (made by such a replica) gets one at its first touch.
CREATE TABLE IF NOT EXISTS session_activity (
    id           uuid        PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    last_seen_at timestamptz NOT NULL
) WITH (fillfactor = 80);

INSERT INTO session_activity (id, last_seen_at)
SELECT id, last_seen_at FROM sessions
ON CONFLICT (id) DO NOTHING;
