package database

import (
	"context"
	"strconv"
	"strings"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/metrics"
)

// ReplayEntry is one row of the crypto store's replay index (crypto_message_index, owned by mautrix's crypto
// store): the Megolm message index of a session that an event used. The crypto layer keeps the index in memory
// and hands new rows to the relay, which commits them together with the events they protect.
type ReplayEntry struct {
	SessionID id.SessionID
	Index     uint
	EventID   id.EventID
	Timestamp int64
}

// FailedEvent is an inbox event that hit a permanent error.
type FailedEvent struct {
	Seq   int64
	Error string
}

// Batch is what a room worker records about one batch of inbox events, atomically.
type Batch struct {
	Replay []ReplayEntry
	Copies []*Copy
	Done   []int64 // inbox seqs
	Failed []FailedEvent
}

// maxBatchParams keeps the single-statement form well below Postgres's 65,535 parameters.
const maxBatchParams = 20000

// CommitBatch records a batch in one transaction. On Postgres a batch without failures is one statement (data-
// modifying CTEs: one round trip, one commit); otherwise one statement per kind of row inside a transaction.
func (db *Database) CommitBatch(ctx context.Context, b *Batch) error {
	defer metrics.ObserveCommit(metrics.CommitRelay, time.Now())
	params := len(b.Replay)*replayWidth + len(b.Copies)*copyWidth + len(b.Done) + 1
	redactions := batchRedactions(b.Copies)
	if db.Dialect == dbutil.Postgres && len(b.Failed) == 0 && len(b.Done) > 0 && len(redactions) == 0 && params <= maxBatchParams {
		q, args := batchStatement(b)
		_, err := db.Exec(ctx, q, args...)
		return err
	}
	return db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if err := db.putReplay(ctx, b.Replay); err != nil {
			return err
		}
		if err := db.EventMap.PutMany(ctx, b.Copies); err != nil {
			return err
		}
		// Copies of disappearing messages are scheduled for redaction in the same transaction (see Put).
		if len(redactions) > 0 {
			if err := db.Disappear.Schedule(ctx, redactions...); err != nil {
				return err
			}
		}
		if err := db.Inbox.FinishMany(ctx, b.Done, InboxDone); err != nil {
			return err
		}
		for _, f := range b.Failed {
			if err := db.Inbox.Finish(ctx, f.Seq, InboxFailed, f.Error); err != nil {
				return err
			}
		}
		return nil
	})
}

// The replay index's multi-row insert (one (...) group of replayWidth parameters per entry).
const (
	replayInsertHead = `INSERT INTO crypto_message_index (session_id, "index", event_id, timestamp) VALUES `
	replayWidth      = 4
	replayInsertTail = ` ON CONFLICT (session_id, "index") DO NOTHING`
)

// The single-statement form of a batch (Postgres): its inserts as data-modifying CTEs, the inbox update as the
// statement's body: `WITH replay AS (...), copies AS (...), done AS (SELECT 1) UPDATE inbox ...`.
const (
	batchWith      = `WITH `
	batchReplayCTE = `replay AS (`
	batchCopiesCTE = `copies AS (`
	batchCTEEnd    = `), `
	// A CTE list cannot end with a comma: a no-op CTE closes it. The body's parameters follow: the state, then
	// the inbox seqs.
	batchBodyHead  = `done AS (SELECT 1) UPDATE inbox SET state=`
	batchBodySeqIn = `, raw=NULL, last_error=NULL WHERE seq IN `
)

// batchStatement renders a batch as one Postgres statement: the inserts as CTEs, the inbox update as its body.
func batchStatement(b *Batch) (string, []any) {
	var sb strings.Builder
	args := make([]any, 0, len(b.Replay)*replayWidth+len(b.Copies)*copyWidth+len(b.Done)+1)
	sb.WriteString(batchWith)
	if len(b.Replay) > 0 {
		sb.WriteString(batchReplayCTE + replayInsertHead)
		for i, e := range b.Replay {
			if i > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(placeholders(len(args), replayWidth))
			args = append(args, e.SessionID, e.Index, e.EventID, e.Timestamp)
		}
		sb.WriteString(replayInsertTail + batchCTEEnd)
	}
	if len(b.Copies) > 0 {
		sb.WriteString(batchCopiesCTE + copyInsertHead)
		for i, c := range b.Copies {
			if i > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(placeholders(len(args), copyWidth))
			args = append(args, copyArgs(c)...)
		}
		sb.WriteString(copyInsertTail + batchCTEEnd)
	}
	sb.WriteString(batchBodyHead)
	args = append(args, InboxDone)
	sb.WriteString("$" + strconv.Itoa(len(args)))
	sb.WriteString(batchBodySeqIn)
	sb.WriteString(placeholders(len(args), len(b.Done)))
	for _, seq := range b.Done {
		args = append(args, seq)
	}
	return sb.String(), args
}

func (db *Database) putReplay(ctx context.Context, rows []ReplayEntry) error {
	const chunk = 500
	for start := 0; start < len(rows); start += chunk {
		part := rows[start:min(start+chunk, len(rows))]
		var sb strings.Builder
		sb.WriteString(replayInsertHead)
		args := make([]any, 0, len(part)*replayWidth)
		for i, e := range part {
			if i > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(placeholders(len(args), replayWidth))
			args = append(args, e.SessionID, e.Index, e.EventID, e.Timestamp)
		}
		sb.WriteString(replayInsertTail)
		if _, err := db.Exec(ctx, sb.String(), args...); err != nil {
			return err
		}
	}
	return nil
}

func copyArgs(c *Copy) []any {
	var disappear int64
	if !c.DisappearAt.IsZero() {
		disappear = c.DisappearAt.UnixMilli()
	}
	return []any{c.SourceEvent, c.SourceRoom, c.TargetRoom, c.TargetEvent, c.Sender, c.CreatedAt.UnixMilli(), disappear}
}

// batchRedactions lists what the copies of a batch schedule, each event once with its earliest deadline: the
// copies of one original in several rooms all name that original.
func batchRedactions(copies []*Copy) []*Redaction {
	var out []*Redaction
	var seen map[id.EventID]*Redaction
	for _, c := range copies {
		for _, r := range c.redactions() {
			if prev := seen[r.EventID]; prev != nil {
				if r.Deadline.Before(prev.Deadline) {
					prev.Deadline = r.Deadline
				}
				continue
			}
			if seen == nil {
				seen = make(map[id.EventID]*Redaction)
			}
			seen[r.EventID] = r
			out = append(out, r)
		}
	}
	return out
}
