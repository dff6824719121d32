-- v9: When an event started failing; the room's own order where delivery got it wrong
-- failing_since is when relaying an inbox event first failed for a reason that may pass (ms, 0 = never): ferry
-- gives up on a room whose homeserver keeps failing once bridge.give_up_after has passed since then, even across
-- restarts.
-- synced is false for an event the homeserver pushed that its /sync has not shown yet, where ferry checks the
-- push's order against /sync (homeservers that may push out of order); ord, when set, overrides seq as the
-- event's place in its room's queue (seq * 1000 otherwise) after /sync showed the push's order was wrong.
ALTER TABLE inbox ADD COLUMN failing_since BIGINT NOT NULL DEFAULT 0;
ALTER TABLE inbox ADD COLUMN synced BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE inbox ADD COLUMN ord BIGINT;
