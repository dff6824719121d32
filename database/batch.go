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

// RowInsert is a multi-row insert into a table ferry does not own, written with a batch so that it commits
// together with the events it belongs to: the crypto store's replay index entries of the batch's events. The
// owner of the table writes the statement (crypto/mautrixstore.go for mautrix's tables); this package only adds
// the rows' parameters between Head (`INSERT INTO t (columns) VALUES `) and Tail (what follows the rows, e.g. an
// ON CONFLICT clause). Args holds Width values per row.
type RowInsert struct {
	Head, Tail string
	Width      int
	Args       []any
}

func (ri *RowInsert) rows() int {
	if ri.Width == 0 {
		return 0
	}
	return len(ri.Args) / ri.Width
}

// FailedEvent is an inbox event that hit a permanent error.
type FailedEvent struct {
	Seq   int64
	Error string
}

// Batch is what a room worker records about one batch of inbox events, atomically.
type Batch struct {
	// Replay holds the replay protection entries of the events decrypted so far (see RowInsert).
	Replay RowInsert
	Copies []*Copy
	Done   []int64 // inbox seqs
	Failed []FailedEvent
}

// maxBatchParams keeps the single-statement form well below Postgres's 65,535 parameters.
const maxBatchParams = 20000

// CommitBatch records a batch in one transaction. On Postgres a batch without failures is one statement (data-
// modifying CTEs: one round trip, one commit); otherwise one statement per kind of row inside a transaction.
func (db *Database) CommitBatch(ctx context.Context, b *Batch) error {
	return db.CommitBatchOn(ctx, nil, b)
}

// CommitBatchOn is CommitBatch where the single statement runs on conn, a connection the caller keeps for its
// commits (nil: one of the pool's); the other forms (failed rows, redactions, too many parameters) take the
// pool's, as CommitBatch does.
func (db *Database) CommitBatchOn(ctx context.Context, conn dbutil.Execable, b *Batch) error {
	defer metrics.ObserveCommit(metrics.CommitRelay, time.Now())
	params := len(b.Replay.Args) + len(b.Copies)*copyWidth + len(b.Done) + 1
	redactions := batchRedactions(b.Copies)
	if db.Dialect == dbutil.Postgres && len(b.Failed) == 0 && len(b.Done) > 0 && len(redactions) == 0 && params <= maxBatchParams {
		q, args := batchStatement(b)
		var err error
		if conn != nil {
			_, err = conn.ExecContext(ctx, q, args...)
		} else {
			_, err = db.Exec(ctx, q, args...)
		}
		return err
	}
	return db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if err := db.insertRows(ctx, &b.Replay); err != nil {
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
	args := make([]any, 0, len(b.Replay.Args)+len(b.Copies)*copyWidth+len(b.Done)+1)
	sb.WriteString(batchWith)
	if n := b.Replay.rows(); n > 0 {
		sb.WriteString(batchReplayCTE + b.Replay.Head)
		for i := range n {
			if i > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(placeholders(len(args), b.Replay.Width))
			args = append(args, b.Replay.Args[i*b.Replay.Width:(i+1)*b.Replay.Width]...)
		}
		sb.WriteString(b.Replay.Tail + batchCTEEnd)
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

// insertRows writes a RowInsert in statements of up to 500 rows.
func (db *Database) insertRows(ctx context.Context, ri *RowInsert) error {
	const chunk = 500
	n := ri.rows()
	for start := 0; start < n; start += chunk {
		end := min(start+chunk, n)
		var sb strings.Builder
		sb.WriteString(ri.Head)
		for i := start; i < end; i++ {
			if i > start {
				sb.WriteByte(',')
			}
			sb.WriteString(placeholders((i-start)*ri.Width, ri.Width))
		}
		sb.WriteString(ri.Tail)
		if _, err := db.Exec(ctx, sb.String(), ri.Args[start*ri.Width:end*ri.Width]...); err != nil {
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
