-- v1 -> v2: Calls that cross links
-- relayed_call is one 1:1 call ferry relays between the rooms of a link: who placed it where, and how far it got.
CREATE TABLE relayed_call (
	call_key       TEXT   PRIMARY KEY,
	link_id        TEXT   NOT NULL,
	origin_room    TEXT   NOT NULL,
	origin_call_id TEXT   NOT NULL,
	caller         TEXT   NOT NULL,
	caller_party   TEXT   NOT NULL,
	callee         TEXT   NOT NULL DEFAULT '',
	callee_party   TEXT   NOT NULL DEFAULT '',
	state          TEXT   NOT NULL,
	expires_at     BIGINT NOT NULL,
	created_at     BIGINT NOT NULL,
	updated_at     BIGINT NOT NULL
);
CREATE INDEX relayed_call_link_idx ON relayed_call (link_id, state);

-- call_room gives the call_id a call has in each room of its link (the caller's own ID in the origin room).
CREATE TABLE call_room (
	room_id  TEXT NOT NULL,
	call_id  TEXT NOT NULL,
	call_key TEXT NOT NULL REFERENCES relayed_call(call_key) ON DELETE CASCADE,

	PRIMARY KEY (room_id, call_id)
);
CREATE INDEX call_room_key_idx ON call_room (call_key);
