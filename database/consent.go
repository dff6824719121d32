package database

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// ConsentKind is what a consent request would do once every room it acts on consented.
type ConsentKind string

// Kinds of consent requests.
const (
	// ConsentLink links FromRoom with TargetRoom (joining the link either of them belongs to).
	ConsentLink ConsentKind = "link"
	// ConsentDisappear sets the disappearing timer of link LinkID to DisappearAfter.
	ConsentDisappear ConsentKind = "disappear"
)

// ConsentRequest is an action waiting for consent in the rooms it acts on.
type ConsentRequest struct {
	ID             string
	Kind           ConsentKind
	FromRoom       id.RoomID // where it was asked
	TargetRoom     id.RoomID // ConsentLink: the room to link with
	LinkID         string    // ConsentDisappear: the link whose timer changes
	DisappearAfter time.Duration
	RequestedBy    id.UserID
	CommandEvent   id.EventID // the command that asked; asking again after a crash finds the same request
	CreatedAt      time.Time
	ExpiresAt      time.Time
	Rooms          []ConsentRoom // in room ID order
}

// ConsentRoom is one room a request acts on and who consented there ("" while waiting).
type ConsentRoom struct {
	RoomID      id.RoomID
	ConsentedBy id.UserID
}

// Waiting lists the rooms that have not consented yet.
func (r *ConsentRequest) Waiting() []id.RoomID {
	var out []id.RoomID
	for _, c := range r.Rooms {
		if c.ConsentedBy == "" {
			out = append(out, c.RoomID)
		}
	}
	return out
}

// ConsentQuery reads and writes consent requests.
type ConsentQuery struct {
	db *dbutil.Database
}

// consentIDLengths are the lengths (hex characters of the command's hash) tried for a new request's ID: short
// enough to type, longer only when a shorter one is taken by another request.
var consentIDLengths = []int{6, 8, 12, 16, 64}

// ErrConsentIDTaken is returned by Create when every candidate ID is taken by other requests (practically never).
var ErrConsentIDTaken = errors.New("no free consent request ID")

// SQL on consent_request and consent_room.
const (
	consentColumns             = `id, kind, from_room, target_room, link_id, disappear_ms, requested_by, command_event, created_at, expires_at`
	insertConsentQuery         = `INSERT INTO consent_request (` + consentColumns + `) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`
	getConsentQuery            = `SELECT ` + consentColumns + ` FROM consent_request WHERE id=$1`
	countConsentsByQuery       = `SELECT COUNT(*) FROM consent_request WHERE requested_by=$1 AND expires_at > $2`
	deleteConsentQuery         = `DELETE FROM consent_request WHERE id=$1`
	deleteExpiredConsentsQuery = `DELETE FROM consent_request WHERE expires_at <= $1`

	// Waiting in a room: unexpired at $2, and nobody there consented yet.
	waitingConsentsQuery = `
		SELECT r.id FROM consent_request r JOIN consent_room c ON c.request_id = r.id
		WHERE c.room_id=$1 AND c.consented_by='' AND r.expires_at > $2 ORDER BY r.created_at, r.id`
	countWaitingConsentsQuery = `
		SELECT COUNT(DISTINCT r.id) FROM consent_request r JOIN consent_room c ON c.request_id = r.id
		WHERE c.room_id=$1 AND c.consented_by='' AND r.expires_at > $2`

	getConsentRoomsQuery = `SELECT room_id, consented_by FROM consent_room WHERE request_id=$1 ORDER BY room_id`
	setConsentRoomQuery  = `
		INSERT INTO consent_room (request_id, room_id, consented_by) VALUES ($1, $2, $3)
		ON CONFLICT (request_id, room_id) DO UPDATE SET consented_by=excluded.consented_by`
	deleteConsentRoomsQuery        = `DELETE FROM consent_room WHERE request_id=$1`
	deleteExpiredConsentRoomsQuery = `DELETE FROM consent_room WHERE request_id IN (SELECT id FROM consent_request WHERE expires_at <= $1)`
)

// Create stores a new request with its rooms. Its ID derives from the command event, so a command handled again
// after a crash finds the request it made the first time: Create then returns that one and existed=true.
func (cq *ConsentQuery) Create(ctx context.Context, req *ConsentRequest) (stored *ConsentRequest, existed bool, err error) {
	sum := sha256.Sum256([]byte("consent\x00" + string(req.CommandEvent)))
	digest := hex.EncodeToString(sum[:])
	err = cq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, n := range consentIDLengths {
			candidate := digest[:n]
			cur, err := cq.get(ctx, candidate)
			if err != nil {
				return err
			} else if cur != nil && cur.CommandEvent == req.CommandEvent {
				stored, existed = cur, true
				return nil
			} else if cur != nil {
				continue
			}
			req.ID = candidate
			_, err = cq.db.Exec(ctx, insertConsentQuery, req.ID, req.Kind, req.FromRoom, req.TargetRoom, req.LinkID, req.DisappearAfter.Milliseconds(), req.RequestedBy,
				req.CommandEvent, req.CreatedAt.UnixMilli(), req.ExpiresAt.UnixMilli())
			if err != nil {
				return err
			}
			if err = cq.setRooms(ctx, req.ID, req.Rooms); err != nil {
				return err
			}
			stored, err = cq.get(ctx, req.ID)
			return err
		}
		return ErrConsentIDTaken
	})
	return stored, existed, err
}

// Get returns a request with its rooms, or nil when there is none (expired ones included: the caller decides).
func (cq *ConsentQuery) Get(ctx context.Context, requestID string) (*ConsentRequest, error) {
	return cq.get(ctx, requestID)
}

func (cq *ConsentQuery) get(ctx context.Context, requestID string) (*ConsentRequest, error) {
	req, err := scanConsent(cq.db.QueryRow(ctx, getConsentQuery, requestID))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	rows, err := cq.db.Query(ctx, getConsentRoomsQuery, requestID)
	req.Rooms, err = dbutil.NewRowIterWithError(rows, func(row dbutil.Scannable) (c ConsentRoom, err error) {
		err = row.Scan(&c.RoomID, &c.ConsentedBy)
		return
	}, err).AsList()
	if err != nil {
		return nil, err
	}
	return req, nil
}

func scanConsent(row dbutil.Scannable) (*ConsentRequest, error) {
	var req ConsentRequest
	var disappearMS, created, expires int64
	err := row.Scan(&req.ID, &req.Kind, &req.FromRoom, &req.TargetRoom, &req.LinkID, &disappearMS, &req.RequestedBy, &req.CommandEvent, &created, &expires)
	if err != nil {
		return nil, err
	}
	req.DisappearAfter = time.Duration(disappearMS) * time.Millisecond
	req.CreatedAt, req.ExpiresAt = time.UnixMilli(created), time.UnixMilli(expires)
	return &req, nil
}

// WaitingIn lists the unexpired requests that wait for consent in room, oldest first.
func (cq *ConsentQuery) WaitingIn(ctx context.Context, room id.RoomID, now time.Time) ([]*ConsentRequest, error) {
	rows, err := cq.db.Query(ctx, waitingConsentsQuery, room, now.UnixMilli())
	ids, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[string], err).AsList()
	if err != nil {
		return nil, err
	}
	out := make([]*ConsentRequest, 0, len(ids))
	for _, requestID := range ids {
		req, err := cq.get(ctx, requestID)
		if err != nil {
			return nil, err
		} else if req != nil {
			out = append(out, req)
		}
	}
	return out, nil
}

// CountWaiting counts the unexpired requests waiting in room and those asked by user, for the caps on what one
// user can make ferry keep.
func (cq *ConsentQuery) CountWaiting(ctx context.Context, room id.RoomID, user id.UserID, now time.Time) (inRoom, byUser int, err error) {
	err = cq.db.QueryRow(ctx, countWaitingConsentsQuery, room, now.UnixMilli()).Scan(&inRoom)
	if err == nil {
		err = cq.db.QueryRow(ctx, countConsentsByQuery, user, now.UnixMilli()).Scan(&byUser)
	}
	return
}

// SetRooms records rooms of a request: a room already listed takes the given consenter ("" waits again).
func (cq *ConsentQuery) SetRooms(ctx context.Context, requestID string, rooms []ConsentRoom) error {
	return cq.setRooms(ctx, requestID, rooms)
}

func (cq *ConsentQuery) setRooms(ctx context.Context, requestID string, rooms []ConsentRoom) error {
	for _, c := range rooms {
		_, err := cq.db.Exec(ctx, setConsentRoomQuery, requestID, c.RoomID, c.ConsentedBy)
		if err != nil {
			return err
		}
	}
	return nil
}

// Delete removes a request and its rooms; it reports whether there was one.
func (cq *ConsentQuery) Delete(ctx context.Context, requestID string) (bool, error) {
	var deleted bool
	err := cq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if _, err := cq.db.Exec(ctx, deleteConsentRoomsQuery, requestID); err != nil {
			return err
		}
		res, err := cq.db.Exec(ctx, deleteConsentQuery, requestID)
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		deleted = n > 0
		return err
	})
	return deleted, err
}

// DeleteExpired removes the requests that expired at now, with their rooms; it returns how many.
func (cq *ConsentQuery) DeleteExpired(ctx context.Context, now time.Time) (int64, error) {
	var n int64
	err := cq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		_, err := cq.db.Exec(ctx, deleteExpiredConsentRoomsQuery, now.UnixMilli())
		if err != nil {
			return err
		}
		res, err := cq.db.Exec(ctx, deleteExpiredConsentsQuery, now.UnixMilli())
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	return n, err
}
