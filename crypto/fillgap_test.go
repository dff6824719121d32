package crypto

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// pager answers backward /messages of one room whose events are $e0 … $e<n-1>, one per depth. Tokens are "t<d>"
// (the events up to depth d); to is "s<k>": the previous /sync had shown $e0 … $e<k-1>.
type pager struct {
	n int
	// dendrite answers as Dendrite 0.13.8 does: past to, one event per page with an end token, to the room's
	// creation; with sinceOther (the /sync position belonged to another room) its pages in range also leave out
	// the first event after to. Otherwise as the spec says: pages stop at to, and the last has no end.
	dendrite, sinceOther bool
	requests             int
}

func (p *pager) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.requests++
	q := r.URL.Query()
	from, _ := strconv.Atoi(strings.TrimPrefix(q.Get("from"), "t"))
	k, _ := strconv.Atoi(strings.TrimPrefix(q.Get("to"), "s"))
	limit, _ := strconv.Atoi(q.Get("limit"))
	low := k - 1 // pages hold depths above low
	if p.dendrite && p.sinceOther {
		low = k
	}
	var chunk []map[string]any
	d := from
	for ; d > low && d >= 0 && len(chunk) < limit; d-- {
		chunk = append(chunk, map[string]any{"event_id": fmt.Sprintf("$e%d", d), "type": "m.room.message", "sender": "@a:x", "content": map[string]any{}})
	}
	end := ""
	switch {
	case len(chunk) > 0 && (d > low || p.dendrite):
		end = fmt.Sprintf("t%d", d)
	case len(chunk) == 0 && p.dendrite && from >= 0:
		chunk = append(chunk, map[string]any{"event_id": fmt.Sprintf("$e%d", from), "type": "m.room.message", "sender": "@a:x", "content": map[string]any{}})
		if from > 0 {
			end = fmt.Sprintf("t%d", from-1)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	body := map[string]any{"chunk": chunk, "start": q.Get("from")}
	if end != "" {
		body["end"] = end
	}
	_ = json.NewEncoder(w).Encode(body)
}

// TestFillGapStopsAtThePreviousBatch: a limited /sync timeline's gap is read from the previous batch's end to the
// timeline's start, every event once and oldest first, in a few pages: on Dendrite too, whose pages go on past
// the previous batch (the fill used to read 10 pages of one event each there, and warn every time) and can
// leave out the gap's first event.
func TestFillGapStopsAtThePreviousBatch(t *testing.T) {
	const n, k = 1000, 700 // the gap: $e700 … $e949; the timeline starts at $e950
	for _, tc := range []struct {
		name                 string
		dendrite, sinceOther bool
	}{{"spec", false, false}, {"dendrite", true, false}, {"dendrite, since in another room", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			p := &pager{n: n, dendrite: tc.dendrite, sinceOther: tc.sinceOther}
			srv := httptest.NewServer(p)
			defer srv.Close()
			cli, err := mautrix.NewClient(srv.URL, "@bot:x", "token")
			if err != nil {
				t.Fatal(err)
			}
			s := &cryptoSyncer{client: cli, log: zerolog.Nop()}
			gap, err := s.fillGap(context.Background(), "!r:x", "t949", fmt.Sprintf("s%d", k))
			if err != nil {
				t.Fatal(err)
			}
			got := gap.events
			if !gap.complete {
				t.Fatal("the fill says it is incomplete")
			}
			// Events before the gap may lead (Dendrite's page past it); the gap must follow, whole and in order.
			first := -1
			for i, evt := range got {
				if evt.ID == id.EventID(fmt.Sprintf("$e%d", k)) {
					first = i
				}
			}
			if first < 0 {
				t.Fatalf("the gap's first event is missing: %s", ids(got))
			}
			for i, evt := range got {
				want := id.EventID(fmt.Sprintf("$e%d", k-first+i))
				if evt.ID != want || evt.RoomID != "!r:x" {
					t.Fatalf("event %d is %s in %s, want %s (%s)", i, evt.ID, evt.RoomID, want, ids(got))
				}
			}
			if last := got[len(got)-1].ID; last != "$e949" {
				t.Fatalf("the fill ends at %s, want $e949", last)
			}
			if first > 2 || p.requests > 5 {
				t.Fatalf("%d requests, %d events before the gap: the fill did not stop at the previous batch", p.requests, first)
			}
			// Those before the gap are marked as read past the previous batch's end.
			for _, evt := range got[:first] {
				if !gap.edge[evt.ID] {
					t.Fatalf("%s, before the gap, is not marked as read past its start", evt.ID)
				}
			}
		})
	}
	t.Run("longer than ferry reads", func(t *testing.T) {
		p := &pager{n: 20000, dendrite: true}
		srv := httptest.NewServer(p)
		defer srv.Close()
		cli, _ := mautrix.NewClient(srv.URL, "@bot:x", "token")
		s := &cryptoSyncer{client: cli, log: zerolog.Nop()}
		gap, err := s.fillGap(context.Background(), "!r:x", "t19999", "s10")
		if err != nil {
			t.Fatal(err)
		}
		got, complete := gap.events, gap.complete
		if complete || len(got) != gapPage*gapPages || got[len(got)-1].ID != "$e19999" {
			t.Fatalf("complete %v with %d events ending at %s; want incomplete, the most recent %d", complete, len(got), got[len(got)-1].ID, gapPage*gapPages)
		}
	})
}

func ids(evts []*event.Event) string {
	var sb strings.Builder
	for _, e := range evts {
		sb.WriteString(string(e.ID))
		sb.WriteByte(' ')
	}
	return sb.String()
}
