-- v10: Unanswered sends a read-back found
-- found_sends keeps what a read-back found of ferry's own sends whose answer never came (the room, the
-- transaction ID the send used, the event the homeserver posted), until ferry has recorded them: a run that dies
-- after its read-back found a send and before it recorded it would otherwise leave the next run, which reads back
-- only as far as the run that died could have sent, to post that event again. Rows older than a day go at start.
CREATE TABLE found_sends (
	room_id  TEXT   NOT NULL,
	txn_id   TEXT   NOT NULL,
	event_id TEXT   NOT NULL,
	found_at BIGINT NOT NULL,
	PRIMARY KEY (room_id, txn_id)
);
