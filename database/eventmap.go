package database

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"sync"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// Copy is one relayed copy of an original event.
type Copy struct {
	SourceEvent id.EventID
	SourceRoom  id.RoomID
	TargetRoom  id.RoomID
	TargetEvent id.EventID
	Sender      id.UserID // the ghost that sent the copy
	CreatedAt   time.Time
	DisappearAt time.Time // zero when the copy does not disappear
}

// EventMapQuery reads and writes the event map. Room workers stage the copies they send (Stage) and write them
// with their batch's inbox states in one transaction (PutMany, then Unstage); staged copies are visible to Get,
// ByTarget and Counterpart meanwhile, so a reply or redaction later in the same batch finds its target.
type EventMapQuery struct {
	db *dbutil.Database

	stagedLock sync.RWMutex
	bySource   map[copyKey]*Copy
	byTarget   map[id.EventID]*Copy
}

type copyKey struct {
	source id.EventID
	target id.RoomID
}

// Stage makes a copy visible to lookups until Unstage; the caller writes it with PutMany.
func (eq *EventMapQuery) Stage(c *Copy) {
	eq.stagedLock.Lock()
	defer eq.stagedLock.Unlock()
	if eq.bySource == nil {
		eq.bySource = make(map[copyKey]*Copy)
		eq.byTarget = make(map[id.EventID]*Copy)
	}
	k := copyKey{c.SourceEvent, c.TargetRoom}
	if _, ok := eq.bySource[k]; ok {
		return
	}
	eq.bySource[k] = c
	eq.byTarget[c.TargetEvent] = c
}

// Unstage forgets staged copies (once written, or when the batch is abandoned).
func (eq *EventMapQuery) Unstage(cs []*Copy) {
	eq.stagedLock.Lock()
	defer eq.stagedLock.Unlock()
	for _, c := range cs {
		k := copyKey{c.SourceEvent, c.TargetRoom}
		if eq.bySource[k] == c {
			delete(eq.bySource, k)
			delete(eq.byTarget, c.TargetEvent)
		}
	}
}

func (eq *EventMapQuery) staged(source id.EventID, target id.RoomID) *Copy {
	eq.stagedLock.RLock()
	defer eq.stagedLock.RUnlock()
	if c := eq.bySource[copyKey{source, target}]; c != nil {
		cp := *c
		return &cp
	}
	return nil
}

func (eq *EventMapQuery) stagedByTarget(target id.EventID) *Copy {
	eq.stagedLock.RLock()
	defer eq.stagedLock.RUnlock()
	if c := eq.byTarget[target]; c != nil {
		cp := *c
		return &cp
	}
	return nil
}

// StagedDeadline returns the earliest deadline among staged copies of evt or staged copies that are evt, or zero.
// DeadlineOf reads only what is written; a copy stays staged until its worker's batch commits.
func (eq *EventMapQuery) StagedDeadline(evt id.EventID) time.Time {
	eq.stagedLock.RLock()
	defer eq.stagedLock.RUnlock()
	var earliest time.Time
	consider := func(c *Copy) {
		if c != nil && !c.DisappearAt.IsZero() && (earliest.IsZero() || c.DisappearAt.Before(earliest)) {
			earliest = c.DisappearAt
		}
	}
	consider(eq.byTarget[evt])
	for k, c := range eq.bySource {
		if k.source == evt {
			consider(c)
		}
	}
	return earliest
}

// PutMany records copies in one statement per 500. Recording the same (source, target room) twice keeps the
// first.
func (eq *EventMapQuery) PutMany(ctx context.Context, cs []*Copy) error {
	const chunk = 500
	for start := 0; start < len(cs); start += chunk {
		part := cs[start:min(start+chunk, len(cs))]
		var sb strings.Builder
		sb.WriteString(copyInsertHead)
		args := make([]any, 0, len(part)*copyWidth)
		for i, c := range part {
			if i > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(placeholders(i*copyWidth, copyWidth))
			args = append(args, copyArgs(c)...)
		}
		sb.WriteString(copyInsertTail)
		if _, err := eq.db.Exec(ctx, sb.String(), args...); err != nil {
			return err
		}
	}
	return nil
}

// SQL on event_map. The multi-row insert (PutMany, and the batch statement) adds one (...) group of copyWidth
// parameters per copy between its head and its tail.
const (
	copyColumns = `source_event, source_room, target_room, target_event, sender, created_at, disappear_at`
	copyWidth   = 7
	// Recording the same (source, target room) twice keeps the first.
	copyInsertHead = `INSERT INTO event_map (` + copyColumns + `) VALUES `
	copyInsertTail = ` ON CONFLICT (source_event, target_room) DO NOTHING`

	getCopyBase          = `SELECT ` + copyColumns + ` FROM event_map `
	getCopyQuery         = getCopyBase + `WHERE source_event=$1 AND target_room=$2`
	getCopyByTargetQuery = getCopyBase + `WHERE target_event=$1`
	countCopiesFromQuery = `SELECT COUNT(*) FROM event_map WHERE source_room=$1`
	lastCopyFromQuery    = `SELECT MAX(created_at) FROM event_map WHERE source_room=$1`
	// The earliest deadline of an event as an original or as a copy.
	copyDeadlineQuery = `SELECT MIN(disappear_at) FROM event_map WHERE (source_event=$1 OR target_event=$1) AND disappear_at>0`
)

// Put records a copy. Recording the same (source, target room) twice keeps the first. A copy with a deadline
// is scheduled for redaction in the same transaction, together with its original.
func (eq *EventMapQuery) Put(ctx context.Context, c *Copy) error {
	if c.DisappearAt.IsZero() {
		return eq.PutMany(ctx, []*Copy{c})
	}
	return eq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if err := eq.PutMany(ctx, []*Copy{c}); err != nil {
			return err
		}
		dq := DisappearQuery{db: eq.db}
		return dq.Schedule(ctx, c.redactions()...)
	})
}

// redactions are what a copy with a deadline schedules: the copy, redacted by the ghost that sent it, and its
// original, redacted by the bot. None without a deadline.
func (c *Copy) redactions() []*Redaction {
	if c.DisappearAt.IsZero() {
		return nil
	}
	return []*Redaction{
		{EventID: c.TargetEvent, RoomID: c.TargetRoom, RedactAs: c.Sender, Deadline: c.DisappearAt},
		{EventID: c.SourceEvent, RoomID: c.SourceRoom, Original: true, Deadline: c.DisappearAt},
	}
}

// Get returns the copy of an original in a target room, or nil.
func (eq *EventMapQuery) Get(ctx context.Context, source id.EventID, targetRoom id.RoomID) (*Copy, error) {
	if c := eq.staged(source, targetRoom); c != nil {
		return c, nil
	}
	return scanCopyRow(eq.db.QueryRow(ctx, getCopyQuery, source, targetRoom))
}

// ByTarget returns the map row whose copy is the given event, or nil when the event is not a copy.
func (eq *EventMapQuery) ByTarget(ctx context.Context, target id.EventID) (*Copy, error) {
	if c := eq.stagedByTarget(target); c != nil {
		return c, nil
	}
	return scanCopyRow(eq.db.QueryRow(ctx, getCopyByTargetQuery, target))
}

// Counterpart resolves an event seen in one room of a link to its counterpart in targetRoom: the copy there, or
// the original if the original lives in targetRoom. ok=false when ferry has no counterpart.
func (eq *EventMapQuery) Counterpart(ctx context.Context, evt id.EventID, targetRoom id.RoomID) (id.EventID, bool, error) {
	original := evt
	if c, err := eq.ByTarget(ctx, evt); err != nil {
		return "", false, err
	} else if c != nil {
		if c.SourceRoom == targetRoom {
			return c.SourceEvent, true, nil
		}
		original = c.SourceEvent
	}
	c, err := eq.Get(ctx, original, targetRoom)
	if err != nil || c == nil {
		return "", false, err
	}
	return c.TargetEvent, true, nil
}

// CountSince counts copies sent into or out of a set of rooms since a time.
func (eq *EventMapQuery) CountForRoom(ctx context.Context, room id.RoomID) (int, error) {
	var n int
	err := eq.db.QueryRow(ctx, countCopiesFromQuery, room).Scan(&n)
	return n, err
}

// LastForRoom returns when the latest copy of an event from room was made, or zero.
func (eq *EventMapQuery) LastForRoom(ctx context.Context, room id.RoomID) (time.Time, error) {
	var ts sql.NullInt64
	err := eq.db.QueryRow(ctx, lastCopyFromQuery, room).Scan(&ts)
	if err != nil || !ts.Valid {
		return time.Time{}, err
	}
	return time.UnixMilli(ts.Int64), nil
}

func scanCopyRow(row *sql.Row) (*Copy, error) {
	c, err := scanCopy(row)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	return c, err
}

func scanCopy(row dbutil.Scannable) (*Copy, error) {
	var c Copy
	var created, disappear int64
	err := row.Scan(&c.SourceEvent, &c.SourceRoom, &c.TargetRoom, &c.TargetEvent, &c.Sender, &created, &disappear)
	if err != nil {
		return nil, err
	}
	c.CreatedAt = time.UnixMilli(created)
	if disappear > 0 {
		c.DisappearAt = time.UnixMilli(disappear)
	}
	return &c, nil
}
