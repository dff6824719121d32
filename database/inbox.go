package database

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/metrics"
)

// InboxState is where an inbox event is in its life.
type InboxState string

const (
	// InboxPending events wait for their room's worker.
	InboxPending InboxState = "pending"
	// InboxWaitingKeys events could not be decrypted yet; they are retried when their room key arrives.
	InboxWaitingKeys InboxState = "waiting_keys"
	// InboxDone events were handled (relayed, or deliberately dropped). Their payload is cleared.
	InboxDone InboxState = "done"
	// InboxFailed events hit a permanent error; the source room was told. Their payload is cleared.
	InboxFailed InboxState = "failed"
)

// InboxEvent is one event as the homeserver delivered it.
type InboxEvent struct {
	Seq        int64
	EventID    id.EventID
	RoomID     id.RoomID
	Sender     id.UserID
	Type       string
	Raw        []byte // the event JSON as received; nil once handled
	State      InboxState
	SessionID  id.SessionID // Megolm session of an encrypted event, for waking it when the key arrives
	ReceivedAt time.Time
	Attempts   int
	NotBefore  time.Time
	LastError  string
	// FailingSince is when relaying the event first failed for a reason that may pass (zero: it never did).
	FailingSince time.Time
	// Synced is false while the homeserver's /sync has not shown an event it pushed, where ferry checks the
	// order of pushes against /sync (see ConfirmOrder).
	Synced bool
}

// InboxQuery reads and writes the inbox table.
type InboxQuery struct {
	db *dbutil.Database
}

// SQL on inbox. Statements ending in "IN " take a list of parameters (placeholders) after them.
const (
	inboxColumns = `seq, event_id, room_id, sender, event_type, raw, state, session_id, received_at, attempts, not_before, last_error, failing_since, synced`
	inboxSelect  = `SELECT ` + inboxColumns + ` FROM inbox `
	// The multi-row insert adds one (...) group of inboxInsertWidth parameters per event; a redelivered event ID
	// is skipped, and only new rows come back.
	inboxInsertHead  = `INSERT INTO inbox (event_id, room_id, sender, event_type, raw, state, session_id, received_at, synced) VALUES `
	inboxInsertWidth = 9
	inboxInsertTail  = ` ON CONFLICT (event_id) DO NOTHING RETURNING seq, event_id`
	// inboxOrder is an event's place in its room's queue: its delivery order, unless /sync showed another.
	inboxOrder = `COALESCE(ord, seq*1000)`

	getInboxQuery        = inboxSelect + `WHERE event_id=$1`
	nextInRoomQuery      = inboxSelect + `WHERE room_id=$1 AND state=$2 ORDER BY ` + inboxOrder + ` LIMIT $3`
	parkedInboxQuery     = inboxSelect + `WHERE state=$1 ORDER BY seq`
	roomsWithWorkQuery   = `SELECT DISTINCT room_id FROM inbox WHERE state=$1`
	inboxCountQuery      = `SELECT state, COUNT(*) FROM inbox WHERE ($1='' OR room_id=$1) GROUP BY state`
	inboxBacklogsQuery   = `SELECT state, COUNT(*), MIN(received_at) FROM inbox WHERE state IN ($1, $2) GROUP BY state`
	confirmOrderHead     = `UPDATE inbox SET synced=true WHERE room_id=$1 AND event_id IN `
	confirmOrderTail     = ` RETURNING seq, event_id, state, ` + inboxOrder
	setInboxOrderQuery   = `UPDATE inbox SET ord=$2 WHERE seq=$1`
	unshownInRoomQuery   = `SELECT seq, ` + inboxOrder + ` AS k, sender, raw FROM inbox WHERE room_id=$1 AND state=$2 AND NOT synced ORDER BY k`
	finishInboxQuery     = `UPDATE inbox SET state=$2, raw=NULL, last_error=$3 WHERE seq=$1`
	finishManyInboxQuery = `UPDATE inbox SET state=$1, raw=NULL, last_error=NULL WHERE seq IN `
	parkInboxQuery       = `UPDATE inbox SET state=$2, session_id=$3, attempts=attempts+1 WHERE seq=$1`
	// The first transient failure sets failing_since ($4); later ones keep it.
	retryInboxQuery = `UPDATE inbox SET attempts=attempts+1, not_before=$2, last_error=$3,
		failing_since=CASE WHEN failing_since=0 THEN $4 ELSE failing_since END WHERE seq=$1`
	wakeInboxQuery  = `UPDATE inbox SET state=$1 WHERE state=$2 AND session_id=$3 RETURNING room_id`
	pruneInboxQuery = `DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox WHERE state IN ($1, $2) AND received_at < $3 ORDER BY seq LIMIT $4)`
)

// Insert records events in one transaction and reports which were new (redeliveries of known event IDs are
// skipped). Nothing is acknowledged to the homeserver before this returns without error. Each new event gets its
// Seq set (the rows the statement inserted); a redelivered event keeps Seq 0.
func (iq *InboxQuery) Insert(ctx context.Context, evts []*InboxEvent) (inserted int, err error) {
	if len(evts) == 0 {
		return 0, nil
	}
	defer metrics.ObserveCommit(metrics.CommitIntake, time.Now())
	// One multi-row statement: a transaction of 100 events costs one round trip, not 100.
	const perRow = inboxInsertWidth
	var sb strings.Builder
	sb.Grow(len(inboxInsertHead) + len(inboxInsertTail) + len(evts)*40)
	sb.WriteString(inboxInsertHead)
	args := make([]any, 0, len(evts)*perRow)
	for i, evt := range evts {
		if i > 0 {
			sb.WriteByte(',')
		}
		writePlaceholders(&sb, i*perRow, perRow)
		args = append(args, evt.EventID, evt.RoomID, evt.Sender, evt.Type, string(evt.Raw), evt.State,
			dbutil.StrPtr(evt.SessionID), evt.ReceivedAt.UnixMilli(), evt.Synced)
	}
	sb.WriteString(inboxInsertTail)
	rows, err := iq.db.Query(ctx, sb.String(), args...)
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	byID := make(map[id.EventID]*InboxEvent, len(evts))
	for _, evt := range evts {
		if _, dup := byID[evt.EventID]; !dup {
			byID[evt.EventID] = evt
		}
	}
	for rows.Next() {
		var seq int64
		var evtID id.EventID
		if err = rows.Scan(&seq, &evtID); err != nil {
			return inserted, err
		}
		if evt := byID[evtID]; evt != nil {
			evt.Seq = seq
		}
		inserted++
	}
	return inserted, rows.Err()
}

func placeholders(offset, n int) string {
	var sb strings.Builder
	writePlaceholders(&sb, offset, n)
	return sb.String()
}

func writePlaceholders(sb *strings.Builder, offset, n int) {
	sb.WriteByte('(')
	for i := 1; i <= n; i++ {
		if i > 1 {
			sb.WriteByte(',')
		}
		sb.WriteByte('$')
		sb.WriteString(strconv.Itoa(offset + i))
	}
	sb.WriteByte(')')
}

// Get returns one event by ID, or nil.
func (iq *InboxQuery) Get(ctx context.Context, evtID id.EventID) (*InboxEvent, error) {
	return scanOne(iq.db.QueryRow(ctx, getInboxQuery, evtID))
}

// RoomsWithWork lists rooms that have pending events (waiting for their not_before or not).
func (iq *InboxQuery) RoomsWithWork(ctx context.Context) ([]id.RoomID, error) {
	rows, err := iq.db.Query(ctx, roomsWithWorkQuery, InboxPending)
	return dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.RoomID], err).AsList()
}

// NextInRoom returns up to limit pending events of one room, in the room's order (see ConfirmOrder).
func (iq *InboxQuery) NextInRoom(ctx context.Context, roomID id.RoomID, limit int) ([]*InboxEvent, error) {
	rows, err := iq.db.Query(ctx, nextInRoomQuery, roomID, InboxPending, limit)
	return dbutil.NewRowIterWithError(rows, scanInbox, err).AsList()
}

// ShownEvent is an event as the homeserver's /sync showed it: its ID, and its sender's server and timestamp,
// which tell whether a pushed event /sync did not show is older than it (ConfirmOrder).
type ShownEvent struct {
	ID     id.EventID
	Server string // the sender's server name
	TS     int64  // origin_server_ts: that server's clock
}

// ConfirmOrder records that the homeserver's /sync showed evts, one room's events in the room's order: their
// rows are marked synced, and pending ones whose delivery order (a homeserver that pushed an event late) disagrees
// take the room's order, keeping their places among the room's other pending events. With complete (the batch
// showed everything the room had up to its end, since the previous batch), a pushed event /sync has not shown
// yet came after all of evts: its pending row moves behind theirs. Unless it is older than one of them from the
// same server (by that server's clock): then the batch skipped it (Dendrite's /sync can, around its restart,
// when it answered a /sync with a later position than it then gives the events it was still writing), and it
// goes right before the first such one. It reports how many rows moved, and how many of those not shown it found
// skipped. Events not in the inbox are ignored.
func (iq *InboxQuery) ConfirmOrder(ctx context.Context, roomID id.RoomID, evts []ShownEvent, complete bool) (moved, skipped int, err error) {
	if len(evts) == 0 {
		return 0, 0, nil
	}
	err = iq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		args := make([]any, 0, len(evts)+1)
		args = append(args, roomID)
		for _, e := range evts {
			args = append(args, e.ID)
		}
		in := placeholders(1, len(evts))
		rows, err := iq.db.Query(ctx, confirmOrderHead+in+confirmOrderTail, args...)
		if err != nil {
			return err
		}
		byID := make(map[id.EventID]placedRow, len(evts))
		for rows.Next() {
			var p placedRow
			var evtID id.EventID
			var state InboxState
			if err = rows.Scan(&p.seq, &evtID, &state, &p.key); err != nil {
				_ = rows.Close()
				return err
			}
			if state == InboxPending {
				byID[evtID] = p
			}
		}
		if err = rows.Close(); err != nil {
			return err
		}
		// The pending rows in the room's order, and the places they hold: the k-th takes the k-th smallest.
		// before[i] is where the pending rows of evts[i:] begin in inOrder.
		var inOrder []placedRow
		before := make([]int, len(evts))
		for i, e := range evts {
			before[i] = len(inOrder)
			if p, ok := byID[e.ID]; ok {
				inOrder = append(inOrder, p)
				delete(byID, e.ID) // an ID listed twice keeps its first place
			}
		}
		if complete && len(inOrder) > 0 {
			// Pushed events not shown yet follow, in the order they hold now (an older one goes before the
			// first event of its server it is older than). Without this, an event /sync shows for the first time
			// (its row new, so last in the queue) would stay behind a later one pushed before it.
			rows, err := iq.db.Query(ctx, unshownInRoomQuery, roomID, InboxPending)
			unshown, err := dbutil.NewRowIterWithError(rows, scanUnshown, err).AsList()
			if err != nil {
				return err
			}
			inOrder, skipped = placeUnshown(inOrder, before, evts, unshown)
		}
		keys := make([]int64, len(inOrder))
		for i, p := range inOrder {
			keys[i] = p.key
		}
		slices.Sort(keys)
		for i, p := range inOrder {
			if p.key == keys[i] {
				continue
			}
			if _, err = iq.db.Exec(ctx, setInboxOrderQuery, p.seq, keys[i]); err != nil {
				return err
			}
			moved++
		}
		return nil
	})
	return moved, skipped, err
}

// placedRow is a pending inbox row and its place in the room's queue (inboxOrder); an unshown one also carries
// its sender's server and timestamp.
type placedRow struct {
	seq, key int64
	server   string
	ts       int64
}

func scanUnshown(row dbutil.Scannable) (p placedRow, err error) {
	var sender id.UserID
	var raw []byte
	if err = row.Scan(&p.seq, &p.key, &sender, &raw); err != nil {
		return p, err
	}
	var head struct {
		TS int64 `json:"origin_server_ts"`
	}
	_ = json.Unmarshal(raw, &head) // no timestamp: nothing says it is older, so it follows the batch
	p.server, p.ts = sender.Homeserver(), head.TS
	return p, nil
}

// placeUnshown merges the unshown pending rows (in their queue order) into inOrder, the shown pending rows in
// the batch's order (before[i]: where those of evts[i:] begin): each goes right before the first shown event of
// its server with a later timestamp (skipped counts those), or after all of them.
func placeUnshown(inOrder []placedRow, before []int, evts []ShownEvent, unshown []placedRow) (merged []placedRow, skipped int) {
	at := make(map[int][]placedRow) // index in inOrder -> unshown rows that go before it
	var after []placedRow
	for _, u := range unshown {
		i := -1
		if u.ts > 0 {
			i = slices.IndexFunc(evts, func(e ShownEvent) bool { return e.Server == u.server && e.TS > u.ts })
		}
		if i < 0 {
			after = append(after, u)
		} else {
			at[before[i]] = append(at[before[i]], u)
			skipped++
		}
	}
	merged = make([]placedRow, 0, len(inOrder)+len(unshown))
	for k, p := range inOrder {
		merged = append(merged, at[k]...)
		merged = append(merged, p)
	}
	merged = append(merged, at[len(inOrder)]...)
	return append(merged, after...), skipped
}

// Finish marks an event handled and drops its payload.
func (iq *InboxQuery) Finish(ctx context.Context, seq int64, state InboxState, lastError string) error {
	_, err := iq.db.Exec(ctx, finishInboxQuery, seq, state, dbutil.StrPtr(lastError))
	return err
}

// FinishMany marks events handled without error (done) and drops their payloads, in one statement.
func (iq *InboxQuery) FinishMany(ctx context.Context, seqs []int64, state InboxState) error {
	if len(seqs) == 0 {
		return nil
	}
	const chunk = 500
	for start := 0; start < len(seqs); start += chunk {
		part := seqs[start:min(start+chunk, len(seqs))]
		args := make([]any, 0, len(part)+1)
		args = append(args, state)
		for _, s := range part {
			args = append(args, s)
		}
		// placeholders renders ($2,…,$n+1): an IN list works on Postgres and SQLite alike.
		if _, err := iq.db.Exec(ctx, finishManyInboxQuery+placeholders(1, len(part)), args...); err != nil {
			return err
		}
	}
	return nil
}

// Park marks an event as waiting for its room key.
func (iq *InboxQuery) Park(ctx context.Context, seq int64, sessionID id.SessionID) error {
	_, err := iq.db.Exec(ctx, parkInboxQuery, seq, InboxWaitingKeys, sessionID)
	return err
}

// Retry records a transient failure at now; the event stays pending and is not tried before notBefore. The
// first such failure sets the event's failing_since.
func (iq *InboxQuery) Retry(ctx context.Context, seq int64, now, notBefore time.Time, lastError string) error {
	_, err := iq.db.Exec(ctx, retryInboxQuery, seq, notBefore.UnixMilli(), lastError, now.UnixMilli())
	return err
}

// Wake moves events parked for a session back to pending and returns their rooms.
func (iq *InboxQuery) Wake(ctx context.Context, sessionID id.SessionID) ([]id.RoomID, error) {
	rows, err := iq.db.Query(ctx, wakeInboxQuery, InboxPending, InboxWaitingKeys, sessionID)
	return dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.RoomID], err).AsList()
}

// Prune deletes up to limit handled (done or failed) events received before before, and returns how many it
// deleted. Their rows only served to recognise a redelivery, which homeservers do within minutes.
func (iq *InboxQuery) Prune(ctx context.Context, before time.Time, limit int) (int, error) {
	res, err := iq.db.Exec(ctx, pruneInboxQuery, InboxDone, InboxFailed, before.UnixMilli(), limit)
	if err != nil {
		return 0, err
	}
	n, err := res.RowsAffected()
	return int(n), err
}

// Parked lists events waiting for keys, oldest first.
func (iq *InboxQuery) Parked(ctx context.Context) ([]*InboxEvent, error) {
	rows, err := iq.db.Query(ctx, parkedInboxQuery, InboxWaitingKeys)
	return dbutil.NewRowIterWithError(rows, scanInbox, err).AsList()
}

// CountByState counts a room's events per state (all rooms when roomID is empty).
func (iq *InboxQuery) CountByState(ctx context.Context, roomID id.RoomID) (map[InboxState]int, error) {
	rows, err := iq.db.Query(ctx, inboxCountQuery, roomID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[InboxState]int{}
	for rows.Next() {
		var st InboxState
		var n int
		if err = rows.Scan(&st, &n); err != nil {
			return nil, err
		}
		out[st] = n
	}
	return out, rows.Err()
}

func scanOne(row *sql.Row) (*InboxEvent, error) {
	evt, err := scanInbox(row)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	return evt, err
}

func scanInbox(row dbutil.Scannable) (*InboxEvent, error) {
	var evt InboxEvent
	var raw, sessionID, lastError sql.NullString
	var receivedAt, notBefore, failingSince int64
	err := row.Scan(&evt.Seq, &evt.EventID, &evt.RoomID, &evt.Sender, &evt.Type, &raw, &evt.State, &sessionID,
		&receivedAt, &evt.Attempts, &notBefore, &lastError, &failingSince, &evt.Synced)
	if err != nil {
		return nil, err
	}
	if raw.Valid {
		evt.Raw = []byte(raw.String)
	}
	evt.SessionID = id.SessionID(sessionID.String)
	evt.LastError = lastError.String
	evt.ReceivedAt = time.UnixMilli(receivedAt)
	if notBefore > 0 {
		evt.NotBefore = time.UnixMilli(notBefore)
	}
	if failingSince > 0 {
		evt.FailingSince = time.UnixMilli(failingSince)
	}
	return &evt, nil
}

// Backlog is how many events wait in one inbox state, and since when the oldest has.
type Backlog struct {
	Count      int
	OldestSeen time.Time // when the oldest was received; zero when Count is 0
}

// Backlogs reports the events that still wait (pending and waiting for keys), per state. It scans the table: it
// is meant for metrics scrapes, not for the relay path.
func (iq *InboxQuery) Backlogs(ctx context.Context) (map[InboxState]Backlog, error) {
	rows, err := iq.db.Query(ctx, inboxBacklogsQuery, InboxPending, InboxWaitingKeys)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[InboxState]Backlog{InboxPending: {}, InboxWaitingKeys: {}}
	for rows.Next() {
		var st InboxState
		var n int
		var oldest int64
		if err = rows.Scan(&st, &n, &oldest); err != nil {
			return nil, err
		}
		out[st] = Backlog{Count: n, OldestSeen: time.UnixMilli(oldest)}
	}
	return out, rows.Err()
}
