package database

import (
	"testing"
	"time"

	"maunium.net/go/mautrix/id"
)

// TestBatchRedactionsNameEachEventOnce: the copies of one original in several rooms schedule that original once,
// with the earliest of their deadlines, besides each copy.
func TestBatchRedactionsNameEachEventOnce(t *testing.T) {
	now := time.Now()
	got := batchRedactions([]*Copy{
		{SourceEvent: "$o", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$b", Sender: "@g:x", DisappearAt: now.Add(time.Hour)},
		{SourceEvent: "$o", SourceRoom: "!a", TargetRoom: "!c", TargetEvent: "$c", Sender: "@g:x", DisappearAt: now.Add(time.Minute)},
		{SourceEvent: "$p", SourceRoom: "!a", TargetRoom: "!b", TargetEvent: "$pb", Sender: "@g:x"}, // no deadline
	})
	byEvent := map[id.EventID]*Redaction{}
	for _, r := range got {
		if byEvent[r.EventID] != nil {
			t.Fatalf("%s is scheduled twice", r.EventID)
		}
		byEvent[r.EventID] = r
	}
	if len(got) != 3 || byEvent["$b"] == nil || byEvent["$c"] == nil || byEvent["$o"] == nil {
		t.Fatalf("scheduled %v, want the two copies and their original", byEvent)
	}
	if o := byEvent["$o"]; !o.Original || !o.Deadline.Equal(now.Add(time.Minute)) {
		t.Fatalf("the original is scheduled as %+v, want the earlier deadline", o)
	}
}
