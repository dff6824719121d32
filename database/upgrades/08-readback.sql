-- v8: Rooms to read back before the next send
-- readback names the rooms where ferry may have posted an event without knowing it (a send that got no answer
-- or a server error, sends in flight at an unclean stop or while the homeserver restarted), and since when. Before
-- ferry sends into such a room again it reads the room back from then, so a send whose event is already there is
-- not posted twice; then the row goes, unless the room was marked again while it was read. It survives clean
-- stops.
CREATE TABLE readback (
	room_id   TEXT   PRIMARY KEY,
	since     BIGINT NOT NULL,
	marked_at BIGINT NOT NULL
);
