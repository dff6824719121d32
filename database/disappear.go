package database

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// Redaction is one event ferry redacts at a deadline (a disappearing message's copy or original).
type Redaction struct {
	EventID  id.EventID
	RoomID   id.RoomID
	RedactAs id.UserID // the ghost that sent the copy; empty for an original (the bot redacts it)
	Original bool
	Deadline time.Time
	Attempts int
}

// Redaction states. A done redaction's row is deleted.
const (
	RedactionPending = "pending"
	RedactionFailed  = "failed"
)

// DisappearQuery reads and writes the disappearing-message deadlines and the sessions that carried such messages.
type DisappearQuery struct {
	db *dbutil.Database
}

// SQL on disappear_queue: an event scheduled again keeps the earlier deadline.
const (
	scheduleRedactionQuery = `INSERT INTO disappear_queue (event_id, room_id, redact_as, original, deadline) VALUES ($1, $2, $3, $4, $5)
	ON CONFLICT (event_id) DO UPDATE SET deadline=CASE WHEN excluded.deadline < disappear_queue.deadline THEN excluded.deadline ELSE disappear_queue.deadline END`
	dueRedactionsQuery = `SELECT event_id, room_id, redact_as, original, deadline, attempts FROM disappear_queue
		WHERE state=$1 AND deadline<=$2 AND not_before<=$2 ORDER BY deadline, event_id LIMIT $3`
	nextRedactionQuery = `SELECT MIN(CASE WHEN not_before > deadline THEN not_before ELSE deadline END)
		FROM disappear_queue WHERE state=$1`
	redactionDoneQuery     = `DELETE FROM disappear_queue WHERE event_id=$1`
	retryRedactionQuery    = `UPDATE disappear_queue SET attempts=attempts+1, not_before=$2, last_error=$3 WHERE event_id=$1`
	failRedactionQuery     = `UPDATE disappear_queue SET attempts=attempts+1, state=$2, last_error=$3 WHERE event_id=$1`
	countRedactionsQuery   = `SELECT COUNT(*) FROM disappear_queue WHERE state=$1`
	overdueRedactionsQuery = `SELECT COUNT(*), MIN(deadline) FROM disappear_queue WHERE state=$1 AND deadline<=$2`
)

// Schedule records redactions (keeping the earlier deadline when an event is already scheduled).
func (dq *DisappearQuery) Schedule(ctx context.Context, rs ...*Redaction) error {
	return dq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, r := range rs {
			if _, err := dq.db.Exec(ctx, scheduleRedactionQuery, r.EventID, r.RoomID, r.RedactAs, r.Original, r.Deadline.UnixMilli()); err != nil {
				return err
			}
		}
		return nil
	})
}

// Due lists pending redactions whose deadline and retry time have passed, earliest deadline first.
func (dq *DisappearQuery) Due(ctx context.Context, now time.Time, limit int) ([]*Redaction, error) {
	rows, err := dq.db.Query(ctx, dueRedactionsQuery, RedactionPending, now.UnixMilli(), limit)
	return dbutil.NewRowIterWithError(rows, scanRedaction, err).AsList()
}

func scanRedaction(row dbutil.Scannable) (*Redaction, error) {
	var r Redaction
	var deadline int64
	if err := row.Scan(&r.EventID, &r.RoomID, &r.RedactAs, &r.Original, &deadline, &r.Attempts); err != nil {
		return nil, err
	}
	r.Deadline = time.UnixMilli(deadline)
	return &r, nil
}

// Next returns when the next pending redaction becomes due; ok=false when none is pending.
func (dq *DisappearQuery) Next(ctx context.Context) (time.Time, bool, error) {
	var next sql.NullInt64
	err := dq.db.QueryRow(ctx, nextRedactionQuery, RedactionPending).Scan(&next)
	if err != nil || !next.Valid {
		return time.Time{}, false, err
	}
	return time.UnixMilli(next.Int64), true, nil
}

// Done removes a redaction that went through.
func (dq *DisappearQuery) Done(ctx context.Context, evt id.EventID) error {
	_, err := dq.db.Exec(ctx, redactionDoneQuery, evt)
	return err
}

// Retry postpones a redaction after a transient error.
func (dq *DisappearQuery) Retry(ctx context.Context, evt id.EventID, notBefore time.Time, lastError string) error {
	_, err := dq.db.Exec(ctx, retryRedactionQuery, evt, notBefore.UnixMilli(), lastError)
	return err
}

// Fail marks a redaction as failed for good; the row stays for the admin to see.
func (dq *DisappearQuery) Fail(ctx context.Context, evt id.EventID, lastError string) error {
	_, err := dq.db.Exec(ctx, failRedactionQuery, evt, RedactionFailed, lastError)
	return err
}

// Count counts redactions by state (pending or failed).
func (dq *DisappearQuery) Count(ctx context.Context, state string) (int, error) {
	var n int
	err := dq.db.QueryRow(ctx, countRedactionsQuery, state).Scan(&n)
	return n, err
}

// DeadlineOf returns the earliest deadline of an event ferry knows as an original or a copy, or zero when it
// does not disappear.
func (dq *DisappearQuery) DeadlineOf(ctx context.Context, evt id.EventID) (time.Time, error) {
	var ms sql.NullInt64
	err := dq.db.QueryRow(ctx, copyDeadlineQuery, evt).Scan(&ms)
	if err != nil || !ms.Valid {
		return time.Time{}, err
	}
	return time.UnixMilli(ms.Int64), nil
}

// SessionUse is one use of a Megolm session by a message: deadline zero means the message does not disappear.
type SessionUse struct {
	RoomID    id.RoomID
	SessionID id.SessionID
	Sender    id.UserID
	Outbound  bool
	At        time.Time
	Deadline  time.Time
}

// TrackedSession is a session in disappear_session.
type TrackedSession struct {
	RoomID       id.RoomID
	SessionID    id.SessionID
	Sender       id.UserID
	Outbound     bool
	FirstUsed    time.Time
	LastUsed     time.Time
	LastDeadline time.Time
	Keep         bool
	Deleted      bool // ferry deleted its keys already
}

// NoteSession records that a message used a session. A use without deadline marks the session as kept.
func (dq *DisappearQuery) NoteSession(ctx context.Context, u *SessionUse) (*TrackedSession, error) {
	var deadline int64
	if !u.Deadline.IsZero() {
		deadline = u.Deadline.UnixMilli()
	}
	row := dq.db.QueryRow(ctx, noteSessionQuery, u.RoomID, u.SessionID, u.Sender, u.Outbound, u.At.UnixMilli(), deadline, deadline == 0)
	return scanSession(row)
}

// KeepSession marks a tracked session as kept (a message without deadline used it); untracked sessions are
// left alone.
func (dq *DisappearQuery) KeepSession(ctx context.Context, room id.RoomID, session id.SessionID) error {
	_, err := dq.db.Exec(ctx, keepSessionQuery, room, session)
	return err
}

// SQL on disappear_session.
const (
	sessionColumns = `room_id, session_id, sender, outbound, first_used, last_used, last_deadline, keep, deleted_at`
	// A session used again keeps its latest use and deadline; a use without deadline ($7) keeps it for good, and
	// a session whose keys came back after ferry deleted them is tracked again.
	noteSessionQuery = `INSERT INTO disappear_session (room_id, session_id, sender, outbound, first_used, last_used, last_deadline, keep)
		VALUES ($1, $2, $3, $4, $5, $5, $6, $7)
		ON CONFLICT (room_id, session_id) DO UPDATE SET
			last_used=CASE WHEN excluded.last_used > disappear_session.last_used THEN excluded.last_used ELSE disappear_session.last_used END,
			last_deadline=CASE WHEN excluded.last_deadline > disappear_session.last_deadline THEN excluded.last_deadline ELSE disappear_session.last_deadline END,
			keep=(disappear_session.keep OR excluded.keep), deleted_at=0
		RETURNING ` + sessionColumns
	keepSessionQuery = `UPDATE disappear_session SET keep=true WHERE room_id=$1 AND session_id=$2`
	getSessionQuery  = `SELECT ` + sessionColumns + ` FROM disappear_session WHERE room_id=$1 AND session_id=$2`
	// Deleted sessions come again while deleted since $4; outbound ones idle since $2, inbound ones since $3.
	expiredSessionsQuery = `SELECT ` + sessionColumns + ` FROM disappear_session
		WHERE (deleted_at=0 OR deleted_at>=CAST($4 AS BIGINT)) AND keep=false AND last_deadline>0 AND last_deadline<=$1
			AND last_used <= CASE WHEN outbound THEN CAST($2 AS BIGINT) ELSE CAST($3 AS BIGINT) END
		ORDER BY last_deadline`
	sessionDeletedQuery = `UPDATE disappear_session SET deleted_at=$3 WHERE room_id=$1 AND session_id=$2`
	liveSessionsQuery   = `SELECT ` + sessionColumns + ` FROM disappear_session WHERE deleted_at=0`
)

func scanSession(row dbutil.Scannable) (*TrackedSession, error) {
	var s TrackedSession
	var first, last, deadline, deleted int64
	if err := row.Scan(&s.RoomID, &s.SessionID, &s.Sender, &s.Outbound, &first, &last, &deadline, &s.Keep, &deleted); err != nil {
		return nil, err
	}
	s.Deleted = deleted > 0
	s.FirstUsed, s.LastUsed = time.UnixMilli(first), time.UnixMilli(last)
	if deadline > 0 {
		s.LastDeadline = time.UnixMilli(deadline)
	}
	return &s, nil
}

// GetSession returns a tracked session, or nil.
func (dq *DisappearQuery) GetSession(ctx context.Context, room id.RoomID, session id.SessionID) (*TrackedSession, error) {
	s, err := scanSession(dq.db.QueryRow(ctx, getSessionQuery, room, session))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	return s, err
}

// ExpiredSessions lists sessions that only carried messages whose deadlines passed before now, and that were
// last used before idleSince (outbound) or inboundIdleSince (inbound). Sessions deleted since resweepSince are
// listed again, so a copy of their key that arrived late is deleted too.
func (dq *DisappearQuery) ExpiredSessions(ctx context.Context, now, idleSince, inboundIdleSince, resweepSince time.Time) ([]*TrackedSession, error) {
	rows, err := dq.db.Query(ctx, expiredSessionsQuery, now.UnixMilli(), idleSince.UnixMilli(), inboundIdleSince.UnixMilli(), resweepSince.UnixMilli())
	return dbutil.NewRowIterWithError(rows, scanSession, err).AsList()
}

// SessionDeleted records that ferry deleted a session's keys.
func (dq *DisappearQuery) SessionDeleted(ctx context.Context, room id.RoomID, session id.SessionID, at time.Time) error {
	_, err := dq.db.Exec(ctx, sessionDeletedQuery, room, session, at.UnixMilli())
	return err
}

// LiveTracked lists the tracked sessions whose keys are still stored (for the in-memory index at start).
func (dq *DisappearQuery) LiveTracked(ctx context.Context) ([]*TrackedSession, error) {
	rows, err := dq.db.Query(ctx, liveSessionsQuery)
	return dbutil.NewRowIterWithError(rows, scanSession, err).AsList()
}

// Overdue counts the pending redactions whose deadline has passed at now, and returns the earliest such deadline
// (zero when none is overdue).
func (dq *DisappearQuery) Overdue(ctx context.Context, now time.Time) (int, time.Time, error) {
	var n int
	var oldest sql.NullInt64
	err := dq.db.QueryRow(ctx, overdueRedactionsQuery, RedactionPending, now.UnixMilli()).Scan(&n, &oldest)
	if err != nil || !oldest.Valid {
		return n, time.Time{}, err
	}
	return n, time.UnixMilli(oldest.Int64), nil
}

// RatchetDue is a session whose stored copies are to be ratcheted to Floor: every message below it expired.
type RatchetDue struct {
	RoomID    id.RoomID
	SessionID id.SessionID
	Floor     uint32
}

// SQL on disappear_index and disappear_floor: an index noted again keeps its earlier deadline, and a floor only
// rises.
const (
	noteIndexQuery = `INSERT INTO disappear_index (room_id, session_id, message_index, deadline) VALUES ($1, $2, $3, $4)
		ON CONFLICT (room_id, session_id, message_index) DO UPDATE SET deadline=CASE WHEN excluded.deadline < disappear_index.deadline THEN excluded.deadline ELSE disappear_index.deadline END`
	ratchetsDueQuery      = `SELECT room_id, session_id, MAX(message_index) FROM disappear_index WHERE deadline <= $1 GROUP BY room_id, session_id ORDER BY room_id, session_id`
	deleteIndexBelowQuery = `DELETE FROM disappear_index WHERE room_id=$1 AND session_id=$2 AND message_index < $3`
	raiseFloorQuery       = `INSERT INTO disappear_floor (room_id, session_id, ratchet_floor) VALUES ($1, $2, $3)
			ON CONFLICT (room_id, session_id) DO UPDATE SET ratchet_floor=CASE WHEN excluded.ratchet_floor > disappear_floor.ratchet_floor THEN excluded.ratchet_floor ELSE disappear_floor.ratchet_floor END`
	getFloorQuery = `SELECT ratchet_floor FROM disappear_floor WHERE room_id=$1 AND session_id=$2`
)

// NoteIndex records that a disappearing message with this Megolm message index arrived on a user's session.
func (dq *DisappearQuery) NoteIndex(ctx context.Context, room id.RoomID, session id.SessionID, index uint32, deadline time.Time) error {
	_, err := dq.db.Exec(ctx, noteIndexQuery, room, session, int64(index), deadline.UnixMilli())
	return err
}

// RatchetsDue lists the sessions with messages whose deadline passed at now, each with the floor past the latest
// of them.
func (dq *DisappearQuery) RatchetsDue(ctx context.Context, now time.Time) ([]RatchetDue, error) {
	rows, err := dq.db.Query(ctx, ratchetsDueQuery, now.UnixMilli())
	return dbutil.NewRowIterWithError(rows, func(row dbutil.Scannable) (r RatchetDue, err error) {
		var last int64
		err = row.Scan(&r.RoomID, &r.SessionID, &last)
		r.Floor = uint32(last + 1)
		return
	}, err).AsList()
}

// Ratcheted records that a session's stored copies keep nothing below floor: the floor is remembered (a later
// copy of the session is ratcheted to it too) and the indexes below it are forgotten.
func (dq *DisappearQuery) Ratcheted(ctx context.Context, room id.RoomID, session id.SessionID, floor uint32) error {
	return dq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		_, err := dq.db.Exec(ctx, raiseFloorQuery, room, session, int64(floor))
		if err != nil {
			return err
		}
		_, err = dq.db.Exec(ctx, deleteIndexBelowQuery, room, session, int64(floor))
		return err
	})
}

// Floor returns the first message index ferry keeps of a session (0 when it keeps all).
func (dq *DisappearQuery) Floor(ctx context.Context, room id.RoomID, session id.SessionID) (uint32, error) {
	var floor int64
	err := dq.db.QueryRow(ctx, getFloorQuery, room, session).Scan(&floor)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	return uint32(floor), err
}
