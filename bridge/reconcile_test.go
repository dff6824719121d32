package bridge

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
	"go.ferry.im/ferry/internal/faultproxy"
)

// sealCrypto stands in for the E2EE layer where a test must read back what ferry sent: its "ciphertext" carries
// the content, and DecryptOwn reads it.
type sealCrypto struct{ benchCrypto }

func (c *sealCrypto) Encrypt(_ context.Context, _ id.UserID, _ id.RoomID, _ event.Type, content *event.Content) (*event.EncryptedEventContent, error) {
	data, err := json.Marshal(content)
	if err != nil {
		return nil, err
	}
	return &event.EncryptedEventContent{
		Algorithm: id.AlgorithmMegolmV1, MegolmCiphertext: []byte(base64.RawStdEncoding.EncodeToString(data)),
		SessionID: id.SessionID(strings.Repeat("S", 43)), SenderKey: id.SenderKey(strings.Repeat("K", 43)), DeviceID: "SEAL",
	}, nil
}

func (c *sealCrypto) DecryptOwn(_ context.Context, evt *event.Event) (*event.Event, error) {
	enc, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return nil, errors.New("not encrypted")
	}
	data, err := base64.RawStdEncoding.DecodeString(string(enc.MegolmCiphertext))
	if err != nil {
		return nil, err
	}
	dec := &event.Event{ID: evt.ID, RoomID: evt.RoomID, Sender: evt.Sender, Type: event.EventMessage, Timestamp: evt.Timestamp}
	if err = json.Unmarshal(data, &dec.Content); err != nil {
		return nil, err
	}
	return dec, nil
}

// size counts the events the ledger holds.
func (l *sentLedger) size() int {
	l.lock.Lock()
	defer l.lock.Unlock()
	return len(l.byTxn)
}

// readBackFresh reads room back from since as a first read-back (no progress of an earlier one), without the
// room being marked: progress is not kept.
func (b *Bridge) readBackFresh(ctx context.Context, room id.RoomID, since time.Time) (found, read int, complete bool, err error) {
	res, err := b.readBack(ctx, room, since, newProgress(since), time.Now())
	return res.found, res.read, res.complete, err
}

// ghostEvents lists the IDs of the encrypted events from sender in room, oldest first.
func (f *relayFixture) ghostEvents(room id.RoomID, sender id.UserID) []id.EventID {
	var out []id.EventID
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			ID     id.EventID `json:"event_id"`
			Type   string     `json:"type"`
			Sender id.UserID  `json:"sender"`
		}
		_ = json.Unmarshal(raw, &e)
		if e.Type == "m.room.encrypted" && e.Sender == sender {
			out = append(out, e.ID)
		}
	}
	return out
}

// loseNextSend makes the next send into room B reach the homeserver under another transaction ID (so the
// homeserver will not recognise a repeat, as Dendrite does not for a request cut off before it answered) and
// drops the connection before ferry reads the answer. then runs after the homeserver posted the event.
func (f *relayFixture) loseNextSend(then func()) {
	f.failNextSend(then, nil)
}

// failNextSend is loseNextSend, but answers with reply (when not nil) instead of dropping the connection.
func (f *relayFixture) failNextSend(then func(), reply func(http.ResponseWriter, *http.Request)) {
	f.flaky.lock.Lock()
	defer f.flaky.lock.Unlock()
	f.flaky.script = []func(http.ResponseWriter, *http.Request){func(w http.ResponseWriter, r *http.Request) {
		r.URL.Path += "-forgotten"
		r.URL.RawPath = ""
		f.flaky.proxy.ServeHTTP(httptest.NewRecorder(), r)
		if then != nil {
			then()
		}
		if reply != nil {
			reply(w, r)
			return
		}
		if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
			_ = conn.Close()
		}
	}}
}

// TestUnansweredSendIsNotRepeated: a copy whose send reached the homeserver but got no answer is found in the
// target room before the retry, and recorded instead of being posted a second time. A 500 (Dendrite's answer when it stopped waiting for its room server, which may still post the event) is
// treated the same way.
func TestUnansweredSendIsNotRepeated(t *testing.T) {
	for name, reply := range map[string]func(http.ResponseWriter, *http.Request){
		"dropped":                 nil,
		"500":                     answer(500, `{"errcode":"M_UNKNOWN","error":"Internal Server Error"}`),
		"dropped/barrier refused": nil, // the bot may not post in room B: the read-back goes on without a barrier
	} {
		t.Run(name, func(t *testing.T) {
			f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
			f.flaky.refuseBarriers = strings.HasSuffix(name, "barrier refused")
			f.relayOne(t) // the ghost registers, joins and sets its profile once
			ghost := f.br.Ghosts.Ghost(f.alice)
			f.failNextSend(nil, reply)
			f.expectSecondCopyOnce(t, f.relayOne(t), ghost, "the unanswered copy")
		})
	}
}

// holdNextSend answers the next send into room B with reply and queues it at the homeserver, under another
// transaction ID, as Dendrite queues an event for its room server before it answers: the homeserver posts it only
// just before the next send into room B, whenever that comes (Dendrite's room server takes a room's events in
// order). then runs once it is posted.
func (f *relayFixture) holdNextSend(reply func(http.ResponseWriter, *http.Request), then func()) {
	f.flaky.lock.Lock()
	defer f.flaky.lock.Unlock()
	f.flaky.script = []func(http.ResponseWriter, *http.Request){func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		late := r.Clone(context.Background())
		late.URL.Path += "-forgotten"
		late.URL.RawPath = ""
		f.flaky.lock.Lock()
		f.flaky.held = func() {
			late.Body = io.NopCloser(bytes.NewReader(body))
			f.flaky.proxy.ServeHTTP(httptest.NewRecorder(), late)
			then()
		}
		f.flaky.lock.Unlock()
		reply(w, r)
	}}
}

// TestSendQueuedBeforeAnErrorIsNotRepeated: the homeserver answers a copy's send with a 500 but has queued the
// event, and posts it only once its room server gets to it, after any read-back ferry could make at once
// (Dendrite under load: a plain 500, or an answer cut off, while its room server works through a backlog). ferry
// puts a barrier of its own into the room's queue before it reads the room back, so it finds the queued copy
// and does not post it again.
func TestSendQueuedBeforeAnErrorIsNotRepeated(t *testing.T) {
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	ghost := f.br.Ghosts.Ghost(f.alice)
	var posted atomic.Bool
	f.holdNextSend(answer(500, "Internal Server Error"), func() { posted.Store(true) })
	row := f.relayOne(t)
	if !posted.Load() {
		t.Fatal("the queued copy was never posted")
	}
	f.expectSecondCopyOnce(t, row, ghost, "the queued copy")
}

// expectSecondCopyOnce checks that row (the second message relayed) is done, that room B holds two of ghost's
// copies (what, the second one, was not posted again) and that the event map records what for row.
func (f *relayFixture) expectSecondCopyOnce(t *testing.T, row *database.InboxEvent, ghost id.UserID, what string) {
	t.Helper()
	if row.State != database.InboxDone {
		t.Fatalf("inbox state %q, want done", row.State)
	}
	sent := f.ghostEvents(f.roomB, ghost)
	if len(sent) != 2 {
		t.Fatalf("room B holds %d copies for 2 messages: %s was posted again", len(sent), what)
	}
	if c, err := f.br.DB.EventMap.Get(context.Background(), row.EventID, f.roomB); err != nil || c == nil || c.TargetEvent != sent[1] {
		t.Fatalf("the event map holds %+v (%v), want %s %s", c, err, what, sent[1])
	}
}

// TestBarrierFailureIsRetriedInPlace: the barrier before a read-back is one request among the read-back's many; a
// transient failure of it is retried there, like a failed page, instead of failing the whole attempt. Before, each
// such failure sent the event back to wait with its backoff while the room's history (the read-back's window)
// grew; under faults and frequent restarts a room's read-back then stayed behind for minutes, until its window
// went beyond what a read-back reads and a copy was posted twice (1 of 10,000 in a chaos run on Dendrite).
func TestBarrierFailureIsRetriedInPlace(t *testing.T) {
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t) // the ghost registers, joins and sets its profile once
	ghost := f.br.Ghosts.Ghost(f.alice)
	f.failNextSend(nil, nil) // no answer: the retry reads room B back first
	f.flaky.lock.Lock()
	f.flaky.failBarriers = 2
	f.flaky.lock.Unlock()
	row := f.relayOne(t)
	f.expectSecondCopyOnce(t, row, ghost, "the unanswered copy")
	if row.Attempts != 1 {
		t.Errorf("the event took %d retries, want 1 (the unanswered send's): the barrier's failures each cost a retry", row.Attempts)
	}
}

// waitDone waits until the inbox row of evtID is done, failing the test at deadline.
func (f *relayFixture) waitDone(t *testing.T, evtID id.EventID, deadline time.Time) {
	t.Helper()
	for {
		row, err := f.br.DB.Inbox.Get(context.Background(), evtID)
		if err != nil {
			t.Fatal(err)
		}
		if row.State == database.InboxDone {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still %s (%s)", evtID, row.State, row.LastError)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stopWithSendInFlight runs one message of alice's through the worker and stops the worker while its copy's
// send is in flight: the homeserver posts the copy (under another transaction ID, as a homeserver that forgot
// it) and ferry never hears the answer. With clean, the stop is a clean one (the relay marks itself stopped);
// otherwise ferry died. The memory of the run that stopped is gone. It returns the message and the copy posted.
func (f *relayFixture) stopWithSendInFlight(t *testing.T, clean bool) (id.EventID, id.EventID) {
	t.Helper()
	ctx := context.Background()
	ghost := f.br.Ghosts.Ghost(f.alice)
	if _, _, err := f.br.markRunning(ctx); err != nil {
		t.Fatal(err)
	}
	crash, die := context.WithCancel(ctx)
	f.loseNextSend(die)
	evtID := f.dieRelaying(t, crash)
	if clean {
		f.br.markStopped()
	}
	sent := f.ghostEvents(f.roomB, ghost)
	if len(sent) != 2 {
		t.Fatalf("room B holds %d copies, want 2 (the second posted without ferry knowing)", len(sent))
	}
	f.br.sent = sentLedger{}
	return evtID, sent[1]
}

// dieRelaying runs one new message of alice's through the worker with crash, which the test ends during the
// copy's send; the worker must stop there. It returns the message.
func (f *relayFixture) dieRelaying(t *testing.T, crash context.Context) id.EventID {
	t.Helper()
	ctx := context.Background()
	evtID := id.EventID(fmt.Sprintf("$inflight%d", f.n))
	f.n++
	raw, _ := json.Marshal(map[string]any{
		"event_id": evtID, "room_id": f.roomA, "sender": f.alice, "type": "m.room.encrypted", "origin_server_ts": 1,
		"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
	})
	if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{{EventID: evtID, RoomID: f.roomA, Sender: f.alice, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	rows, err := f.br.DB.Inbox.NextInRoom(ctx, f.roomA, workerBatch)
	if err != nil || len(rows) != 1 {
		t.Fatalf("inbox: %d rows, %v", len(rows), err)
	}
	bw := &batchWrites{}
	if f.br.processRow(crash, rows[0], bw) {
		t.Fatal("the worker went on after its context ended")
	}
	return evtID
}

// restartAndExpectOneCopy starts the relay again, waits until the message is done and checks that room B holds
// the copy posted before the stop, recorded in the event map, and no second one.
func (f *relayFixture) restartAndExpectOneCopy(t *testing.T, evtID, posted id.EventID) {
	t.Helper()
	ctx := context.Background()
	if err := f.br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	f.waitDone(t, evtID, time.Now().Add(20*time.Second))
	f.br.Stop()
	if got := f.ghostEvents(f.roomB, f.br.Ghosts.Ghost(f.alice)); len(got) != 2 {
		t.Fatalf("room B holds %d copies after the restart, want 2: the copy sent before the stop was posted again", len(got))
	}
	if c, err := f.br.DB.EventMap.Get(ctx, evtID, f.roomB); err != nil || c == nil || c.TargetEvent != posted {
		t.Fatalf("the event map holds %+v (%v), want the copy sent before the stop, %s", c, err, posted)
	}
	if v, _ := f.br.DB.KV.Get(ctx, runningKey); v != "no" {
		t.Fatalf("after Stop the running marker is %q, want no", v)
	}
}

// TestSendInFlightAtCrashIsNotRepeated: ferry dies while a copy's send is in flight; the homeserver posted it.
// At the next start (the running marker tells it was unclean) ferry reads back the target room and records that
// copy instead of posting it again. A clean stop leaves the marker at "no".
func TestSendInFlightAtCrashIsNotRepeated(t *testing.T) {
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	evtID, posted := f.stopWithSendInFlight(t, false)
	f.restartAndExpectOneCopy(t, evtID, posted)
}

// TestSendLeftOnTheWayIsNotRepeated: ferry dies while a copy's send is still on its way to the homeserver (a
// proxy in front of it holds the request: a slow answer), and the homeserver gets it only after the next run has
// started. That run's read-back must not look before what the dead run left on the way has arrived: it finds the
// late copy and does not post a second one. (1 of 10,000 posted twice in a chaos run on Dendrite, where the next
// run started within the second and read the room back before the held send arrived.)
func TestSendLeftOnTheWayIsNotRepeated(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	ghost := f.br.Ghosts.Ghost(f.alice)
	if _, _, err := f.br.markRunning(ctx); err != nil {
		t.Fatal(err)
	}
	crash, die := context.WithCancel(ctx)
	posted := make(chan struct{})
	f.flaky.lock.Lock()
	f.flaky.script = []func(http.ResponseWriter, *http.Request){func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		late := r.Clone(context.Background())
		late.URL.Path += "-forgotten" // Dendrite forgets the transaction IDs of requests it never answered
		late.URL.RawPath = ""
		die()
		if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
			_ = conn.Close()
		}
		go func() {
			time.Sleep(1500 * time.Millisecond) // the chaos test's proxy holds a slow request up to 1.5 s
			late.Body = io.NopCloser(bytes.NewReader(body))
			f.flaky.proxy.ServeHTTP(httptest.NewRecorder(), late)
			close(posted)
		}()
	}}
	f.flaky.lock.Unlock()
	evtID := f.dieRelaying(t, crash)
	f.br.sent = sentLedger{}
	if err := f.br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	f.waitDone(t, evtID, time.Now().Add(20*time.Second))
	<-posted
	f.br.Stop()
	sent := f.ghostEvents(f.roomB, ghost)
	if len(sent) != 2 {
		t.Fatalf("room B holds %d copies for 2 messages: the copy the dead run left on the way was posted again", len(sent))
	}
	if c, err := f.br.DB.EventMap.Get(ctx, evtID, f.roomB); err != nil || c == nil || c.TargetEvent != sent[1] {
		t.Fatalf("the event map holds %+v (%v), want the late copy %s", c, err, sent[1])
	}
}

// TestReadBackRetriesServerErrors: the read-back after an unclean stop meets server errors (the homeserver is
// restarting, a gateway in front of it fails); it retries them with backoff instead of giving up on the room
// and posting its sends again.
func TestReadBackRetriesServerErrors(t *testing.T) {
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	evtID, posted := f.stopWithSendInFlight(t, false)
	var reads atomic.Int32
	f.faultOn(func(r *http.Request) bool { return strings.HasSuffix(r.URL.Path, "/messages") && reads.Add(1) <= 3 })
	f.restartAndExpectOneCopy(t, evtID, posted)
	if n := f.faults.Tallies().Faults[faultproxy.Status502]; n != 3 {
		t.Fatalf("the read-back met %d server errors, want 3", n)
	}
}

// TestUncertainSendSurvivesCleanStop: ferry is stopped cleanly while a send whose answer is lost is in flight.
// That the send is uncertain is recorded durably: after the clean start ferry reads the room back before the
// retry, and records the copy posted instead of posting a second one.
func TestUncertainSendSurvivesCleanStop(t *testing.T) {
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	evtID, posted := f.stopWithSendInFlight(t, true)
	f.restartAndExpectOneCopy(t, evtID, posted)
}

// TestNoticeIsReadBack: the bot's notices (command replies included) carry their transaction ID, so the
// read-back after an unclean stop finds them; relayed copies are found by their origin marker; events from
// other users and events older than the pending work are not taken.
func TestNoticeIsReadBack(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	row := f.relayOne(t)
	notice, err := f.br.sendRenderedNotice(ctx, f.roomA, renderNotice("a reply"), row.EventID, "ferry_reply_readback")
	if err != nil {
		t.Fatal(err)
	}
	if n, _, complete, err := f.br.readBackFresh(ctx, f.roomA, time.Now().Add(-time.Minute)); err != nil || n != 1 || !complete {
		t.Fatalf("read back %d events in room A (%v), want the notice", n, err)
	}
	if got, ok := f.br.sent.take(f.roomA, "ferry_reply_readback"); !ok || got != notice {
		t.Fatalf("the ledger has %q for the notice's transaction, want %s", got, notice)
	}
	if n, _, complete, err := f.br.readBackFresh(ctx, f.roomB, time.Now().Add(-time.Minute)); err != nil || n != 1 || !complete {
		t.Fatalf("read back %d events in room B (%v), want the copy", n, err)
	}
	copyEvt, _ := f.br.DB.EventMap.Get(ctx, row.EventID, f.roomB)
	if got, ok := f.br.sent.take(f.roomB, TxnID(row.EventID, f.roomB)); !ok || copyEvt == nil || got != copyEvt.TargetEvent {
		t.Fatalf("the ledger has %q for the copy, want %+v", got, copyEvt)
	}
	// Nothing older than the pending work is looked at.
	if n, _, _, err := f.br.readBackFresh(ctx, f.roomB, time.Now().Add(time.Minute)); err != nil || n != 0 || f.br.sent.size() != 0 {
		t.Fatalf("read back %d events older than the cut-off (%v)", n, err)
	}
}

// TestLedgerIsPerRoom: what the read-back found in one room never stands for a send into another.
func TestLedgerIsPerRoom(t *testing.T) {
	var l sentLedger
	l.put("!a:x", "ferry_txn", "$inA")
	if _, ok := l.take("!b:x", "ferry_txn"); ok {
		t.Fatal("an event found in room A was taken for a send into room B")
	}
	if got, ok := l.take("!a:x", "ferry_txn"); !ok || got != "$inA" {
		t.Fatalf("take in room A = %q, %t", got, ok)
	}
	l.mark("!a:x", time.Now(), time.Now())
	if _, _, ok := l.pending("!b:x"); ok {
		t.Fatal("an unanswered send into room A made room B need reading back")
	}
	if _, _, ok := l.pending("!a:x"); !ok {
		t.Fatal("the unanswered send into room A was forgotten")
	}
}

// TestUserMarkersAreNotTrusted: a user's message carrying ferry's transaction marker (naming a send ferry is
// about to make) and a forged origin marker is relayed, its copy carries neither, and the read-back of the copy's
// room finds only the copy under its own transaction ID.
func TestUserMarkersAreNotTrusted(t *testing.T) {
	ctx := context.Background()
	forged := benchMessage()
	forged.Content = event.Content{Raw: map[string]any{
		"msgtype": "m.text", "body": "hi", txnKey: "ferry_reply_victim", "im.ferry.other": true,
		OriginKey: map[string]any{"event_id": "$victim", "room_id": "!elsewhere:x", "instance": "ferry@ferry.test"},
	}}
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: forged}})
	row := f.relayOne(t)
	copyEvt, _ := f.br.DB.EventMap.Get(ctx, row.EventID, f.roomB)
	if copyEvt == nil {
		t.Fatal("a message carrying ferry's markers was not relayed")
	}
	if n, _, complete, err := f.br.readBackFresh(ctx, f.roomB, time.Now().Add(-time.Minute)); err != nil || n != 1 || !complete {
		t.Fatalf("read back %d events in room B (%v), want the copy", n, err)
	}
	if _, ok := f.br.sent.take(f.roomB, "ferry_reply_victim"); ok {
		t.Fatal("the user's forged transaction marker was taken for ferry's own send")
	}
	if got, ok := f.br.sent.take(f.roomB, TxnID(row.EventID, f.roomB)); !ok || got != copyEvt.TargetEvent {
		t.Fatalf("the copy was read back as %q, %t", got, ok)
	}
}

// TestSendDuringHomeserverRestartIsNotRepeated: the homeserver goes away (every request fails for a while) with
// a copy's send in flight, and posts that copy only some time after it answers again (a restarting homeserver
// working through what it had accepted; it forgot the transaction ID). ferry treats the outage like its own
// crash: its read-back waits until the homeserver has settled, finds the late copy and does not post a second.
func TestSendDuringHomeserverRestartIsNotRepeated(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	ghost := f.br.Ghosts.Ghost(f.alice)
	var down atomic.Bool
	f.faultOn(func(*http.Request) bool { return down.Load() })
	posted := make(chan struct{})
	f.flaky.lock.Lock()
	f.flaky.script = []func(http.ResponseWriter, *http.Request){func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		late := r.Clone(context.Background())
		late.URL.Path += "-forgotten"
		late.URL.RawPath = ""
		down.Store(true)
		answer(502, `{"errcode":"M_UNKNOWN","error":"going away"}`)(w, r)
		go func() {
			time.Sleep(1500 * time.Millisecond)
			down.Store(false)
			time.Sleep(2 * time.Second)
			late.Body = io.NopCloser(bytes.NewReader(body))
			f.flaky.proxy.ServeHTTP(httptest.NewRecorder(), late)
			close(posted)
		}()
	}}
	f.flaky.lock.Unlock()
	row := f.relayOne(t)
	<-posted
	if row.State != database.InboxDone {
		t.Fatalf("inbox state %q, want done", row.State)
	}
	sent := f.ghostEvents(f.roomB, ghost)
	if len(sent) != 2 {
		t.Fatalf("room B holds %d copies for 2 messages: the copy posted after the restart was posted again", len(sent))
	}
	if c, err := f.br.DB.EventMap.Get(ctx, row.EventID, f.roomB); err != nil || c == nil || c.TargetEvent != sent[1] {
		t.Fatalf("the event map holds %+v (%v), want the late copy %s", c, err, sent[1])
	}
}

// TestReadBackFindsWhatPaginationSkips: the homeserver's backward /messages skips an event at a page boundary (as
// Dendrite 0.13.8 does inside a group of concurrent events), and the copy ferry posted before it died is exactly
// there; the read-back still finds it and does not post it again.
func TestReadBackFindsWhatPaginationSkips(t *testing.T) {
	f := newRelayFixtureOn(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}}, dbtest.Postgres(t),
		func(o *fakehs.Options) { o.MessagesSkipAtPageEnd = true })
	f.relayOne(t)
	evtID, posted := f.stopWithSendInFlight(t, false)
	// A page of other events follows the copy, so that a first page of the read-back ends right before it.
	bob := id.UserID("@bob:ferry.test")
	for i := range reconcilePage {
		if err := f.hs.SetState(f.roomB, bob, "im.ferry.test.filler", fmt.Sprint(i), map[string]any{}); err != nil {
			t.Fatal(err)
		}
	}
	f.restartAndExpectOneCopy(t, evtID, posted)
}

// TestReadBackReachesBackToTheDeadRun: after an unclean stop, a room whose oldest pending event came long ago is
// read back only from when the run that died started (no send of it can be older), not from that event: with a
// backlog of hours, the read-back would otherwise stop at its page limit before it reached what that run sent.
func TestReadBackReachesBackToTheDeadRun(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	raw := encryptedEvent("$old", f.roomA, f.alice)
	old := &database.InboxEvent{EventID: "$old", RoomID: f.roomA, Sender: f.alice, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now().Add(-time.Hour)}
	if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{old}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.br.markRunning(ctx); err != nil { // the run that dies
		t.Fatal(err)
	}
	died := time.Now()
	if _, err := f.br.markInFlight(ctx, time.Time{}); err != nil {
		t.Fatal(err)
	}
	f.br.sent = sentLedger{}
	if _, err := f.br.DB.Exec(ctx, `DELETE FROM readback`); err != nil {
		t.Fatal(err)
	}
	unclean, prevStart, err := f.br.markRunning(ctx) // the next start
	if err != nil || !unclean {
		t.Fatalf("unclean %v, %v", unclean, err)
	}
	if _, err = f.br.markInFlight(ctx, prevStart); err != nil {
		t.Fatal(err)
	}
	since, _, ok := f.br.sent.pending(f.roomB)
	if !ok {
		t.Fatal("room B is not marked for reading back")
	}
	if earliest := died.Add(-time.Second - f.br.health.clockLag()); since.Before(earliest) {
		t.Fatalf("room B is read back from %v, before the run that died started (%v)", since, died)
	}
}

// TestReadBackGoesOnWhereItStopped: ferry dies with a copy's send in flight (the homeserver posted it), and then
// keeps dying while it reads the target room back, each run getting through 10 pages, while the room's history
// grows. Each run goes on where the last one stopped (after reading what came since), so the read-back gets
// through, finds the copy and ferry does not post it again. A read-back that starts over from the newest event
// each time never gets through, and the window it must cover grows until it is more than a read-back reads (1 of
// 10,000 posted twice in a chaos run on Dendrite).
func TestReadBackGoesOnWhereItStopped(t *testing.T) {
	f, more, evtID, posted := newReadBackRunsFixture(t)
	more(20 * reconcilePage) // 20 + 23 + 33 pages for the three passes
	// Runs of 10 pages; the room goes on meanwhile, 30 events between two runs.
	t.Logf("read back in %d runs", f.readBackInRuns(t, more, 30, 10, 25, evtID, posted))
	f.br.sent = sentLedger{}
	f.restartAndExpectOneCopy(t, evtID, posted)
}

// TestReadBackKeepsUpWithABusyRoom: ferry keeps dying while it reads back a room that gets more events between
// two runs than a run reads from the newest event in one go. What a pass has read from the newest event is kept
// as well, so the read-back still gets through.
func TestReadBackKeepsUpWithABusyRoom(t *testing.T) {
	f, more, evtID, posted := newReadBackRunsFixture(t)
	more(10 * reconcilePage)
	// 6 + 7 + 10 pages for the three passes between two runs
	t.Logf("read back in %d runs", f.readBackInRuns(t, more, 6*reconcilePage, 35, 30, evtID, posted))
}

// readBackInRuns starts runs that die at their read-back's page after pagesPerRun (crashingRun), each after grow
// more events in room B, until one gets through, failing the test after maxRuns; it checks that the read-back
// found the copy posted before the crash, and returns how many runs it took.
func (f *relayFixture) readBackInRuns(t *testing.T, more func(int), grow, pagesPerRun, maxRuns int, evtID, posted id.EventID) int {
	t.Helper()
	for runs := 1; ; runs++ {
		if runs > maxRuns {
			t.Fatalf("the read-back did not get through in %d runs of %d pages each", maxRuns, pagesPerRun)
		}
		more(grow)
		if f.crashingRun(t, pagesOver(pagesPerRun)) == nil {
			if got, ok := f.br.sent.take(f.roomB, TxnID(evtID, f.roomB)); !ok || got != posted {
				t.Fatalf("the read-back found %q, want the copy posted before the crash, %s", got, posted)
			}
			return runs
		}
	}
}

// pagesOver picks, for crashingRun, the read-back's page after the first limit (the look for the barrier, 50
// events, does not count).
func pagesOver(limit int) func(*http.Request) bool {
	var pages atomic.Int32
	return func(r *http.Request) bool {
		return strings.HasSuffix(r.URL.Path, "/messages") && r.URL.Query().Get("limit") != "50" && int(pages.Add(1)) > limit
	}
}

// TestBegunPassesGoOnBeforeTheBarrier: what lies below where a read-back's passes began is in place, so a run
// goes on with them before it waits for the homeserver to settle and posts its barrier: a run that dies at its
// barrier (ferry killed every few seconds, the first seconds of each run spent waiting) still gets on.
func TestBegunPassesGoOnBeforeTheBarrier(t *testing.T) {
	ctx := context.Background()
	f, more, _, _ := newReadBackRunsFixture(t)
	more(20 * reconcilePage)
	if err := f.crashingRun(t, pagesOver(10)); err == nil {
		t.Fatal("the first run got through")
	}
	_, first, _ := f.br.sent.pending(f.roomB)
	pageLimit := pagesOver(10)
	if err := f.crashingRun(t, func(r *http.Request) bool {
		return strings.Contains(r.URL.Path, "/send/im.ferry.barrier/") || pageLimit(r)
	}); err == nil {
		t.Fatal("the second run got through")
	}
	f.br.sent = sentLedger{}
	if err := f.br.loadReadback(ctx); err != nil {
		t.Fatal(err)
	}
	_, second, _ := f.br.sent.pending(f.roomB)
	if first == nil || second == nil || second.Passes[0].Read <= first.Passes[0].Read {
		t.Fatalf("a run that died at its barrier did not go on with the pass begun before: %+v, then %+v", first, second)
	}
}

// newReadBackRunsFixture sets up a relay fixture whose ferry died with a copy's send in flight (the homeserver
// posted it), for runs that read room B back; more adds n events to room B a minute after what came before by
// the homeserver's clock, and what comes after them comes a minute later, as in a room with hours of trouble.
func newReadBackRunsFixture(t *testing.T) (f *relayFixture, more func(n int), evtID, posted id.EventID) {
	var ahead atomic.Int64
	f = newRelayFixtureOn(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}}, dbtest.Postgres(t), func(o *fakehs.Options) {
		o.Clock = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	})
	f.relayOne(t)
	evtID, posted = f.stopWithSendInFlight(t, false)
	bob := id.UserID("@bob:ferry.test")
	events := 0
	more = func(n int) {
		ahead.Add(int64(time.Minute))
		for range n {
			events++
			if err := f.hs.SetState(f.roomB, bob, "im.ferry.test.filler", fmt.Sprint(events), map[string]any{}); err != nil {
				t.Fatal(err)
			}
		}
		ahead.Add(int64(time.Minute)) // what follows (a run, its barrier) comes a minute later
	}
	return f, more, evtID, posted
}

// crashingRun starts a run after an unclean stop (what it knows is in the database) and reads room B back in it;
// the run dies at the first request that dies picks (the request fails). It returns the read-back's error.
func (f *relayFixture) crashingRun(t *testing.T, dies func(*http.Request) bool) error {
	t.Helper()
	ctx := context.Background()
	f.br.sent = sentLedger{}
	if err := f.br.loadReadback(ctx); err != nil {
		t.Fatal(err)
	}
	_, prevStart, err := f.br.markRunning(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err = f.br.markInFlight(ctx, prevStart); err != nil {
		t.Fatal(err)
	}
	run, die := context.WithCancel(ctx)
	defer die()
	f.faultOn(func(r *http.Request) bool {
		if dies(r) {
			die()
			return true
		}
		return false
	})
	defer f.faultOn(nil)
	return f.br.settle(run, f.roomB)
}

// TestReadBackStartsOverWhereItsPlaceIsRefused: the homeserver refuses the pagination token a cut-short
// read-back stopped at (as after an upgrade that changed its tokens); the next read-back reads the room again from
// its newest event instead of failing for good, and finds the copy posted before the crash.
func TestReadBackStartsOverWhereItsPlaceIsRefused(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	evtID, posted := f.stopWithSendInFlight(t, false)
	since := time.Now().Add(-time.Minute)
	f.br.markReadback(ctx, f.roomB, since)
	prog := newProgress(since)
	prog.Passes[0] = readbackPass{Ranges: []readbackRange{{From: "t-unknown", Down: since.UnixMilli()}}, Newer: time.Now().UnixMilli(), Read: 300}
	if err := f.br.saveProgress(ctx, f.roomB, prog); err != nil {
		t.Fatal(err)
	}
	f.br.sent = sentLedger{}
	if err := f.br.loadReadback(ctx); err != nil {
		t.Fatal(err)
	}
	if _, p, _ := f.br.sent.pending(f.roomB); p == nil || len(p.Passes[0].Ranges) != 1 || p.Passes[0].Ranges[0].From != "t-unknown" {
		t.Fatalf("the progress kept is %+v", p)
	}
	time.Sleep(2 * time.Millisecond) // the read-back begins after the mark (marks keep milliseconds)
	if err := f.br.settle(ctx, f.roomB); err != nil {
		t.Fatalf("the read-back failed: %v", err)
	}
	if got, ok := f.br.sent.take(f.roomB, TxnID(evtID, f.roomB)); !ok || got != posted {
		t.Fatalf("the read-back found %q, want the copy posted before the crash, %s", got, posted)
	}
}

// TestFoundSendSurvivesTheNextCrash: ferry dies with a copy's send in flight (the homeserver posted it); the next
// run's read-back finds that copy, and that run dies too before it records the relay. The run after it need not
// read back as far (no send of the run that died is older than its start), so what the read-back found must
// outlive the run that found it: the copy is recorded, not posted a third time.
func TestFoundSendSurvivesTheNextCrash(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	evtID, posted := f.stopWithSendInFlight(t, false)
	// The second run: its start marks room B, and its read-back finds the copy.
	unclean, prevStart, err := f.br.markRunning(ctx)
	if err != nil || !unclean {
		t.Fatalf("unclean %v, %v", unclean, err)
	}
	if _, err = f.br.markInFlight(ctx, prevStart); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Millisecond) // the read-back begins after the mark (marks keep milliseconds)
	if err = f.br.settle(ctx, f.roomB); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := f.br.sent.pending(f.roomB); ok {
		t.Fatal("room B is still marked after its read-back")
	}
	// It dies before it relays the message; it had started a minute later than now (long after the copy was
	// posted), so the next start reads back only from then.
	f.br.sent = sentLedger{}
	if err = f.br.DB.KV.Set(ctx, runningKey, fmt.Sprintf("yes %d", time.Now().Add(time.Minute).UnixMilli())); err != nil {
		t.Fatal(err)
	}
	f.restartAndExpectOneCopy(t, evtID, posted)
}

// TestOneReadBackOfARoomAtATime: the workers of two rooms that relay into the same room (a link of three rooms)
// both have to settle it after a crash, at the same moment. One reads it back; the other waits for that one and
// then finds the room read back: one barrier in the room, not two, and its history read once.
func TestOneReadBackOfARoomAtATime(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	evtID, posted := f.stopWithSendInFlight(t, false)
	f.br.markReadback(ctx, f.roomB, time.Now().Add(-time.Minute))
	time.Sleep(2 * time.Millisecond) // the read-back begins after the mark (marks keep milliseconds)
	var barriers, pages atomic.Int32
	f.faultOn(func(r *http.Request) bool {
		switch {
		case strings.Contains(r.URL.Path, "/send/"+barrierType.Type+"/"):
			barriers.Add(1)
		case strings.HasSuffix(r.URL.Path, "/messages"):
			pages.Add(1)
		}
		return false
	})
	defer f.faultOn(nil)
	errs := make(chan error, 2)
	for range 2 {
		go func() { errs <- f.br.settle(ctx, f.roomB) }()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("a read-back failed: %v", err)
		}
	}
	if n := barriers.Load(); n != 1 {
		t.Errorf("%d barriers posted into the room, want 1: both workers read it back (%d pages of history read)", n, pages.Load())
	}
	if got, ok := f.br.sent.take(f.roomB, TxnID(evtID, f.roomB)); !ok || got != posted {
		t.Fatalf("the read-back found %q, want the copy posted before the crash, %s", got, posted)
	}
}
