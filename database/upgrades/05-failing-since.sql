-- v4 -> v5: When an event started failing
-- failing_since is when relaying an inbox event first failed for a reason that may pass (ms, 0 = never): ferry
-- gives up on a room whose homeserver keeps failing once bridge.give_up_after has passed since then, even across
-- restarts.
ALTER TABLE inbox ADD COLUMN failing_since BIGINT NOT NULL DEFAULT 0;
