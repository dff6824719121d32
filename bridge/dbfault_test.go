package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/faultproxy"
)

// dbCrypto is benchCrypto whose Decrypt and HandleMemberEvent read the database first, as the real E2EE layer's
// do (crypto store, state store): while the database is away, Decrypt fails with the database's error and
// HandleMemberEvent cannot rotate.
type dbCrypto struct {
	benchCrypto
	db      *dbutil.Database
	rotated atomic.Int32
}

func (c *dbCrypto) query(ctx context.Context) error {
	var one int
	return c.db.QueryRow(ctx, `SELECT 1`).Scan(&one)
}

func (c *dbCrypto) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	if err := c.query(ctx); err != nil {
		return nil, fmt.Errorf("failed to get group session: %w", err)
	}
	return c.benchCrypto.Decrypt(ctx, evt)
}

func (c *dbCrypto) HandleMemberEvent(ctx context.Context, _ *event.Event) error {
	if err := c.query(ctx); err != nil {
		return err
	}
	c.rotated.Add(1)
	return nil
}

// newDBFaultFixture is a relay fixture whose database the test can take away (proxy.Down) and bring back.
func newDBFaultFixture(t *testing.T) (*relayFixture, *dbCrypto, *faultproxy.TCP) {
	root, proxy := dbtest.PostgresThroughProxy(t)
	cr := &dbCrypto{benchCrypto: benchCrypto{plaintext: benchMessage()}, db: root}
	return newRelayFixtureOn(t, cr, root), cr, proxy
}

// processWhileDatabaseAway records an event of room A and hands it to the worker with the database gone; it
// comes back after a second and a half. It returns the event's inbox row once the worker is done with it.
func (f *relayFixture) processWhileDatabaseAway(t *testing.T, proxy *faultproxy.TCP, evt map[string]any) *database.InboxEvent {
	t.Helper()
	ctx := context.Background()
	raw, _ := json.Marshal(evt)
	evtID := id.EventID(evt["event_id"].(string))
	row := &database.InboxEvent{EventID: evtID, RoomID: f.roomA, Sender: id.UserID(fmt.Sprint(evt["sender"])), Type: evt["type"].(string), Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
	if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
		t.Fatal(err)
	}
	rows, err := f.br.DB.Inbox.NextInRoom(ctx, f.roomA, workerBatch)
	if err != nil || len(rows) != 1 {
		t.Fatalf("inbox: %d rows, %v", len(rows), err)
	}
	proxy.Down()
	back := time.AfterFunc(1500*time.Millisecond, proxy.Up)
	defer back.Stop()
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

// TestDecryptDatabaseErrorIsRetried: decryption that fails because the database went away (PostgreSQL
// restarting) is retried until the database is back; the message relays, and is never marked failed.
func TestDecryptDatabaseErrorIsRetried(t *testing.T) {
	f, _, proxy := newDBFaultFixture(t)
	f.relayOne(t)
	row := f.processWhileDatabaseAway(t, proxy, map[string]any{
		"event_id": "$while-db-away", "room_id": f.roomA, "sender": f.alice, "type": "m.room.encrypted", "origin_server_ts": 1,
		"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
	})
	if row.State != database.InboxDone {
		t.Fatalf("inbox state %q (%s), want done", row.State, row.LastError)
	}
	if got := f.copiesIn(f.roomB, f.br.Ghosts.Ghost(f.alice)); got != 2 {
		t.Fatalf("room B holds %d copies for 2 messages", got)
	}
}

// TestStateDatabaseErrorIsRetried: a member leaving while the database is away is applied once it is back: the
// state store learns the leave (so the member gets no more keys) and the room's sessions rotate.
func TestStateDatabaseErrorIsRetried(t *testing.T) {
	ctx := context.Background()
	f, cr, proxy := newDBFaultFixture(t)
	bob := id.UserID("@bob:ferry.test")
	if err := f.br.StateStore.SetMembership(ctx, f.roomA, bob, event.MembershipJoin); err != nil {
		t.Fatal(err)
	}
	row := f.processWhileDatabaseAway(t, proxy, map[string]any{
		"event_id": "$bob-leaves", "room_id": f.roomA, "sender": bob, "type": "m.room.member", "state_key": bob, "origin_server_ts": 1,
		"content": map[string]any{"membership": "leave"}, "unsigned": map[string]any{"prev_content": map[string]any{"membership": "join"}},
	})
	if row.State != database.InboxDone {
		t.Fatalf("inbox state %q (%s), want done", row.State, row.LastError)
	}
	if m, err := f.br.StateStore.GetMembership(ctx, f.roomA, bob); err != nil || m != event.MembershipLeave {
		t.Fatalf("the state store has bob %q (%v) in room A, want leave", m, err)
	}
	if cr.rotated.Load() == 0 {
		t.Fatal("the room's sessions were not rotated after bob left")
	}
}
