-- v4: Consent requests in every room an action touches
-- consent_request is an action that waits for consent in the rooms it acts on: linking two rooms (and with them
-- the rooms of a link either belongs to), or setting a link's disappearing timer. It carries the ID shown in its
-- notices, and expires.
CREATE TABLE consent_request (
	id            TEXT   PRIMARY KEY,
	kind          TEXT   NOT NULL,
	from_room     TEXT   NOT NULL,
	target_room   TEXT   NOT NULL DEFAULT '',
	link_id       TEXT   NOT NULL DEFAULT '',
	disappear_ms  BIGINT NOT NULL DEFAULT 0,
	requested_by  TEXT   NOT NULL,
	command_event TEXT   NOT NULL DEFAULT '',
	created_at    BIGINT NOT NULL,
	expires_at    BIGINT NOT NULL
);
CREATE INDEX consent_request_expiry_idx ON consent_request (expires_at);
CREATE INDEX consent_request_command_idx ON consent_request (command_event);

-- consent_room is one room a request acts on, and who consented there ('' while waiting).
CREATE TABLE consent_room (
	request_id   TEXT NOT NULL REFERENCES consent_request(id) ON DELETE CASCADE,
	room_id      TEXT NOT NULL,
	consented_by TEXT NOT NULL DEFAULT '',

	PRIMARY KEY (request_id, room_id)
);
CREATE INDEX consent_room_room_idx ON consent_room (room_id);

-- Pending link requests become consent requests: the room they wait in, and the room they came from, where the
-- requester had the power when asking (re-checked when accepted, like every consent).
ALTER TABLE link_request ADD COLUMN request_id TEXT;
-- only: postgres
UPDATE link_request SET request_id = substr(md5(room_id || ' ' || from_room), 1, 8);
-- only: sqlite
UPDATE link_request SET request_id = lower(hex(randomblob(4)));
INSERT INTO consent_request (id, kind, from_room, target_room, requested_by, created_at, expires_at)
	SELECT request_id, 'link', from_room, room_id, requested_by, created_at, created_at + 86400000 FROM link_request;
INSERT INTO consent_room (request_id, room_id) SELECT request_id, room_id FROM link_request;
INSERT INTO consent_room (request_id, room_id, consented_by) SELECT request_id, from_room, requested_by FROM link_request;
DROP TABLE link_request;
