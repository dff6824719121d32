package bridge

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

func TestParseDisappear(t *testing.T) {
	ok := map[string]time.Duration{
		"5s": 5 * time.Second, "90s": 90 * time.Second, "10m": 10 * time.Minute, "1h": time.Hour, "24h": 24 * time.Hour,
		"1h30m": 90 * time.Minute, "1d": 24 * time.Hour, " 10M ": 10 * time.Minute, "off": 0, "OFF": 0, "5000ms": 5 * time.Second,
	}
	for in, want := range ok {
		got, err := ParseDisappear(in)
		if err != nil || got != want {
			t.Errorf("ParseDisappear(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"4s", "4999ms", "24h1s", "25h", "2d", "-5s", "0s", "5", "ten minutes", "", "1.5", "5x", "1e3s", "5s5", "1.0000001s", "d"} {
		if got, err := ParseDisappear(in); err == nil {
			t.Errorf("ParseDisappear(%q) = %v, want an error", in, got)
		} else if !strings.Contains(err.Error(), "5 seconds to 24 hours") {
			t.Errorf("ParseDisappear(%q) error %q does not name the allowed range", in, err)
		}
	}
}

func TestDisappearStateContent(t *testing.T) {
	on, err := disappearStateContent(10 * time.Minute).MarshalJSON()
	if err != nil || string(on) != `{"type":"after_send","timer":600000}` {
		t.Fatalf("on = %s, %v", on, err)
	}
	off, err := disappearStateContent(0).MarshalJSON()
	if err != nil || string(off) != `{}` {
		t.Fatalf("off = %s, %v", off, err)
	}
}

// fakeClock is a clock the test moves by hand.
type fakeClock struct {
	lock    sync.Mutex
	now     time.Time
	waiters []fakeWaiter
}

type fakeWaiter struct {
	at time.Time
	ch chan time.Time
}

func (c *fakeClock) Now() time.Time {
	c.lock.Lock()
	defer c.lock.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.lock.Lock()
	defer c.lock.Unlock()
	ch := make(chan time.Time, 1)
	c.waiters = append(c.waiters, fakeWaiter{at: c.now.Add(d), ch: ch})
	return ch
}

func (c *fakeClock) Advance(d time.Duration) {
	c.lock.Lock()
	defer c.lock.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.at.After(c.now) {
			w.ch <- c.now
		} else {
			kept = append(kept, w)
		}
	}
	c.waiters = kept
}

// memStore is an in-memory redactionStore.
type memStore struct {
	lock sync.Mutex
	rows map[id.EventID]*memRow
}

type memRow struct {
	r         database.Redaction
	notBefore time.Time
	failed    string
	lastError string
}

func newMemStore(rs ...*database.Redaction) *memStore {
	s := &memStore{rows: make(map[id.EventID]*memRow)}
	for _, r := range rs {
		s.rows[r.EventID] = &memRow{r: *r}
	}
	return s
}

func (s *memStore) Due(_ context.Context, now time.Time, limit int) ([]*database.Redaction, error) {
	s.lock.Lock()
	defer s.lock.Unlock()
	var out []*database.Redaction
	for _, row := range s.rows {
		if row.failed == "" && !row.r.Deadline.After(now) && !row.notBefore.After(now) {
			r := row.r
			out = append(out, &r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Deadline.Before(out[j].Deadline) })
	if len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

func (s *memStore) Next(context.Context) (time.Time, bool, error) {
	s.lock.Lock()
	defer s.lock.Unlock()
	var next time.Time
	for _, row := range s.rows {
		if row.failed != "" {
			continue
		}
		at := row.r.Deadline
		if row.notBefore.After(at) {
			at = row.notBefore
		}
		if next.IsZero() || at.Before(next) {
			next = at
		}
	}
	return next, !next.IsZero(), nil
}

func (s *memStore) Done(_ context.Context, evt id.EventID) error {
	s.lock.Lock()
	defer s.lock.Unlock()
	delete(s.rows, evt)
	return nil
}

func (s *memStore) Retry(_ context.Context, evt id.EventID, notBefore time.Time, lastError string) error {
	s.lock.Lock()
	defer s.lock.Unlock()
	row := s.rows[evt]
	row.r.Attempts++
	row.notBefore, row.lastError = notBefore, lastError
	return nil
}

func (s *memStore) Fail(_ context.Context, evt id.EventID, lastError string) error {
	s.lock.Lock()
	defer s.lock.Unlock()
	s.rows[evt].failed = lastError
	return nil
}

func (s *memStore) count() int {
	s.lock.Lock()
	defer s.lock.Unlock()
	return len(s.rows)
}

func (s *memStore) has(evt id.EventID) bool {
	s.lock.Lock()
	defer s.lock.Unlock()
	_, ok := s.rows[evt]
	return ok
}

// redactLog records redaction attempts and answers with scripted results.
type redactLog struct {
	lock     sync.Mutex
	clock    *fakeClock
	attempts map[id.EventID][]time.Time
	script   map[id.EventID][]redactionResult
}

func (l *redactLog) redact(_ context.Context, r *database.Redaction) redactionResult {
	l.lock.Lock()
	defer l.lock.Unlock()
	l.attempts[r.EventID] = append(l.attempts[r.EventID], l.clock.Now())
	if s := l.script[r.EventID]; len(s) > 0 {
		l.script[r.EventID] = s[1:]
		return s[0]
	}
	return redactionResult{done: true}
}

func (l *redactLog) times(evt id.EventID) []time.Time {
	l.lock.Lock()
	defer l.lock.Unlock()
	return append([]time.Time(nil), l.attempts[evt]...)
}

func newTestScheduler(t0 time.Time, rs ...*database.Redaction) (*scheduler, *fakeClock, *memStore, *redactLog) {
	clk := &fakeClock{now: t0}
	store := newMemStore(rs...)
	log := &redactLog{clock: clk, attempts: make(map[id.EventID][]time.Time), script: make(map[id.EventID][]redactionResult)}
	s := &scheduler{store: store, redact: log.redact, clock: clk, kick: make(chan struct{}), maxSleep: time.Hour, log: zerolog.Nop()}
	return s, clk, store, log
}

func TestSchedulerRedactsAtDeadlines(t *testing.T) {
	ctx := context.Background()
	t0 := time.UnixMilli(1_700_000_000_000)
	s, clk, store, log := newTestScheduler(t0,
		&database.Redaction{EventID: "$copy", RoomID: "!b", RedactAs: "@_ferry_alice:x", Deadline: t0.Add(5 * time.Second)},
		&database.Redaction{EventID: "$orig", RoomID: "!a", Original: true, Deadline: t0.Add(5 * time.Second)},
		&database.Redaction{EventID: "$later", RoomID: "!b", Deadline: t0.Add(time.Minute)},
	)
	if wait := s.round(ctx); wait != 5*time.Second {
		t.Fatalf("first wait = %v, want the 5s to the first deadline", wait)
	}
	if n := len(log.times("$copy")) + len(log.times("$orig")); n != 0 {
		t.Fatalf("redacted %d events before their deadline", n)
	}
	clk.Advance(4999 * time.Millisecond)
	s.round(ctx)
	if len(log.times("$copy")) != 0 {
		t.Fatal("redacted 1 ms early")
	}
	clk.Advance(time.Millisecond)
	wait := s.round(ctx)
	for _, evt := range []id.EventID{"$copy", "$orig"} {
		if got := log.times(evt); len(got) != 1 || !got[0].Equal(t0.Add(5*time.Second)) {
			t.Fatalf("%s redacted at %v, want once at the deadline", evt, got)
		}
		if store.has(evt) {
			t.Fatalf("%s still scheduled after its redaction", evt)
		}
	}
	if wait != 55*time.Second || len(log.times("$later")) != 0 {
		t.Fatalf("after the first deadline: wait %v (want 55s), $later attempts %d", wait, len(log.times("$later")))
	}
}

func TestSchedulerRetriesAndFails(t *testing.T) {
	ctx := context.Background()
	t0 := time.UnixMilli(1_700_000_000_000)
	s, clk, store, log := newTestScheduler(t0,
		&database.Redaction{EventID: "$limited", RoomID: "!b", Deadline: t0},
		&database.Redaction{EventID: "$down", RoomID: "!b", Deadline: t0},
		&database.Redaction{EventID: "$forbidden", RoomID: "!a", Original: true, Deadline: t0},
	)
	log.script["$limited"] = []redactionResult{{retryIn: 3 * time.Second, err: errors.New("M_LIMIT_EXCEEDED")}}
	log.script["$down"] = []redactionResult{{err: errors.New("502")}, {err: errors.New("502")}}
	log.script["$forbidden"] = []redactionResult{{fail: "the homeserver answered M_FORBIDDEN"}}

	if wait := s.round(ctx); wait != time.Second {
		t.Fatalf("wait after the first failures = %v, want the 1s backoff of $down", wait)
	}
	if !store.has("$forbidden") || store.rows["$forbidden"].failed == "" {
		t.Fatal("a permanent failure must stay recorded as failed, not vanish")
	}
	clk.Advance(time.Second)
	s.round(ctx) // $down: second failure, backoff doubles to 2s
	clk.Advance(2 * time.Second)
	s.round(ctx) // $down succeeds at t0+3s, and $limited's retry_after is over
	if got := log.times("$down"); len(got) != 3 || !got[1].Equal(t0.Add(time.Second)) || !got[2].Equal(t0.Add(3*time.Second)) {
		t.Fatalf("$down attempts at %v, want t0, t0+1s, t0+3s", got)
	}
	if got := log.times("$limited"); len(got) != 2 || !got[1].Equal(t0.Add(3*time.Second)) {
		t.Fatalf("$limited attempts at %v, want t0 and after the 3s the server asked for", got)
	}
	if store.has("$down") || store.has("$limited") {
		t.Fatal("retried redactions that went through are still scheduled")
	}
	clk.Advance(time.Hour)
	s.round(ctx)
	if n := len(log.times("$forbidden")); n != 1 {
		t.Fatalf("a failed redaction was attempted %d times, want once", n)
	}
}

func TestSchedulerCatchesUpAfterRestart(t *testing.T) {
	// Deadlines that passed while ferry was stopped are redacted on the first round, not skipped.
	t0 := time.UnixMilli(1_700_000_000_000)
	var rs []*database.Redaction
	for i := range 250 {
		rs = append(rs, &database.Redaction{EventID: id.EventID("$e" + string(rune('a'+i%26)) + time.Duration(i).String()), RoomID: "!b", Deadline: t0.Add(-time.Duration(i) * time.Second)})
	}
	rs = append(rs, &database.Redaction{EventID: "$future", RoomID: "!b", Deadline: t0.Add(time.Hour)})
	s, clk, store, log := newTestScheduler(t0, rs...)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.run(ctx); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for store.count() > 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d overdue redactions left after start", store.count()-1)
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, r := range rs[:250] {
		if got := log.times(r.EventID); len(got) != 1 || !got[0].Equal(t0) {
			t.Fatalf("%s redacted at %v, want once, right at start", r.EventID, got)
		}
	}
	// The loop now sleeps until $future's deadline; moving the clock there wakes it.
	for len(log.times("$future")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("$future was not redacted after its deadline")
		}
		clk.Advance(10 * time.Minute)
		time.Sleep(5 * time.Millisecond)
	}
	if got := log.times("$future")[0]; got.Before(t0.Add(time.Hour)) {
		t.Fatalf("$future redacted at %v, before its deadline", got)
	}
	cancel()
	<-done
}

// rotationCrypto is a fake E2EE layer that hands out outbound sessions per (sender, room) like one device per
// sender, and records discards.
type rotationCrypto struct {
	benchCrypto
	next      int
	current   map[senderRoom]id.SessionID
	discarded []id.SessionID
}

func (c *rotationCrypto) Encrypt(_ context.Context, sender id.UserID, room id.RoomID, _ event.Type, _ *event.Content) (*event.EncryptedEventContent, error) {
	k := senderRoom{sender, room}
	if c.current[k] == "" {
		c.next++
		c.current[k] = id.SessionID("s" + strconv.Itoa(c.next))
	}
	return &event.EncryptedEventContent{SessionID: c.current[k]}, nil
}

func (c *rotationCrypto) DiscardOutboundSession(_ context.Context, room id.RoomID, session id.SessionID) error {
	c.discarded = append(c.discarded, session)
	for k, s := range c.current {
		if k.room == room && s == session {
			delete(c.current, k)
		}
	}
	return nil
}

func (c *rotationCrypto) RatchetInboundSession(context.Context, id.RoomID, id.SessionID, uint32) (int, error) {
	return 0, nil
}

func (c *rotationCrypto) DestroyLateCopies(context.Context, id.RoomID, id.SessionID) (int64, error) {
	return 0, nil
}

func (c *rotationCrypto) DestroySession(ctx context.Context, room id.RoomID, session id.SessionID) (int64, error) {
	return 1, c.DiscardOutboundSession(ctx, room, session)
}

// upgradedDB opens a fresh database with ferry's tables.
func upgradedDB(t *testing.T) *database.Database {
	t.Helper()
	return upgradedDBOn(t, dbtest.Dialects[0])
}

// upgradedDBOn opens a fresh database of dialect with ferry's tables.
func upgradedDBOn(t *testing.T, dialect string) *database.Database {
	t.Helper()
	db := database.New(dbtest.Open(t, dialect), dbutil.NoopLogger)
	if err := db.Upgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	return db
}

// newRotationBridge is a bridge on a fresh database whose E2EE layer records outbound session rotations.
func newRotationBridge(t *testing.T) (*Bridge, *rotationCrypto) {
	t.Helper()
	cr := &rotationCrypto{current: make(map[senderRoom]id.SessionID)}
	return &Bridge{DB: upgradedDB(t), Crypto: cr, Log: zerolog.Nop()}, cr
}

func TestOutboundSessionsNeverMixKinds(t *testing.T) {
	ctx := context.Background()
	b, cr := newRotationBridge(t)
	db := b.DB
	const ghost, room = id.UserID("@_ferry_alice:x"), id.RoomID("!b")
	send := func(deadline time.Time, window time.Duration) id.SessionID {
		t.Helper()
		dis := disappearInfo{deadline: deadline, window: window}
		b.beforeEncrypt(ctx, ghost, room, dis)
		enc, _ := cr.Encrypt(ctx, ghost, room, event.EventMessage, nil)
		b.afterEncrypt(ctx, ghost, room, enc, dis)
		return enc.SessionID
	}
	plain := send(time.Time{}, 0)
	if again := send(time.Time{}, 0); again != plain {
		t.Fatalf("messages without deadline changed session: %s then %s", plain, again)
	}
	if s, _ := db.Disappear.GetSession(ctx, room, plain); s != nil {
		t.Fatal("a session without disappearing messages is tracked in the database")
	}
	d1 := send(time.Now().Add(time.Minute), time.Minute)
	if d1 == plain {
		t.Fatal("a disappearing message joined a session that carried messages without deadline")
	}
	if d2 := send(time.Now().Add(time.Minute), time.Minute); d2 != d1 {
		t.Fatalf("two disappearing messages within the timer used %s and %s", d1, d2)
	}
	// The window passed: the next disappearing message starts a new session.
	if _, err := db.Exec(ctx, `UPDATE disappear_session SET first_used=first_used-120000`); err != nil {
		t.Fatal(err)
	}
	b.disappear().sessions[roomSession{room, d1}].firstUsed = time.Now().Add(-2 * time.Minute)
	d3 := send(time.Now().Add(time.Minute), time.Minute)
	if d3 == d1 {
		t.Fatal("a session older than the timer carried another disappearing message")
	}
	// The timer is off again: a message without deadline does not join the disappearing session.
	if p2 := send(time.Time{}, 0); p2 == d3 {
		t.Fatal("a message without deadline joined a session that carried disappearing messages")
	}
	for _, s := range []id.SessionID{d1, d3} {
		ts, err := db.Disappear.GetSession(ctx, room, s)
		if err != nil || ts == nil || ts.Keep || !ts.Outbound {
			t.Fatalf("session %s tracked as %+v, %v; want an outbound session without keep", s, ts, err)
		}
	}
}

// TestRotatedSessionsAreForgotten: the in-memory record of outbound sessions keeps only the sessions senders
// still use, however often the room's own rotation replaces them.
func TestRotatedSessionsAreForgotten(t *testing.T) {
	ctx := context.Background()
	b, cr := newRotationBridge(t)
	const room = id.RoomID("!b")
	senders := []id.UserID{"@_ferry_alice:x", "@_ferry_bob:x"}
	for range 50 {
		for _, ghost := range senders {
			b.beforeEncrypt(ctx, ghost, room, disappearInfo{})
			enc, _ := cr.Encrypt(ctx, ghost, room, event.EventMessage, nil)
			b.afterEncrypt(ctx, ghost, room, enc, disappearInfo{})
			delete(cr.current, senderRoom{ghost, room}) // the room's rotation: the next message starts a new session
		}
	}
	if n := len(b.disappear().sessions); n != len(senders) {
		t.Fatalf("%d outbound session records after 100 rotations of %d senders, want %d", n, len(senders), len(senders))
	}
}

// sweepCrypto records which sessions the key sweep deletes, and how, and which it ratchets to which floor.
type sweepCrypto struct {
	rotationCrypto
	destroyed, late []id.SessionID
	ratcheted       []string // "<session>@<floor>"
}

func (c *sweepCrypto) RatchetInboundSession(_ context.Context, _ id.RoomID, s id.SessionID, floor uint32) (int, error) {
	c.ratcheted = append(c.ratcheted, fmt.Sprintf("%s@%d", s, floor))
	return 1, nil
}

func (c *sweepCrypto) DestroySession(_ context.Context, _ id.RoomID, s id.SessionID) (int64, error) {
	c.destroyed = append(c.destroyed, s)
	return 1, nil
}

func (c *sweepCrypto) DestroyLateCopies(_ context.Context, _ id.RoomID, s id.SessionID) (int64, error) {
	c.late = append(c.late, s)
	return 0, nil
}

func TestSweepKeys(t *testing.T) {
	db := upgradedDB(t)
	ctx := context.Background()
	cr := &sweepCrypto{}
	cfg := DefaultConfig()
	b := &Bridge{DB: db, Crypto: cr, Log: zerolog.Nop(), Config: &cfg}
	now := time.Now()
	note := func(room id.RoomID, s id.SessionID, outbound bool, at, deadline time.Time) {
		t.Helper()
		if _, err := db.Disappear.NoteSession(ctx, &database.SessionUse{RoomID: room, SessionID: s, Sender: "@u:x", Outbound: outbound, At: at, Deadline: deadline}); err != nil {
			t.Fatal(err)
		}
	}
	note("!a", "out-expired", true, now.Add(-time.Minute), now.Add(-time.Second))
	note("!a", "out-live", true, now.Add(-time.Minute), now.Add(time.Minute))
	note("!a", "in-expired", false, now.Add(-2*time.Minute), now.Add(-time.Second))
	note("!a", "in-recent", false, now.Add(-10*time.Second), now.Add(-time.Second)) // used within disappear_key_idle
	note("!busy", "in-busy", false, now.Add(-2*time.Minute), now.Add(-time.Second))
	note("!a", "in-kept", false, now.Add(-2*time.Minute), now.Add(-time.Second))
	note("!a", "in-kept", false, now.Add(-2*time.Minute), time.Time{})
	// An event of !busy still waits for its key: the session may be needed to decrypt it.
	if _, err := db.Inbox.Insert(ctx, []*database.InboxEvent{{EventID: "$q", RoomID: "!busy", Sender: "@u:x", Type: "m.room.encrypted", Raw: []byte(`{}`), State: database.InboxWaitingKeys, ReceivedAt: now}}); err != nil {
		t.Fatal(err)
	}
	b.sweepKeys(ctx, now)
	if got := strings.Join(sortedIDs(cr.destroyed), ","); got != "in-expired,out-expired" {
		t.Fatalf("destroyed %s, want in-expired,out-expired", got)
	}
	// The next sweep only looks for late copies of what it destroyed.
	cr.destroyed = nil
	b.sweepKeys(ctx, now.Add(time.Second))
	if len(cr.destroyed) != 0 || strings.Join(sortedIDs(cr.late), ",") != "in-expired,out-expired" {
		t.Fatalf("second sweep destroyed %v and swept late copies of %v", cr.destroyed, cr.late)
	}
	// A later disappearing message on a destroyed session tracks it again.
	note("!a", "in-expired", false, now.Add(2*time.Second), now.Add(time.Hour))
	if s, _ := db.Disappear.GetSession(ctx, "!a", "in-expired"); s == nil || s.Deleted {
		t.Fatalf("session used again is %+v, want tracked and not deleted", s)
	}
}

func sortedIDs(ids []id.SessionID) []string {
	out := make([]string, len(ids))
	for i, s := range ids {
		out[i] = string(s)
	}
	sort.Strings(out)
	return out
}

// rotateRecorder records which rooms the E2EE layer was asked to rotate.
type rotateRecorder struct {
	*benchCrypto
	rotated []id.RoomID
}

func (c *rotateRecorder) Rotate(_ context.Context, room id.RoomID) error {
	c.rotated = append(c.rotated, room)
	return nil
}

// TestTimerChangeRotatesEveryRoom: setting or clearing a link's timer starts new outbound sessions in every
// encrypted room of the link. After a restart ferry has no record of which session carried what, so this is what
// keeps a session that carried messages without deadline from carrying disappearing ones.
func TestTimerChangeRotatesEveryRoom(t *testing.T) {
	f := newRelayFixture(t)
	ctx := context.Background()
	rec := &rotateRecorder{benchCrypto: &benchCrypto{plaintext: benchMessage()}}
	f.br.Crypto = rec
	link, err := f.br.DB.Links.GetByRoom(ctx, f.roomA)
	if err != nil {
		t.Fatal(err)
	}
	for _, after := range []time.Duration{10 * time.Second, 0} {
		rec.rotated = nil
		f.br.disappearTimerChanged(ctx, link, after)
		slices.Sort(rec.rotated)
		want := []id.RoomID{f.roomA, f.roomB}
		slices.Sort(want)
		if !slices.Equal(rec.rotated, want) {
			t.Errorf("timer %v: rotated %v, want %v", after, rec.rotated, want)
		}
	}
}

// TestRatchetPastExpiredMessages: a user's session that carried a disappearing message at index 4 and one at 9
// is ratcheted to 5 when the first expires although the second has not (and the session is kept for it); a
// room with queued events waits; a copy of the session that arrives later is ratcheted to the floor again.
func TestRatchetPastExpiredMessages(t *testing.T) {
	db := upgradedDB(t)
	ctx := context.Background()
	cr := &sweepCrypto{}
	cfg := DefaultConfig()
	b := &Bridge{DB: db, Crypto: cr, Log: zerolog.Nop(), Config: &cfg}
	now := time.Now()
	for _, n := range []struct {
		room     id.RoomID
		session  id.SessionID
		index    uint32
		deadline time.Time
	}{
		{"!a", "sess", 3, now.Add(-2 * time.Second)},
		{"!a", "sess", 4, now.Add(-time.Second)},
		{"!a", "sess", 9, now.Add(time.Hour)},
		{"!busy", "other", 0, now.Add(-time.Second)},
	} {
		if err := db.Disappear.NoteIndex(ctx, n.room, n.session, n.index, n.deadline); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.Inbox.Insert(ctx, []*database.InboxEvent{{EventID: "$q", RoomID: "!busy", Sender: "@u:x", Type: "m.room.encrypted", Raw: []byte(`{}`), State: database.InboxPending, ReceivedAt: now}}); err != nil {
		t.Fatal(err)
	}
	b.sweepKeys(ctx, now)
	if got := strings.Join(cr.ratcheted, ","); got != "sess@5" {
		t.Fatalf("ratcheted %s, want sess@5 (and nothing in the busy room)", got)
	}
	if floor, _ := db.Disappear.Floor(ctx, "!a", "sess"); floor != 5 {
		t.Fatalf("floor = %d, want 5", floor)
	}
	// Nothing more is due until index 9's deadline.
	cr.ratcheted = nil
	b.sweepKeys(ctx, now.Add(time.Second))
	if len(cr.ratcheted) != 0 {
		t.Fatalf("ratcheted again: %v", cr.ratcheted)
	}
	// The session arrives again (a key request answered, a forward): it is ratcheted to the floor at once.
	b.enforceFloor(ctx, "!a", "sess")
	b.enforceFloor(ctx, "!a", "never-ratcheted")
	if got := strings.Join(cr.ratcheted, ","); got != "sess@5" {
		t.Fatalf("on arrival ratcheted %s, want sess@5 only", got)
	}
	// Index 9 expires: the floor moves past it.
	cr.ratcheted = nil
	b.sweepKeys(ctx, now.Add(2*time.Hour))
	if got := strings.Join(cr.ratcheted, ","); got != "sess@10" {
		t.Fatalf("ratcheted %s, want sess@10", got)
	}
}
