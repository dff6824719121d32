-- v7: Links follow room upgrades
-- link_predecessor is a room that left its link because it was upgraded (m.room.tombstone): the link moved to its
-- successor. Events from before the upgrade live there, so relations to them (edits, reactions, redactions) are
-- still relayed into it, and what is done there to such events still crosses. current_room is the linked room
-- that stands for it now (the end of its chain of successors); the row goes when that room leaves the link.
CREATE TABLE link_predecessor (
	room_id      TEXT   PRIMARY KEY,
	successor    TEXT   NOT NULL,
	current_room TEXT   NOT NULL,
	link_id      TEXT   NOT NULL REFERENCES link(id) ON DELETE CASCADE,
	moved_at     BIGINT NOT NULL
);
CREATE INDEX link_predecessor_current_idx ON link_predecessor (current_room);
