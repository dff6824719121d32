-- v6: Expired means undecryptable: users' sessions are ratcheted past expired messages
-- disappear_index holds the Megolm message index of each disappearing message ferry received on a real user's
-- session, until its deadline passed and ferry ratcheted its stored copies of the session past it.
CREATE TABLE disappear_index (
	room_id       TEXT   NOT NULL,
	session_id    TEXT   NOT NULL,
	message_index BIGINT NOT NULL,
	deadline      BIGINT NOT NULL,

	PRIMARY KEY (room_id, session_id, message_index)
);
CREATE INDEX disappear_index_deadline_idx ON disappear_index (deadline);

-- ratchet_floor is the first message index ferry keeps of a session (0: all): a copy of the session that arrives
-- later (a key request answered, a forward) is ratcheted to it at once.
CREATE TABLE disappear_floor (
	room_id       TEXT   NOT NULL,
	session_id    TEXT   NOT NULL,
	ratchet_floor BIGINT NOT NULL,

	PRIMARY KEY (room_id, session_id)
);
