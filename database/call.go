package database

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// CallState is how far a relayed 1:1 call got.
type CallState string

const (
	// CallRinging: the invite was relayed and nobody answered yet.
	CallRinging CallState = "ringing"
	// CallAnswered: an answer was relayed back to the caller.
	CallAnswered CallState = "answered"
	// CallEnded: hung up, rejected, lost a glare, or ended by an unlink. Its events are no longer relayed.
	CallEnded CallState = "ended"
)

// Call is one 1:1 call relayed across a link. It never holds SDP or candidates.
type Call struct {
	Key          string
	LinkID       string
	OriginRoom   id.RoomID
	OriginCallID string
	Caller       id.UserID // the real user who placed the call
	CallerParty  string
	Invitee      id.UserID // the real user the invite named; empty when it named nobody
	Callee       id.UserID // the real user whose answer was relayed first; empty before that
	CalleeParty  string
	State        CallState
	ExpiresAt    time.Time // when the invite expires
	CreatedAt    time.Time
	UpdatedAt    time.Time
	// Rooms maps every room of the call to the call_id the call has there.
	Rooms map[id.RoomID]string
}

// CallQuery reads and writes relayed calls.
type CallQuery struct {
	db *dbutil.Database
}

// callRetention is how long a call that has not changed is kept.
const callRetention = 24 * time.Hour

// SQL on relayed_call and call_room.
const (
	callColumns     = `call_key, link_id, origin_room, origin_call_id, caller, caller_party, callee, callee_party, state, expires_at, created_at, updated_at, invitee`
	getCallBase     = `SELECT ` + callColumns + ` FROM relayed_call `
	getCallQuery    = getCallBase + `WHERE call_key=$1`
	liveCallsQuery  = getCallBase + `WHERE link_id=$1 AND state<>$2 ORDER BY created_at, call_key`
	insertCallQuery = `INSERT INTO relayed_call (` + callColumns + `) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`
	// The rooms of calls that have not changed since $1 go first (call_room has no foreign key).
	deleteOldCallRoomsQuery = `DELETE FROM call_room WHERE call_key IN (SELECT call_key FROM relayed_call WHERE updated_at < $1)`
	deleteOldCallsQuery     = `DELETE FROM relayed_call WHERE updated_at < $1`
	setCallStateQuery       = `UPDATE relayed_call SET state=$2, updated_at=$3 WHERE call_key=$1`
	// The first answer wins: only a call still in state $6 (ringing) takes it.
	setCallAnsweredQuery = `UPDATE relayed_call SET state=$2, callee=$3, callee_party=$4, updated_at=$5 WHERE call_key=$1 AND state=$6`

	insertCallRoomQuery   = `INSERT INTO call_room (room_id, call_id, call_key) VALUES ($1, $2, $3)`
	getCallKeyByRoomQuery = `SELECT call_key FROM call_room WHERE room_id=$1 AND call_id=$2`
	getCallRoomsQuery     = `SELECT room_id, call_id FROM call_room WHERE call_key=$1`
)

// Insert records a new call with its per-room call IDs, and forgets calls that have not changed for a day.
// It fails when one of the (room, call_id) pairs is already taken.
func (cq *CallQuery) Insert(ctx context.Context, c *Call) error {
	return cq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		old := time.Now().Add(-callRetention).UnixMilli()
		if _, err := cq.db.Exec(ctx, deleteOldCallRoomsQuery, old); err != nil {
			return err
		}
		if _, err := cq.db.Exec(ctx, deleteOldCallsQuery, old); err != nil {
			return err
		}
		_, err := cq.db.Exec(ctx, insertCallQuery,
			c.Key, c.LinkID, c.OriginRoom, c.OriginCallID, c.Caller, c.CallerParty, c.Callee, c.CalleeParty, c.State,
			c.ExpiresAt.UnixMilli(), c.CreatedAt.UnixMilli(), c.UpdatedAt.UnixMilli(), c.Invitee)
		if err != nil {
			return err
		}
		for room, callID := range c.Rooms {
			if _, err = cq.db.Exec(ctx, insertCallRoomQuery, room, callID, c.Key); err != nil {
				return err
			}
		}
		return nil
	})
}

// ByRoomCallID returns the call that has callID in room, or nil.
func (cq *CallQuery) ByRoomCallID(ctx context.Context, room id.RoomID, callID string) (*Call, error) {
	var key string
	err := cq.db.QueryRow(ctx, getCallKeyByRoomQuery, room, callID).Scan(&key)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	return cq.Get(ctx, key)
}

// Get returns a call by key, or nil.
func (cq *CallQuery) Get(ctx context.Context, key string) (*Call, error) {
	c, err := scanCall(cq.db.QueryRow(ctx, getCallQuery, key))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	return c, cq.loadRooms(ctx, c)
}

// Live lists the calls of a link that have not ended, oldest first.
func (cq *CallQuery) Live(ctx context.Context, linkID string) ([]*Call, error) {
	rows, err := cq.db.Query(ctx, liveCallsQuery, linkID, CallEnded)
	calls, err := dbutil.NewRowIterWithError(rows, scanCall, err).AsList()
	if err != nil {
		return nil, err
	}
	for _, c := range calls {
		if err = cq.loadRooms(ctx, c); err != nil {
			return nil, err
		}
	}
	return calls, nil
}

// SetState moves a call to a state.
func (cq *CallQuery) SetState(ctx context.Context, key string, state CallState) error {
	_, err := cq.db.Exec(ctx, setCallStateQuery, key, state, time.Now().UnixMilli())
	return err
}

// Answered records the first relayed answer of a ringing call. Later answers (other devices) change nothing.
func (cq *CallQuery) Answered(ctx context.Context, key string, callee id.UserID, party string) error {
	_, err := cq.db.Exec(ctx, setCallAnsweredQuery,
		key, CallAnswered, callee, party, time.Now().UnixMilli(), CallRinging)
	return err
}

func (cq *CallQuery) loadRooms(ctx context.Context, c *Call) error {
	rows, err := cq.db.Query(ctx, getCallRoomsQuery, c.Key)
	if err != nil {
		return err
	}
	defer rows.Close()
	c.Rooms = make(map[id.RoomID]string)
	for rows.Next() {
		var room id.RoomID
		var callID string
		if err = rows.Scan(&room, &callID); err != nil {
			return err
		}
		c.Rooms[room] = callID
	}
	return rows.Err()
}

func scanCall(row dbutil.Scannable) (*Call, error) {
	var c Call
	var expires, created, updated int64
	err := row.Scan(&c.Key, &c.LinkID, &c.OriginRoom, &c.OriginCallID, &c.Caller, &c.CallerParty, &c.Callee, &c.CalleeParty, &c.State, &expires, &created, &updated, &c.Invitee)
	if err != nil {
		return nil, err
	}
	c.ExpiresAt, c.CreatedAt, c.UpdatedAt = time.UnixMilli(expires), time.UnixMilli(created), time.UnixMilli(updated)
	return &c, nil
}
