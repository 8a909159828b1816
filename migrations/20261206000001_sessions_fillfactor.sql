-- Room in every page for one more version of a row, so that the last-seen write a session gets
-- after a Redis miss (src/flows/touch.rs) is a HOT update: the new version goes into the same page
-- and none of the five indexes gets a new entry (last_seen_at is in none of them). At 100 % a full
-- page sends each such update to a new page, with an insert into every index: nine in ten of the
-- cold benchmark's last-seen writes went that way (scripts/bench counts them). Applies to pages
-- written from now on; an existing table gets it as its rows are rewritten (or at once with
-- VACUUM FULL).
ALTER TABLE sessions SET (fillfactor = 75);
