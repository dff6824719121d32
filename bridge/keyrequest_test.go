package bridge

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
)

// keyCrypto is an E2EE layer whose room key was lost on the way: it arrives only once ferry asks the sender's
// device for it (as a sender's client answers a key request from a device it shared the session with).
type keyCrypto struct {
	benchCrypto
	answers bool // the sender answers key requests

	lock      sync.Mutex
	requested int
	arrived   chan struct{}
}

func (c *keyCrypto) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	select {
	case <-c.arrived:
		return c.benchCrypto.Decrypt(ctx, evt)
	default:
		return nil, crypto.ErrKeyMissing
	}
}

func (c *keyCrypto) WaitForKey(ctx context.Context, _ *event.Event, timeout time.Duration) bool {
	select {
	case <-c.arrived:
		return true
	case <-time.After(timeout):
		return false
	case <-ctx.Done():
		return false
	}
}

func (c *keyCrypto) RequestKey(context.Context, *event.Event) error {
	c.lock.Lock()
	defer c.lock.Unlock()
	c.requested++
	if c.answers && c.requested == 1 {
		go func() {
			time.Sleep(20 * time.Millisecond) // the round trip to the sender's client
			close(c.arrived)
		}()
	}
	return nil
}

func (c *keyCrypto) requests() int {
	c.lock.Lock()
	defer c.lock.Unlock()
	return c.requested
}

func lostKeyEvent(t *testing.T) (*event.Event, *database.InboxEvent) {
	raw := []byte(`{"event_id":"$e","room_id":"!r:ferry.test","sender":"@alice:ferry.test","type":"m.room.encrypted","origin_server_ts":1,` +
		`"content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"AAAA","session_id":"S","sender_key":"k","device_id":"D"}}`)
	evt := parseEncryptedEvent(raw)
	if evt == nil {
		t.Fatal("the fixture does not parse")
	}
	return evt, &database.InboxEvent{EventID: evt.ID, RoomID: evt.RoomID, Raw: raw, SessionID: "S"}
}

// A room key that never reached ferry (dropped on the way) is asked for well before key_wait runs out, so the
// event decrypts in its place in the room's order instead of being parked and passed by later events.
func TestLostKeyIsRequestedBeforeTheRoomMovesOn(t *testing.T) {
	c := &keyCrypto{benchCrypto: benchCrypto{plaintext: &event.Event{Type: event.EventMessage}}, answers: true, arrived: make(chan struct{})}
	b := &Bridge{Crypto: c, Config: &Config{KeyWait: 5 * time.Second}}
	evt, row := lostKeyEvent(t)
	start := time.Now()
	dec, res, ok := b.decrypt(context.Background(), evt, row)
	if !ok || dec == nil {
		t.Fatalf("not decrypted (outcome %+v): the event was parked although its key came on request", res)
	}
	if waited := time.Since(start); waited > 2*time.Second {
		t.Fatalf("decrypted after %v: the key request went out only when key_wait was nearly over", waited)
	}
	if n := c.requests(); n != 1 {
		t.Fatalf("%d key requests, want 1", n)
	}
}

// A key nobody sends is asked for again while the event stays parked, on a growing schedule: the answer to a
// request can be lost like the key itself (Synapse drops to-device messages for an appservice it counts as down,
// and counts it down after any failed transaction). Passes of the parked loop in between ask nothing; once the
// key arrives, nothing more is asked; a new run asks at once.
func TestMissingKeyIsRequestedAgainUntilItComes(t *testing.T) {
	c := &keyCrypto{benchCrypto: benchCrypto{plaintext: &event.Event{Type: event.EventMessage}}, arrived: make(chan struct{})}
	b := &Bridge{Crypto: c, Config: &Config{KeyWait: 400 * time.Millisecond}}
	evt, row := lostKeyEvent(t)
	ctx := context.Background()
	_, res, ok := b.decrypt(ctx, evt, row)
	if ok || res.state != database.InboxWaitingKeys || res.sessionID != "S" {
		t.Fatalf("outcome %+v (ok %v), want the event parked for session S", res, ok)
	}
	if errors.Is(res.err, crypto.ErrKeyMissing) {
		t.Fatal("a parked event carries no failure")
	}
	if n := c.requests(); n != 1 {
		t.Fatalf("%d key requests while decrypting, want 1", n)
	}
	// The parked loop looks every 5 s; the requests go out at growing intervals, capped.
	now := time.Now()
	var asked []time.Duration
	for elapsed := time.Duration(0); elapsed <= 3*time.Hour; elapsed += 5 * time.Second {
		before := c.requests()
		b.requestKeyAt(ctx, evt, row.SessionID, now.Add(elapsed))
		if c.requests() > before {
			asked = append(asked, elapsed)
		}
	}
	if len(asked) < 5 || asked[0] > 10*time.Second {
		t.Fatalf("asked again at %v, want soon and then on a schedule", asked)
	}
	for i := 2; i < len(asked); i++ {
		if gap, prev := asked[i]-asked[i-1], asked[i-1]-asked[i-2]; gap < prev || gap > keyAskMax+5*time.Second {
			t.Fatalf("asked again at %v: the gaps must grow up to %v", asked, keyAskMax)
		}
	}
	if last := asked[len(asked)-1]; last < 3*time.Hour-keyAskMax-5*time.Second {
		t.Fatalf("asked again at %v: ferry stopped asking while the event is still parked", asked)
	}
	// The key arrives: its schedule is forgotten (what ferry keeps per session stays bounded).
	b.forgetKeyAsk(row.SessionID) // SessionArrived's first step
	if n := b.pendingKeyAsks(); n != 0 {
		t.Fatalf("%d key request schedules kept after the key arrived", n)
	}
	// A new run (a restart: the answer to the first request may have been dropped while ferry was down) asks at once.
	b2 := &Bridge{Crypto: c, Config: b.Config}
	n := c.requests()
	b2.requestKey(ctx, evt, row.SessionID)
	if c.requests() != n+1 {
		t.Fatalf("a new run did not ask at once")
	}
}

// A burst of events of one session whose key was lost: the first holds the room for key_wait, the others park at
// once instead of holding it for a key_wait each.
func TestLaterEventsOfAWaitedSessionParkAtOnce(t *testing.T) {
	c := &keyCrypto{benchCrypto: benchCrypto{plaintext: &event.Event{Type: event.EventMessage}}, arrived: make(chan struct{})}
	b := &Bridge{Crypto: c, Config: &Config{KeyWait: 600 * time.Millisecond}}
	evt, row := lostKeyEvent(t)
	ctx := context.Background()
	start := time.Now()
	if _, res, _ := b.decrypt(ctx, evt, row); res.state != database.InboxWaitingKeys {
		t.Fatalf("the first event: outcome %+v, want parked", res)
	}
	if waited := time.Since(start); waited < 500*time.Millisecond {
		t.Fatalf("the first event waited only %v for its key", waited)
	}
	start = time.Now()
	for range 5 {
		if _, res, _ := b.decrypt(ctx, evt, &database.InboxEvent{EventID: "$next", RoomID: row.RoomID, Raw: row.Raw, SessionID: "S"}); res.state != database.InboxWaitingKeys {
			t.Fatalf("a later event: outcome %+v, want parked", res)
		}
	}
	if waited := time.Since(start); waited > 300*time.Millisecond {
		t.Fatalf("5 later events of the session took %v to park: each waited for the key again", waited)
	}
}

func (b *Bridge) pendingKeyAsks() int {
	b.keyRequestsLock.Lock()
	defer b.keyRequestsLock.Unlock()
	return len(b.keyRequests)
}

// asKeyCrypto is keyCrypto on a homeserver that pushes to-device messages in transactions (appservice mode).
type asKeyCrypto struct{ *keyCrypto }

func (asKeyCrypto) AppserviceMode() bool { return true }

// In appservice mode ferry pings the homeserver before it asks again for a key (Synapse then counts it as up and
// stops dropping the answer), but not before the first request, and never where to-device messages come through
// /sync.
func TestKeyAskedAgainAfterAPingInAppserviceMode(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	evt, row := lostKeyEvent(t)
	const ping = "POST /_matrix/client/v1/appservice/{asID}/ping"
	for _, asMode := range []bool{true, false} {
		kc := &keyCrypto{benchCrypto: benchCrypto{plaintext: &event.Event{Type: event.EventMessage}}, arrived: make(chan struct{})}
		b := &Bridge{AS: f.br.AS, Config: f.br.Config, Crypto: kc}
		if asMode {
			b.Crypto = asKeyCrypto{kc}
		}
		before := f.hs.Counts()[ping]
		now := time.Now()
		b.requestKeyAt(ctx, evt, row.SessionID, now)
		if n := f.hs.Counts()[ping] - before; n != 0 {
			t.Errorf("appservice mode %v: %d pings before the first request, want none", asMode, n)
		}
		b.requestKeyAt(ctx, evt, row.SessionID, now.Add(keyAskFirst))
		want := int64(0)
		if asMode {
			want = 1
		}
		if n := f.hs.Counts()[ping] - before; n != want {
			t.Errorf("appservice mode %v: %d pings before asking again, want %d", asMode, n, want)
		}
		if kc.requests() != 2 {
			t.Errorf("appservice mode %v: %d requests, want 2", asMode, kc.requests())
		}
	}
}
