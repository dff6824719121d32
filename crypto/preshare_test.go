package crypto

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

// preshareRig sends as the ghost through device.encrypt (the relay's path) into a room that rotates after
// rotateAfter messages, with a member list the test can change.
type preshareRig struct {
	*shareRig
	t       *testing.T
	policy  sharePolicy
	mu      sync.Mutex
	current []id.UserID
	// gate, when set, holds the next member lookup after it read the list, until the test closes it.
	gate, read chan struct{}
	sent       int
}

const rotateAfter = 10

func newPreshareRig(t *testing.T, members int) *preshareRig {
	r := &preshareRig{shareRig: newShareRig(t, dbtest.Open(t, "postgres"), members), t: t}
	r.policy = r.shareRig.policy()
	r.policy.encEvent = func(context.Context, id.RoomID) (*event.EncryptionEventContent, *event.HistoryVisibilityEventContent) {
		return &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1, RotationPeriodMessages: rotateAfter}, nil
	}
	r.current = slices.Clone(r.users)
	return r
}

func (r *preshareRig) members(context.Context) ([]id.UserID, error) {
	r.mu.Lock()
	list := slices.Clone(r.current)
	gate, read := r.gate, r.read
	r.gate, r.read = nil, nil
	r.mu.Unlock()
	if gate != nil {
		close(read)
		<-gate
	}
	return list, nil
}

// send encrypts the next message as the ghost and returns it as the room would show it.
func (r *preshareRig) send() *event.Event {
	r.t.Helper()
	r.sent++
	body := fmt.Sprintf("message %d in %s", r.sent, r.room)
	content := &event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: body}}
	enc, err := r.ghost.encrypt(context.Background(), r.room, event.EventMessage, content, r.members, r.policy)
	if err != nil {
		r.t.Fatal(err)
	}
	return &event.Event{ID: id.EventID(fmt.Sprintf("$m%d", r.sent)), RoomID: r.room, Sender: r.ghost.userID,
		Type: event.EventEncrypted, Content: event.Content{Parsed: enc}}
}

func sessionOf(evt *event.Event) id.SessionID {
	return evt.Content.Parsed.(*event.EncryptedEventContent).SessionID
}

func (r *preshareRig) wait() {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := r.ghost.olm.c.waitPreshare(ctx); err != nil {
		r.t.Fatal(err)
	}
}

func (r *preshareRig) next() *crypto.OutboundGroupSession {
	return r.ghost.olm.c.peekNext(outboundKey{r.ghost.olm.AccountID, r.room})
}

// leaveWhileSharing runs start, which begins a share, holds that share once it has read the members, then lets
// the last member leave (the member list changes, then the room rotates, as Machine.HandleMemberEvent does) and
// releases the share.
func (r *preshareRig) leaveWhileSharing(m *Machine, start func()) {
	r.t.Helper()
	r.mu.Lock()
	r.gate, r.read = make(chan struct{}), make(chan struct{})
	gate, read := r.gate, r.read
	r.mu.Unlock()
	start()
	select {
	case <-read:
	case <-time.After(time.Minute):
		r.t.Fatal("the share did not read the members")
	}
	r.mu.Lock()
	r.current = r.current[:len(r.current)-1]
	r.mu.Unlock()
	if err := m.Rotate(context.Background(), r.room); err != nil {
		r.t.Fatal(err)
	}
	close(gate)
}

// recipients lists the users entitled to a session.
func (r *preshareRig) recipients(sessionID id.SessionID) []id.UserID {
	return column[id.UserID](r, `SELECT DISTINCT user_id FROM crypto_megolm_outbound_session_shared WHERE session_id=$1 ORDER BY user_id`, sessionID)
}

// inboundCopies counts the stored inbound copies of a session (ferry's; the members' stores are in memory).
func (r *preshareRig) inboundCopies(sessionID id.SessionID) int {
	r.t.Helper()
	var n int
	if err := r.db.QueryRow(context.Background(), `SELECT COUNT(*) FROM crypto_megolm_inbound_session WHERE session_id=$1`, sessionID).Scan(&n); err != nil {
		r.t.Fatal(err)
	}
	return n
}

// entitledTo lists the sessions a user may ask ferry for.
func (r *preshareRig) entitledTo(userID id.UserID) []id.SessionID {
	return column[id.SessionID](r, `SELECT DISTINCT session_id FROM crypto_megolm_outbound_session_shared WHERE user_id=$1`, userID)
}

// column runs a query for one text column and returns its values.
func column[T ~string](r *preshareRig, query string, arg any) []T {
	r.t.Helper()
	rows, err := r.db.Query(context.Background(), query, arg)
	if err != nil {
		r.t.Fatal(err)
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		var v T
		if err = rows.Scan(&v); err != nil {
			r.t.Fatal(err)
		}
		out = append(out, v)
	}
	return out
}

// decrypts checks which members read evt (after processing their to-device messages).
func (r *preshareRig) decrypts(evt *event.Event, want func(u *fakehs.User) bool) {
	r.t.Helper()
	ctx := context.Background()
	body := fmt.Sprintf("message %s", evt.ID[2:])
	for _, u := range r.shareRig.members {
		u.ReceiveToDevice(ctx)
		dec, err := u.Decrypt(ctx, evt)
		switch {
		case want(u) && err != nil:
			r.t.Errorf("%s cannot decrypt %s: %v", u.ID, evt.ID, err)
		case want(u) && dec.Content.AsMessage().Body != fmt.Sprintf("%s in %s", body, r.room):
			r.t.Errorf("%s decrypted %q for %s", u.ID, dec.Content.AsMessage().Body, evt.ID)
		case !want(u) && err == nil:
			r.t.Errorf("%s decrypted %s, but it left the room before that session was shared", u.ID, evt.ID)
		}
	}
}

func everyone(*fakehs.User) bool { return true }

// TestPreshareSwitchesToSharedSuccessor: the session's last tenth of messages shares a successor in the
// background; the message that finds the session used up switches to it without any share of its own, and
// every member reads it.
func TestPreshareSwitchesToSharedSuccessor(t *testing.T) {
	r := newPreshareRig(t, 3)
	first := sessionOf(r.send())
	for i := 2; i <= rotateAfter-2; i++ {
		if got := sessionOf(r.send()); got != first {
			t.Fatalf("message %d used session %s, want %s", i, got, first)
		}
	}
	r.wait()
	if r.next() != nil {
		t.Fatalf("a successor was shared after %d of %d messages", rotateAfter-2, rotateAfter)
	}
	r.send() // the 9th: within the last tenth
	r.wait()
	next := r.next()
	if next == nil {
		t.Fatal("no successor shared in the background after the session neared its limit")
	}
	if got, want := r.recipients(next.ID()), r.users; !slices.Equal(got, want) {
		t.Errorf("successor recipients %v, want %v", got, want)
	}
	for _, u := range r.shareRig.members {
		u.ReceiveToDevice(context.Background())
	}
	tenth := r.send()
	if sessionOf(tenth) != first {
		t.Errorf("the 10th message used %s, want the current session %s until it is used up", sessionOf(tenth), first)
	}
	switched := r.send()
	if got := sessionOf(switched); got != next.ID() {
		t.Fatalf("the 11th message used session %s, want the successor %s", got, next.ID())
	}
	if n := r.takeAll(); n != 0 {
		t.Errorf("switching to the successor sent %d to-device messages, want none (it was shared already)", n)
	}
	if r.next() != nil {
		t.Error("the successor is still held as prepared after it was installed")
	}
	r.decrypts(switched, everyone)
	// The installed successor is the device's session from now on, also for its store.
	stored, err := r.ghost.store.GetOutboundGroupSession(context.Background(), r.room)
	if err != nil || stored == nil || stored.ID() != next.ID() || !stored.Shared {
		t.Errorf("stored outbound session %v (err %v), want the shared successor %s", stored, err, next.ID())
	}
}

// TestPreshareDroppedByForcedRotation: every forced rotation drops the prepared successor; the next message
// starts a session of its own.
func TestPreshareDroppedByForcedRotation(t *testing.T) {
	r := newPreshareRig(t, 2)
	m := &Machine{db: r.db, cache: r.ghost.olm.c}
	ctx := context.Background()
	rotations := map[string]func(current id.SessionID) error{
		"rotate":  func(id.SessionID) error { return m.Rotate(ctx, r.room) },
		"discard": func(cur id.SessionID) error { return m.DiscardOutboundSession(ctx, r.room, cur) },
		"destroy": func(cur id.SessionID) error { _, err := m.DestroySession(ctx, r.room, cur); return err },
	}
	for _, name := range []string{"rotate", "discard", "destroy"} {
		t.Run(name, func(t *testing.T) {
			r.t = t
			r.room = id.RoomID("!" + name + ":fakehs.test")
			var cur id.SessionID
			for i := 1; i < rotateAfter; i++ {
				cur = sessionOf(r.send())
			}
			r.wait()
			next := r.next()
			if next == nil {
				t.Fatal("no successor shared")
			}
			if err := rotations[name](cur); err != nil {
				t.Fatal(err)
			}
			if r.next() != nil {
				t.Fatal("the successor survived the rotation")
			}
			if n := r.inboundCopies(next.ID()); n != 0 {
				t.Errorf("the dropped successor's key is still stored (%d inbound copies)", n)
			}
			if got := r.recipients(next.ID()); len(got) != 0 {
				t.Errorf("users %v are still entitled to the dropped successor", got)
			}
			after := r.send()
			if got := sessionOf(after); got == next.ID() || got == cur {
				t.Fatalf("after the rotation the message used %s (current %s, dropped successor %s)", got, cur, next.ID())
			}
			r.decrypts(after, everyone)
		})
	}
}

// TestPreshareLeftMemberNotRecipient: a member leaves while the successor's share is under way (the share read
// the member list before the leave). The successor is dropped, and no session used after the leave was shared
// with the member, who cannot read what follows; the others can.
func TestPreshareLeftMemberNotRecipient(t *testing.T) {
	r := newPreshareRig(t, 3)
	m := &Machine{db: r.db, cache: r.ghost.olm.c}
	leaver := r.shareRig.members[2]
	first := sessionOf(r.send())
	for i := 2; i < rotateAfter-1; i++ {
		r.send()
	}
	// The next message starts the successor's share, which reads the members (the leaver included).
	r.leaveWhileSharing(m, func() { r.send() })
	r.wait()
	if next := r.next(); next != nil {
		t.Fatalf("the successor %s shared before the leave was kept", next.ID())
	}
	stayed := func(u *fakehs.User) bool { return u != leaver }
	used := map[id.SessionID]bool{}
	for i := 0; i < 2*rotateAfter+1; i++ {
		evt := r.send()
		used[sessionOf(evt)] = true
		r.wait()
		if i == 0 || i == 2*rotateAfter {
			r.decrypts(evt, stayed)
		}
	}
	if len(used) < 3 {
		t.Fatalf("%d sessions used for %d messages, want rotations every %d", len(used), 2*rotateAfter+1, rotateAfter)
	}
	for sid := range used {
		if slices.Contains(r.recipients(sid), leaver.ID) {
			t.Errorf("session %s, used after the leave, was shared with %s", sid, leaver.ID)
		}
	}
	// The dropped successor's key and entitlements are gone: the member may ask only for the session of its time.
	if got := r.entitledTo(leaver.ID); !slices.Equal(got, []id.SessionID{first}) {
		t.Errorf("%s is entitled to sessions %v, want only %s", leaver.ID, got, first)
	}
}

func TestNearLimit(t *testing.T) {
	mk := func(maxMsgs, count int, maxAge, age time.Duration) *crypto.OutboundGroupSession {
		s := &crypto.OutboundGroupSession{MaxMessages: maxMsgs, MessageCount: count}
		s.MaxAge, s.CreationTime = maxAge, time.Now().Add(-age)
		return s
	}
	for _, tc := range []struct {
		name string
		sess *crypto.OutboundGroupSession
		want bool
	}{
		{"fresh", mk(100, 0, time.Hour, 0), false},
		{"89 of 100", mk(100, 89, time.Hour, 0), false},
		{"90 of 100", mk(100, 90, time.Hour, 0), true},
		{"9 of 10", mk(10, 9, time.Hour, 0), true},
		{"8 of 10", mk(10, 8, time.Hour, 0), false},
		{"one-message sessions", mk(1, 0, time.Hour, 0), true},
		{"53 of 60 minutes", mk(100, 0, time.Hour, 53*time.Minute), false},
		{"55 of 60 minutes", mk(100, 0, time.Hour, 55*time.Minute), true},
		{"a week, 6 days 23h45m in", mk(100, 0, 7*24*time.Hour, 7*24*time.Hour-15*time.Minute), false},
		{"a week, 6 days 23h55m in", mk(100, 0, 7*24*time.Hour, 7*24*time.Hour-5*time.Minute), true},
		{"no age limit", mk(100, 0, 0, 1000*time.Hour), false},
	} {
		if got := nearLimit(tc.sess); got != tc.want {
			t.Errorf("%s: nearLimit = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestShareOvertakenByRotation: a member leaves (and the room rotates) while a message's own share runs with the
// member list read before the leave. The share is withdrawn and made again with the members as they are: the
// leaver never becomes entitled to the session the message uses and cannot read it.
func TestShareOvertakenByRotation(t *testing.T) {
	r := newPreshareRig(t, 3)
	m := &Machine{db: r.db, cache: r.ghost.olm.c}
	leaver := r.shareRig.members[2]
	sent := make(chan *event.Event, 1)
	// The room's first message: no session yet, so it shares one itself.
	r.leaveWhileSharing(m, func() { go func() { sent <- r.send() }() })
	var evt *event.Event
	select {
	case evt = <-sent:
	case <-time.After(time.Minute):
		t.Fatal("the message was not encrypted")
	}
	if got := r.entitledTo(leaver.ID); len(got) != 0 {
		t.Errorf("%s, who left during the share, is entitled to sessions %v", leaver.ID, got)
	}
	if got := r.recipients(sessionOf(evt)); slices.Contains(got, leaver.ID) || len(got) != 2 {
		t.Errorf("the message's session went to %v, want the two members who stayed", got)
	}
	r.decrypts(evt, func(u *fakehs.User) bool { return u != leaver })
}
