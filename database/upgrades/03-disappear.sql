-- v2 -> v3: Disappearing messages
-- disappear_queue holds every event ferry has to redact at a deadline: the copies it sent (redacted as the ghost
-- that sent them) and the originals (redacted by the bot when bridge.redact_originals allows and it has the
-- power). A row is deleted once its redaction went through; a permanent failure stays as state 'failed'.
CREATE TABLE disappear_queue (
	event_id    TEXT    PRIMARY KEY,
	room_id     TEXT    NOT NULL,
	redact_as   TEXT    NOT NULL,
	original    BOOLEAN NOT NULL,
	deadline    BIGINT  NOT NULL,
	not_before  BIGINT  NOT NULL DEFAULT 0,
	attempts    INTEGER NOT NULL DEFAULT 0,
	state       TEXT    NOT NULL DEFAULT 'pending',
	last_error  TEXT
);
CREATE INDEX disappear_queue_due_idx ON disappear_queue (state, deadline);

-- disappear_session tracks the Megolm sessions that carried disappearing messages, so ferry can delete their
-- keys once every such message passed its deadline. keep is set when a message without a deadline used the
-- session: such a session is never deleted. deleted_at is when ferry deleted its keys (0 = still stored).
CREATE TABLE disappear_session (
	room_id       TEXT    NOT NULL,
	session_id    TEXT    NOT NULL,
	sender        TEXT    NOT NULL,
	outbound      BOOLEAN NOT NULL,
	first_used    BIGINT  NOT NULL,
	last_used     BIGINT  NOT NULL,
	last_deadline BIGINT  NOT NULL DEFAULT 0,
	keep          BOOLEAN NOT NULL DEFAULT false,
	deleted_at    BIGINT  NOT NULL DEFAULT 0,

	PRIMARY KEY (room_id, session_id)
);
CREATE INDEX disappear_session_expiry_idx ON disappear_session (deleted_at, keep, last_deadline);
