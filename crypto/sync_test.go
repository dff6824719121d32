package crypto

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// syncRewriter changes the bot's /sync answers: it shortens the long-poll, gives every answer a token of its
// own (the fake homeserver's stays the same while no to-device event arrives) and, while inject returns a
// timeline for a request's since, adds it for a room.
type syncRewriter struct {
	next   http.RoundTripper
	room   id.RoomID
	inject func(since string) map[string]any
	n      int
}

func (s *syncRewriter) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Path != "/_matrix/client/v3/sync" {
		return s.next.RoundTrip(req)
	}
	q := req.URL.Query()
	since := q.Get("since")
	real, _, _ := strings.Cut(since, "_")
	q.Set("since", real)
	q.Set("timeout", "100")
	req.URL.RawQuery = q.Encode()
	resp, err := s.next.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	var body map[string]any
	data, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err = json.Unmarshal(data, &body); err != nil {
		return nil, err
	}
	s.n++
	body["next_batch"] = fmt.Sprintf("%s_%d", body["next_batch"], s.n)
	if timeline := s.inject(since); timeline != nil {
		body["rooms"] = map[string]any{"join": map[string]any{string(s.room): map[string]any{"timeline": timeline}}}
	}
	data, _ = json.Marshal(body)
	resp.Body = io.NopCloser(bytes.NewReader(data))
	resp.ContentLength = int64(len(data))
	resp.Header.Del("Content-Length")
	return resp, nil
}

// rewriteSync puts a syncRewriter in front of m's /sync: inject runs under lock for every request but the first
// (since ""), which is left as the server answers it.
func rewriteSync(m *Machine, room id.RoomID, lock *sync.Mutex, inject func(since string) map[string]any) {
	m.client.Client = &http.Client{Transport: &syncRewriter{next: http.DefaultTransport, room: room, inject: func(since string) map[string]any {
		lock.Lock()
		defer lock.Unlock()
		if since == "" {
			return nil
		}
		return inject(since)
	}}}
}

// timelineOf reads room's timeline at the fake homeserver as it stands: at gives an event's position (a /messages
// token "t<position>" reads back from it), rawOf the event as the server serves it.
func timelineOf(t *testing.T, srv *fakehs.Server, room id.RoomID) (at func(id.EventID) int, rawOf func(id.EventID) json.RawMessage) {
	timeline := srv.Timeline(room)
	at = func(evtID id.EventID) int {
		for i, raw := range timeline {
			var e struct {
				ID id.EventID `json:"event_id"`
			}
			if json.Unmarshal(raw, &e) == nil && e.ID == evtID {
				return i
			}
		}
		t.Fatalf("%s is not in the room's timeline", evtID)
		return -1
	}
	return at, func(evtID id.EventID) json.RawMessage { return timeline[at(evtID)] }
}

// TestSyncTokenMovesOnlyAfterTheBatchIsRecorded: on the /sync path (homeservers without appservice to-device
// pushes), the token that ends a batch is saved only after the batch's room events are recorded: while recording
// fails (the database away), the saved token still points before the batch, so a crash then fetches the batch
// again instead of losing its room keys and redactions. A limited timeline is filled in from /messages, so a
// redaction in the gap is recorded too.
func TestSyncTokenMovesOnlyAfterTheBatchIsRecorded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := newASRig(t, fakehs.Options{NoMSC4190: true, KeepTimeline: true}, "")
	room := r.srv.CreateRoom(r.member.ID, fakehs.RoomOptions{Members: []id.UserID{r.bot}})
	redact := func() (id.EventID, id.EventID) {
		sent, err := r.member.Client.SendMessageEvent(ctx, room, event.EventMessage, map[string]any{"msgtype": "m.text", "body": "x"})
		if err != nil {
			t.Fatal(err)
		}
		red, err := r.member.Client.RedactEvent(ctx, room, sent.EventID)
		if err != nil {
			t.Fatal(err)
		}
		return sent.EventID, red.EventID
	}
	_, r1 := redact()
	_, r2 := redact()
	at, rawOf := timelineOf(t, r.srv, room)

	var lock sync.Mutex
	var recorded []id.EventID
	var phase int         // 0: inject R1; 1: R1 recorded, inject R2 in a limited timeline; 2: done
	var batchSince string // the since of the request whose answer carried R1
	var savedWhileRecording string
	failures := 1
	r.m.SyncedTimeline = func(ctx context.Context, batch SyncedBatch) error {
		evts := batch.Events
		if len(evts) == 0 {
			return nil
		}
		lock.Lock()
		defer lock.Unlock()
		if phase == 0 && failures > 0 {
			failures--
			_ = r.db.QueryRow(ctx, `SELECT sync_token FROM crypto_account WHERE account_id=$1`, botAccountID).Scan(&savedWhileRecording)
			return errors.New("the database went away")
		}
		for _, e := range evts {
			recorded = append(recorded, e.ID)
		}
		phase++
		return nil
	}
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	if r.m.AppserviceMode() {
		t.Fatal("the rig's homeserver lacks MSC4190: the Machine should use /sync")
	}
	rewriteSync(r.m, room, &lock, func(since string) map[string]any {
		switch {
		case phase == 0 && (batchSince == "" || since == batchSince):
			batchSince = since
			return map[string]any{"events": []json.RawMessage{rawOf(r1)}}
		case phase == 1:
			return map[string]any{"events": []json.RawMessage{rawOf(r2)}, "limited": true, "prev_batch": fmt.Sprintf("t%d", at(r2))}
		}
		return nil
	})
	r.m.Start(ctx)
	defer r.m.Stop()
	for {
		lock.Lock()
		done := phase >= 2
		lock.Unlock()
		if done {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the synced events were not recorded: phase %d, recorded %v", phase, recorded)
		}
		time.Sleep(20 * time.Millisecond)
	}
	lock.Lock()
	defer lock.Unlock()
	if savedWhileRecording != batchSince {
		t.Fatalf("while the batch was being recorded the saved token was %q, want the one before the batch, %q", savedWhileRecording, batchSince)
	}
	if !slices.Contains(recorded, r1) || !slices.Contains(recorded, r2) {
		t.Fatalf("recorded %v, want the first redaction %s (retried) and both of the limited timeline, %s from the gap and %s", recorded, r1, r1, r2)
	}
	if n := len(slices.DeleteFunc(slices.Clone(recorded), func(e id.EventID) bool { return e != r1 })); n != 2 {
		t.Fatalf("the first redaction was recorded %d times, want twice (from the batch, then from the limited timeline's gap)", n)
	}
}

// TestOnlyRealDeviceChangesRotate: a /sync that reports a member's keys as changed although they did not change
// (Dendrite reports a user's every upload) keeps the room's session; new cross-signing keys of the member rotate
// it.
func TestOnlyRealDeviceChangesRotate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := newASRig(t, fakehs.Options{NoMSC4190: true}, "")
	r.m.cfg.Appservice = false // the bot's device logs in and runs /sync
	// The homeserver reports key changes of users who share a room with the bot.
	r.srv.CreateRoom(r.member.ID, fakehs.RoomOptions{Members: []id.UserID{r.bot}})
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	session := func() id.SessionID {
		enc, err := r.m.Encrypt(ctx, r.bot, r.room, event.EventMessage, &event.Content{Raw: map[string]any{"msgtype": "m.text", "body": "x"}})
		if err != nil {
			t.Fatal(err)
		}
		return enc.SessionID
	}
	token := func() string {
		var tok string
		_ = r.db.QueryRow(ctx, `SELECT sync_token FROM crypto_account WHERE account_id=$1`, botAccountID).Scan(&tok)
		return tok
	}
	logged := func() string {
		r.logs.mu.Lock()
		defer r.logs.mu.Unlock()
		return r.logs.buf.String()
	}
	// waitSynced waits until the bot's /sync has handled a batch after the one that ended at was.
	waitSynced := func(was string) {
		for deadline := time.Now().Add(20 * time.Second); token() == was; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the bot's /sync did not move on")
			}
		}
	}
	for token() == "" { // the initial /sync: it reports no changes
		if ctx.Err() != nil {
			t.Fatal("the bot's first /sync did not finish")
		}
		time.Sleep(20 * time.Millisecond)
	}
	first := session()
	was := token()
	r.srv.ReportKeyChange(r.member.ID)
	waitSynced(was)
	if !strings.Contains(logged(), "Device list changes in /sync") {
		t.Fatal("the bot's /sync did not report the member's keys as changed")
	}
	if got := session(); got != first {
		t.Fatal("a reported change without a new key rotated the room's session")
	}
	was = token()
	keys, err := r.member.Machine.GenerateCrossSigningKeys() // the member resets their identity
	if err != nil {
		t.Fatal(err)
	}
	if err = r.member.Machine.PublishCrossSigningKeys(ctx, keys, nil); err != nil {
		t.Fatal(err)
	}
	waitSynced(was)
	if got := session(); got == first {
		for _, l := range strings.Split(logged(), "\n") {
			if strings.Contains(l, "evice list") || strings.Contains(l, "Rotated") || strings.Contains(l, "Querying keys") || strings.Contains(l, "Updating devices") {
				t.Log(l)
			}
		}
		t.Fatal("the member's new identity did not rotate the room's session")
	}
}

// TestLimitedTimelineWithoutPrevBatchIsIncomplete: a /sync batch whose room timeline is cut (limited) says so to
// the relay (SyncedBatch.Incomplete) unless its gap was filled: with a prev_batch token the gap is read and the
// batch holds the whole room; without one nothing can be read, and the relay must not take the batch as whole
// (it would place pushed events the batch does not show behind it, out of the room's order).
func TestLimitedTimelineWithoutPrevBatchIsIncomplete(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := newASRig(t, fakehs.Options{NoMSC4190: true, KeepTimeline: true}, "")
	room := r.srv.CreateRoom(r.member.ID, fakehs.RoomOptions{Members: []id.UserID{r.bot}})
	var sent []id.EventID
	for i := 0; i < 3; i++ {
		resp, err := r.member.Client.SendMessageEvent(ctx, room, event.EventMessage, map[string]any{"msgtype": "m.text", "body": fmt.Sprint(i)})
		if err != nil {
			t.Fatal(err)
		}
		sent = append(sent, resp.EventID)
	}
	at, rawOf := timelineOf(t, r.srv, room)

	var lock sync.Mutex
	var incomplete []bool // per batch with events: was the room marked incomplete
	r.m.SyncedTimeline = func(ctx context.Context, batch SyncedBatch) error {
		if len(batch.Events) == 0 || batch.Initial {
			return nil
		}
		lock.Lock()
		defer lock.Unlock()
		incomplete = append(incomplete, batch.Incomplete[room])
		return nil
	}
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	var first string
	rewriteSync(r.m, room, &lock, func(since string) map[string]any {
		switch {
		case len(incomplete) == 0 && (first == "" || since == first):
			first = since
			// Cut, and no token to read the rest with.
			return map[string]any{"events": []json.RawMessage{rawOf(sent[1])}, "limited": true}
		case len(incomplete) == 1:
			// Cut, with its token: the gap (sent[1]) is read from /messages up to the previous batch.
			return map[string]any{"events": []json.RawMessage{rawOf(sent[2])}, "limited": true, "prev_batch": fmt.Sprintf("t%d", at(sent[2]))}
		}
		return nil
	})
	r.m.Start(ctx)
	defer r.m.Stop()
	for {
		lock.Lock()
		n := len(incomplete)
		lock.Unlock()
		if n >= 2 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("batches recorded: %d, want 2", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	lock.Lock()
	defer lock.Unlock()
	if !incomplete[0] {
		t.Error("a limited timeline without prev_batch was taken as the room's whole batch")
	}
	if incomplete[1] {
		t.Error("a limited timeline whose gap was filled is marked incomplete")
	}
}

// TestFailedSyncRetriesSoon: after a failed /sync (a 502, a reset) the bot's next request comes soon and backs off
// only while requests keep failing, so a room key sent meanwhile is not held back for seconds (a member's message
// waits bridge.key_wait, 5 s by default, for its key before later messages pass it; the wait used to be a fixed 5 s).
// A rate limit's wait is what retryWait says; a handled batch starts the backoff over.
func TestFailedSyncRetriesSoon(t *testing.T) {
	limited := errors.New("rate limited")
	s := &cryptoSyncer{retryWait: func(err error, backoff time.Duration) time.Duration {
		if err == limited {
			return 7 * time.Second
		}
		return backoff
	}}
	fail := func(err error) time.Duration {
		t.Helper()
		wait, stop := s.OnFailedSync(nil, err)
		if stop != nil {
			t.Fatalf("the sync loop stops on %v: %v", err, stop)
		}
		return wait
	}
	bad := errors.New("502 Bad Gateway")
	var got []time.Duration
	for range 7 {
		got = append(got, fail(bad))
	}
	want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}
	if !slices.Equal(got, want) {
		t.Fatalf("waits after successive failures: %v, want %v", got, want)
	}
	if wait := fail(limited); wait != 7*time.Second {
		t.Errorf("a rate limit's wait: %v, want what it asked for", wait)
	}
	s.failures = 0 // what handling a batch does (ProcessResponse)
	if wait := fail(bad); wait != 250*time.Millisecond {
		t.Errorf("the first failure after a handled batch waits %v, want 250ms", wait)
	}
	if _, stop := s.OnFailedSync(nil, mautrix.MUnknownToken); stop == nil {
		t.Error("a lost token does not stop the loop (ferry logs the device in again)")
	}
}

// failAfter fails the first /sync request whose since fail says, as a connection the homeserver closed does.
type failAfter struct {
	next http.RoundTripper
	lock *sync.Mutex
	fail func(since string) bool
}

func (f *failAfter) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Path == "/_matrix/client/v3/sync" {
		f.lock.Lock()
		fail := f.fail(req.URL.Query().Get("since"))
		f.lock.Unlock()
		if fail {
			return nil, errors.New("connection refused")
		}
	}
	return f.next.RoundTrip(req)
}

// TestSyncAnsweredAsTheHomeserverWentAwayIsReadAgain: Dendrite answers a /sync in flight when it shuts down with a
// token past events it has not written yet, and the request after it fails (it is gone). Read on from that token,
// /sync never shows those events (after its restart they sit before it). The bot's /sync reads the batch before
// the failure again: a member's message the bad answer skipped is recorded.
func TestSyncAnsweredAsTheHomeserverWentAwayIsReadAgain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := newASRig(t, fakehs.Options{NoMSC4190: true, KeepTimeline: true}, "")
	room := r.srv.CreateRoom(r.member.ID, fakehs.RoomOptions{Members: []id.UserID{r.bot}})
	sent, err := r.member.Client.SendMessageEvent(ctx, room, event.EventMessage, map[string]any{"msgtype": "m.text", "body": "as it went away"})
	if err != nil {
		t.Fatal(err)
	}
	_, rawOf := timelineOf(t, r.srv, room)

	var lock sync.Mutex
	var recorded bool
	r.m.SyncedTimeline = func(ctx context.Context, batch SyncedBatch) error {
		lock.Lock()
		defer lock.Unlock()
		for _, e := range batch.Events {
			recorded = recorded || e.ID == sent.EventID
		}
		return nil
	}
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	var away string // the since of the request the homeserver answered as it went away
	var failed bool
	rewriteSync(r.m, room, &lock, func(since string) map[string]any {
		switch {
		case away == "":
			away = since // answered without the message, with a token past it
		case since == away:
			return map[string]any{"events": []json.RawMessage{rawOf(sent.EventID)}}
		}
		return nil
	})
	r.m.client.Client.Transport = &failAfter{next: r.m.client.Client.Transport, lock: &lock, fail: func(since string) bool {
		if failed || away == "" || since == "" || since == away {
			return false
		}
		failed = true // the request after that answer: the homeserver is gone
		return true
	}}
	r.m.Start(ctx)
	defer r.m.Stop()
	deadline := time.Now().Add(15 * time.Second)
	for {
		lock.Lock()
		done, f := recorded, failed
		lock.Unlock()
		if done {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("the message the homeserver's last answer skipped was never recorded (the request after it failed: %v)", f)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRereadOnlyRightAfterABatch: the batch before a failed /sync is read again only when the failure is the
// first since that batch, comes within rereadWindow of it and is not a rate limit (which says nothing about the
// homeserver going away); then the token saved before the batch is its since.
func TestRereadOnlyRightAfterABatch(t *testing.T) {
	ctx := context.Background()
	bot := id.UserID("@bot:example.org")
	newSyncer := func(handledAgo time.Duration) *cryptoSyncer {
		store := &afterBatchStore{SyncStore: mautrix.NewMemorySyncStore()}
		_ = store.SyncStore.SaveNextBatch(ctx, bot, "after")
		return &cryptoSyncer{client: &mautrix.Client{UserID: bot}, store: store, lastSince: "before", lastHandled: time.Now().Add(-handledAgo)}
	}
	gone := errors.New("connection refused")
	limited := mautrix.HTTPError{RespError: &mautrix.RespError{ErrCode: mautrix.MLimitExceeded.ErrCode}}
	cases := []struct {
		name       string
		handledAgo time.Duration
		errs       []error // the failures in a row; the last one is checked
		reread     bool
	}{
		{"the first failure right after a batch", 0, []error{gone}, true},
		{"a rate limit right after a batch", 0, []error{limited}, false},
		{"a failure long after the batch", 2 * rereadWindow, []error{gone}, false},
		{"a second failure in a row", 0, []error{limited, gone}, false},
	}
	for _, c := range cases {
		s := newSyncer(c.handledAgo)
		var err error
		for _, e := range c.errs {
			_, err = s.OnFailedSync(nil, e)
		}
		token, _ := s.store.SyncStore.LoadNextBatch(ctx, bot)
		if got := errors.Is(err, errRereadBatch); got != c.reread {
			t.Errorf("%s: read again %v, want %v", c.name, got, c.reread)
		}
		if want := map[bool]string{true: "before", false: "after"}[c.reread]; token != want {
			t.Errorf("%s: saved token %q, want %q", c.name, token, want)
		}
	}
}
