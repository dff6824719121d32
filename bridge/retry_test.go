package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
	"go.ferry.im/ferry/internal/faultproxy"
)

// flakyHS stands in front of the fake homeserver and answers the first sends into one room with scripted
// errors, recording when each send arrived (ferry's barriers pass through).
type flakyHS struct {
	proxy  *httputil.ReverseProxy
	room   id.RoomID
	script []func(w http.ResponseWriter, r *http.Request) // consumed one per send into room
	// guards the following fields
	lock  sync.Mutex
	sends []time.Time
	held  func() // a send the homeserver accepted and posts before the next send into room (see holdNextSend)
	// refuseBarriers answers ferry's barriers with 403 (the bot lacks the power to send in room)
	refuseBarriers bool
	// failBarriers answers this many of ferry's next barriers with 502 (a flaky path)
	failBarriers int
}

func (f *flakyHS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/rooms/"+string(f.room)+"/send/") {
		f.lock.Lock()
		held := f.held
		f.held = nil
		if held != nil {
			held()
		}
		if strings.Contains(r.URL.Path, "/send/"+barrierType.Type+"/") {
			// ferry's barrier before a read-back: not one of the sends the script is about
			refuse, fail := f.refuseBarriers, f.failBarriers > 0
			if fail {
				f.failBarriers--
			}
			f.lock.Unlock()
			if fail {
				answer(502, `{"errcode":"M_UNKNOWN","error":"Bad gateway"}`)(w, r)
				return
			}
			if refuse {
				answer(403, `{"errcode":"M_FORBIDDEN","error":"You don't have permission to post that to the room."}`)(w, r)
				return
			}
			f.proxy.ServeHTTP(w, r)
			return
		}
		f.sends = append(f.sends, time.Now())
		var step func(http.ResponseWriter, *http.Request)
		if len(f.script) > 0 {
			step, f.script = f.script[0], f.script[1:]
		}
		f.lock.Unlock()
		if step != nil {
			step(w, r)
			return
		}
	}
	f.proxy.ServeHTTP(w, r)
}

func answer(status int, body string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}
}

// relayFixture is a bridge wired to a fake homeserver (through the fault proxy, then flaky) with rooms A and B
// linked, alice in A.
type relayFixture struct {
	br           *Bridge
	hs           *fakehs.Server
	flaky        *flakyHS
	faults       *faultproxy.Proxy
	alice        id.UserID
	roomA, roomB id.RoomID
	n            int

	// guards the following fields
	pickLock sync.Mutex
	pick     func(*http.Request) bool
}

// faultOn makes the requests pick chooses meet a 502 from the fault proxy (nil: none).
func (f *relayFixture) faultOn(pick func(*http.Request) bool) {
	f.pickLock.Lock()
	f.pick = pick
	f.pickLock.Unlock()
}

func (f *relayFixture) faultPicks(r *http.Request) bool {
	f.pickLock.Lock()
	defer f.pickLock.Unlock()
	return f.pick != nil && f.pick(r)
}

func newRelayFixture(t *testing.T) *relayFixture {
	return newRelayFixtureWith(t, &benchCrypto{plaintext: benchMessage()})
}

// newRelayFixtureWith is newRelayFixture with the given E2EE layer.
func newRelayFixtureWith(t *testing.T, cr Crypto) *relayFixture {
	return newRelayFixtureOn(t, cr, dbtest.Postgres(t))
}

// newRelayFixtureOn is newRelayFixtureWith on the given database; opts adjust the fake homeserver.
func newRelayFixtureOn(t *testing.T, cr Crypto, root *dbutil.Database, opts ...func(*fakehs.Options)) *relayFixture {
	ctx := context.Background()
	const domain = "ferry.test"
	o := fakehs.Options{
		Domain: domain, ASID: "ferry", ASToken: "as", HSToken: benchHSToken, ASBotLocalpart: "ferrybot",
		ASUsers: regexp.MustCompile(`^@_ferry_.*:ferry\.test$`), NoEcho: true, KeepTimeline: true,
	}
	for _, opt := range opts {
		opt(&o)
	}
	hs := fakehs.New(o)
	t.Cleanup(hs.Close)
	target, _ := url.Parse(hs.URL)
	flaky := &flakyHS{proxy: httputil.NewSingleHostReverseProxy(target)}
	flakyFront := httptest.NewServer(flaky)
	t.Cleanup(flakyFront.Close)
	f := &relayFixture{hs: hs, flaky: flaky, alice: "@alice:" + domain}
	// The fault proxy of the test kit stands in front: requests that f.faultOn picks meet its fault.
	faults, err := faultproxy.New(faultproxy.Config{Name: "ferry→homeserver", Target: flakyFront.URL, Rate: 1,
		Mix: map[faultproxy.Kind]int{faultproxy.Status502: 1}, Eligible: f.faultPicks})
	if err != nil {
		t.Fatal(err)
	}
	front := httptest.NewServer(faults)
	t.Cleanup(front.Close)
	f.faults = faults
	br := newBenchBridgeOn(t, cr, front.URL, root)
	f.br = br
	bob, bot := id.UserID("@bob:"+domain), br.AS.BotMXID()
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	f.roomA = hs.CreateRoom(f.alice, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{bot}})
	f.roomB = hs.CreateRoom(bob, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{bot}})
	for room, user := range map[id.RoomID]id.UserID{f.roomA: f.alice, f.roomB: bob} {
		for _, u := range []id.UserID{user, bot} {
			if err := br.StateStore.SetMembership(ctx, room, u, event.MembershipJoin); err != nil {
				t.Fatal(err)
			}
		}
		if err := br.StateStore.SetEncryptionEvent(ctx, room, enc); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := br.DB.Links.Join(ctx, "retry", f.roomA, f.roomB, f.alice, time.Now()); err != nil {
		t.Fatal(err)
	}
	flaky.room = f.roomB
	return f
}

// relayOne records one message from alice in A and runs it through the room worker's row handling.
func (f *relayFixture) relayOne(t *testing.T) *database.InboxEvent {
	ctx := context.Background()
	f.n++
	evtID := id.EventID(fmt.Sprintf("$retry%d", f.n))
	raw, _ := json.Marshal(map[string]any{
		"event_id": evtID, "room_id": f.roomA, "sender": f.alice, "type": "m.room.encrypted", "origin_server_ts": 1,
		"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
	})
	row := &database.InboxEvent{EventID: evtID, RoomID: f.roomA, Sender: f.alice, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
	if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
		t.Fatal(err)
	}
	rows, err := f.br.DB.Inbox.NextInRoom(ctx, f.roomA, workerBatch)
	if err != nil || len(rows) != 1 {
		t.Fatalf("inbox: %d rows, %v", len(rows), err)
	}
	bw := &batchWrites{}
	if !f.br.processRow(ctx, rows[0], bw) || !f.br.commitBatch(ctx, bw) {
		t.Fatal("the worker gave up")
	}
	cur, err := f.br.DB.Inbox.Get(ctx, evtID)
	if err != nil || cur == nil {
		t.Fatalf("inbox row vanished: %v", err)
	}
	return cur
}

// copiesIn counts events in room sent by someone other than the bot.
func (f *relayFixture) copiesIn(room id.RoomID, from id.UserID) int {
	n := 0
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			Type   string    `json:"type"`
			Sender id.UserID `json:"sender"`
		}
		_ = json.Unmarshal(raw, &e)
		if e.Type == "m.room.encrypted" && e.Sender == from {
			n++
		}
	}
	return n
}

// TestRelayRetriesRateLimitsAndServerErrors: a homeserver that rate-limits and then fails with a 502 still gets
// exactly one copy, and ferry waits at least as long as retry_after_ms asked before trying again (4.5 s: longer
// than the 4 s first backoff of mautrix's own client retries, which read only the Retry-After header).
func TestRelayRetriesRateLimitsAndServerErrors(t *testing.T) {
	f := newRelayFixture(t)
	f.relayOne(t) // the ghost registers, joins and sets its profile once
	f.flaky.lock.Lock()
	f.flaky.sends = nil
	f.flaky.script = []func(http.ResponseWriter, *http.Request){
		answer(429, `{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":4500}`),
		answer(502, `<html>bad gateway</html>`),
	}
	f.flaky.lock.Unlock()

	row := f.relayOne(t)
	if row.State != database.InboxDone {
		t.Fatalf("inbox state %q, want done", row.State)
	}
	f.flaky.lock.Lock()
	sends := f.flaky.sends
	f.flaky.lock.Unlock()
	if len(sends) != 3 {
		t.Fatalf("%d send attempts, want 3 (429, 502, success)", len(sends))
	}
	if gap := sends[1].Sub(sends[0]); gap < 4500*time.Millisecond {
		t.Fatalf("retried %v after M_LIMIT_EXCEEDED, the server asked for 4.5 s", gap)
	}
	ghost := f.br.Ghosts.Ghost(f.alice)
	if got := f.copiesIn(f.roomB, ghost); got != 2 {
		t.Fatalf("room B holds %d copies for 2 messages", got)
	}
	if c, err := f.br.DB.EventMap.Get(context.Background(), row.EventID, f.roomB); err != nil || c == nil {
		t.Fatalf("the copy is not in the event map: %v", err)
	}
}

// TestRelayPermanentErrorIsReportedOnce: a 403 is not retried (the event is finished, so it never blocks the
// room), no copy is recorded, and the source room gets exactly one notice from the bot, replying to the message,
// and one FAIL_PERMANENT status.
func TestRelayPermanentErrorIsReportedOnce(t *testing.T) {
	f := newRelayFixtureWith(t, newScriptedCrypto())
	f.relayOne(t)
	f.flaky.lock.Lock()
	f.flaky.sends = nil
	f.flaky.script = []func(http.ResponseWriter, *http.Request){answer(403, `{"errcode":"M_FORBIDDEN","error":"no"}`)}
	f.flaky.lock.Unlock()

	row := f.relayOne(t)
	if row.State != database.InboxDone {
		t.Fatalf("inbox state %q, want done (reported, not retried)", row.State)
	}
	if c, err := f.br.DB.EventMap.Get(context.Background(), row.EventID, f.roomB); err != nil || c != nil {
		t.Fatalf("a copy that was refused is in the event map: %+v, %v", c, err)
	}
	f.flaky.lock.Lock()
	attempts := len(f.flaky.sends)
	f.flaky.lock.Unlock()
	if attempts != 1 {
		t.Fatalf("%d send attempts for a 403, want 1", attempts)
	}
	if got := f.notices(t, f.roomA); len(got) != 1 || !strings.Contains(got[0], "could not relay this message") {
		t.Fatalf("the source room got notices %q from the bot, want 1", got)
	}
	if got := f.statuses(t, f.roomA); len(got) != 1 || got[0].status != event.MessageStatusFail || got[0].reason != event.MessageStatusNoPermission || got[0].about != row.EventID {
		t.Fatalf("statuses = %+v, want one FAIL_PERMANENT for the message", got)
	}
	if v, _ := f.br.DB.KV.Get(context.Background(), deliveryKey(row.EventID)); v != "" {
		t.Fatalf("a permanent failure is still remembered: %q", v)
	}
}
