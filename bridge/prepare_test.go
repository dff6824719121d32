package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
)

// slowPreparer is an E2EE layer whose ghost devices take a while to prepare (registration, keys and
// cross-signing take a dozen homeserver requests); it counts how many are prepared at once.
type slowPreparer struct {
	sealCrypto
	lock          sync.Mutex
	ready         map[id.UserID]bool
	inFlight, max atomic.Int32
}

func (c *slowPreparer) PrepareSender(_ context.Context, sender id.UserID) error {
	c.lock.Lock()
	done := c.ready[sender]
	c.lock.Unlock()
	if done {
		return nil
	}
	n := c.inFlight.Add(1)
	for m := c.max.Load(); n > m && !c.max.CompareAndSwap(m, n); m = c.max.Load() {
	}
	time.Sleep(100 * time.Millisecond)
	c.inFlight.Add(-1)
	c.lock.Lock()
	c.ready[sender] = true
	c.lock.Unlock()
	return nil
}

// A message of nokey's never has its room key.
const nokey = id.UserID("@nokey:ferry.test")

func (c *slowPreparer) WaitForKey(_ context.Context, evt *event.Event, _ time.Duration) bool {
	return evt.Sender != nokey
}

func (c *slowPreparer) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	if evt.Sender == nokey {
		return nil, crypto.ErrKeyMissing
	}
	return c.sealCrypto.Decrypt(ctx, evt)
}

func (c *slowPreparer) SenderReady(sender id.UserID) bool {
	c.lock.Lock()
	defer c.lock.Unlock()
	return c.ready[sender]
}

// TestNewSendersArePreparedSideBySide: six members who never spoke write into a linked room at once. Their
// ghosts' devices are prepared side by side rather than one after another's message, and their copies still
// arrive in the order they wrote. Two more get no device and no ghost in room B: one blocked by the permissions,
// one whose message ferry cannot read (its room key never came).
func TestNewSendersArePreparedSideBySide(t *testing.T) {
	ctx := context.Background()
	cr := &slowPreparer{sealCrypto: sealCrypto{benchCrypto{plaintext: benchMessage()}}, ready: map[id.UserID]bool{}}
	f := newRelayFixtureWith(t, cr)
	blocked := id.UserID("@new6:ferry.test")
	f.br.SetPermissions(Permissions{"*": LevelRelay, string(blocked): LevelBlock})
	var written []id.EventID
	for i := range 8 {
		sender := id.UserID(fmt.Sprintf("@new%d:ferry.test", i))
		if i == 7 {
			sender = nokey
		}
		if err := f.br.StateStore.SetMembership(ctx, f.roomA, sender, event.MembershipJoin); err != nil {
			t.Fatal(err)
		}
		evtID := id.EventID(fmt.Sprintf("$new%d", i))
		raw, _ := json.Marshal(map[string]any{
			"event_id": evtID, "room_id": f.roomA, "sender": sender, "type": "m.room.encrypted", "origin_server_ts": 1 + i,
			"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
		})
		row := &database.InboxEvent{EventID: evtID, RoomID: f.roomA, Sender: sender, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
		if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
			t.Fatal(err)
		}
		if sender != blocked && sender != nokey {
			written = append(written, evtID)
		}
	}
	if err := f.br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer f.br.Stop()
	f.br.Notify(f.roomA)
	deadline := time.Now().Add(20 * time.Second)
	for _, evtID := range written {
		f.waitDone(t, evtID, deadline)
	}
	for _, u := range []id.UserID{blocked, nokey} {
		if cr.SenderReady(f.br.Ghosts.Ghost(u)) {
			t.Errorf("%s's ghost got a device", u)
		}
		if m := f.hs.Membership(f.roomB, f.br.Ghosts.Ghost(u)); m != "" {
			t.Errorf("%s's ghost is %q in room B", u, m)
		}
	}
	if m := cr.max.Load(); m < 2 {
		t.Errorf("the six new senders' devices were prepared one at a time (at most %d at once)", m)
	}
	var order []id.EventID
	for _, raw := range f.hs.Timeline(f.roomB) {
		evt := &event.Event{}
		if err := json.Unmarshal(raw, evt); err != nil || evt.Type != event.EventEncrypted {
			continue
		}
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			t.Fatal(err)
		}
		dec, err := cr.DecryptOwn(ctx, evt)
		if err != nil {
			t.Fatal(err)
		}
		if origin := OriginOf(&dec.Content); origin != nil {
			order = append(order, origin.EventID)
		}
	}
	if fmt.Sprint(order) != fmt.Sprint(written) {
		t.Fatalf("copies in room B in the order %v, want %v", order, written)
	}
}
