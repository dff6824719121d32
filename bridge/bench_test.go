package bridge

// Go benchmarks of pieces of the relay hot path. The whole path, with real crypto, many rooms, latency
// percentiles and Postgres round trips, is measured by cmd/ferry-bench (see docs/BENCHMARKS.md); these isolate
// what can be measured one call at a time. No benchmark asserts a timing.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

// benchBody is a ~120-byte message body: with its envelope, a ~200-byte Megolm plaintext.
var benchBody = "bench " + strings.Repeat("x", 114)

func benchMessage() *event.Event {
	evt := &event.Event{
		ID: "$bench:example.org", RoomID: "!a:example.org", Sender: "@alice:example.org",
		Type: event.EventMessage, Timestamp: 1,
	}
	evt.Content.VeryRaw = json.RawMessage(`{"msgtype":"m.text","body":"` + benchBody + `","m.mentions":{}}`)
	_ = evt.Content.ParseRaw(evt.Type)
	return evt
}

// benchMapper resolves nothing: plain messages need no relation mapping.
type benchMapper struct{}

func (benchMapper) CopyOf(context.Context, id.EventID) (id.EventID, bool, error) {
	return "", false, nil
}

// BenchmarkTranslate: resolving and translating one decrypted text message for one target room (no event map
// lookups).
func BenchmarkTranslate(b *testing.B) {
	ctx := context.Background()
	evt := benchMessage()
	ghosts := GhostNamer{Prefix: "_ferry_", Domain: "ferry.example"}
	origin := Origin{EventID: evt.ID, RoomID: evt.RoomID, Instance: "ferry@ferry.example"}
	b.ReportAllocs()
	for b.Loop() {
		refs, err := Resolve(ctx, evt, benchMapper{}, ghosts)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := Translate(evt, refs, origin); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTxnID: deriving the deterministic transaction ID of a copy.
func BenchmarkTxnID(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		_ = TxnID("$YUwRidLecu_I-xhZ4RaN2j7RHvlUT-vJpfhQ8oI2gl0", "!OGEhHVWSdvArJzumhm:example.org")
	}
}

// BenchmarkParseEvent: rebuilding an m.room.encrypted event from its inbox row.
func BenchmarkParseEvent(b *testing.B) {
	row := &database.InboxEvent{Raw: []byte(`{"event_id":"$e1","room_id":"!r:ferry.test","sender":"@alice:ferry.test",` +
		`"type":"m.room.encrypted","origin_server_ts":1,"unsigned":{},"content":{"algorithm":"m.megolm.v1.aes-sha2",` +
		`"ciphertext":"` + strings.Repeat("A", 360) + `","session_id":"` + strings.Repeat("S", 43) +
		`","sender_key":"` + strings.Repeat("K", 43) + `","device_id":"DEVICE"}}`)}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseEvent(row); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIntake: the appservice transaction endpoint recording events in the Postgres inbox, for
// transactions of 1 and of 50 encrypted events (ns/op is per transaction; ns/event per event).
func BenchmarkIntake(b *testing.B) {
	for _, size := range []int{1, 50} {
		b.Run(fmt.Sprintf("events=%d", size), func(b *testing.B) {
			br := newBenchBridge(b, nil, "http://127.0.0.1:1")
			h := br.Router(nil)
			ciphertext := strings.Repeat("A", 360)
			n := 0
			b.ReportAllocs()
			for b.Loop() {
				var sb strings.Builder
				sb.WriteString(`{"events":[`)
				for i := range size {
					if i > 0 {
						sb.WriteByte(',')
					}
					n++
					fmt.Fprintf(&sb, `{"event_id":"$e%d","room_id":"!r:ferry.test","sender":"@alice:ferry.test","type":"m.room.encrypted",`+
						`"origin_server_ts":1,"content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"%s","session_id":"S","sender_key":"k","device_id":"D"}}`, n, ciphertext)
				}
				sb.WriteString(`]}`)
				rec := httptest.NewRecorder()
				req := httptest.NewRequest("PUT", fmt.Sprintf("/_matrix/app/v1/transactions/%d", n), strings.NewReader(sb.String()))
				req.Header.Set("Authorization", "Bearer "+benchHSToken)
				h.ServeHTTP(rec, req)
				if rec.Code != 200 {
					b.Fatalf("transaction answered %d: %s", rec.Code, rec.Body)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/event")
		})
	}
}

// benchCrypto stands in for the E2EE layer: Decrypt returns the message it was given, Encrypt a fixed
// ciphertext. It isolates the relay's own database and homeserver work from the cryptography.
type benchCrypto struct{ plaintext *event.Event }

func (c *benchCrypto) Decrypt(_ context.Context, evt *event.Event) (*event.Event, error) {
	dec := *c.plaintext
	dec.ID, dec.RoomID, dec.Sender, dec.Timestamp = evt.ID, evt.RoomID, evt.Sender, evt.Timestamp
	return &dec, nil
}

func (c *benchCrypto) WaitForKey(context.Context, *event.Event, time.Duration) bool { return true }
func (c *benchCrypto) RequestKey(context.Context, *event.Event) error               { return nil }
func (c *benchCrypto) HandleMemberEvent(context.Context, *event.Event) error        { return nil }
func (c *benchCrypto) Rotate(context.Context, id.RoomID) error                      { return nil }

func (c *benchCrypto) Encrypt(context.Context, id.UserID, id.RoomID, event.Type, *event.Content) (*event.EncryptedEventContent, error) {
	return &event.EncryptedEventContent{
		Algorithm: id.AlgorithmMegolmV1, MegolmCiphertext: []byte(strings.Repeat("A", 360)),
		SessionID: id.SessionID(strings.Repeat("S", 43)), SenderKey: id.SenderKey(strings.Repeat("K", 43)), DeviceID: "BENCH",
	}, nil
}

// BenchmarkRelayNoCrypto: one encrypted message through intake's inbox row, the room worker's handling
// (event map, link and state lookups, ghost checks, translation, send to a fake homeserver, event map write,
// inbox update) with the cryptography stubbed out, one message at a time on Postgres. It is the relay's
// per-message overhead beyond crypto and the lower bound of a room's serial latency.
func BenchmarkRelayNoCrypto(b *testing.B) {
	ctx := context.Background()
	const domain = "ferry.test"
	hs := fakehs.New(fakehs.Options{
		Domain: domain, ASID: "ferry", ASToken: "as", HSToken: benchHSToken, ASBotLocalpart: "ferrybot",
		ASUsers: regexp.MustCompile(`^@_ferry_.*:ferry\.test$`), NoEcho: true,
	})
	defer hs.Close()
	cr := &benchCrypto{plaintext: benchMessage()}
	br := newBenchBridge(b, cr, hs.URL)
	alice, bob, bot := id.UserID("@alice:"+domain), id.UserID("@bob:"+domain), br.AS.BotMXID()
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	roomA := hs.CreateRoom(alice, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{bot}})
	roomB := hs.CreateRoom(bob, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{bot}})
	for room, user := range map[id.RoomID]id.UserID{roomA: alice, roomB: bob} {
		for _, u := range []id.UserID{user, bot} {
			if err := br.StateStore.SetMembership(ctx, room, u, event.MembershipJoin); err != nil {
				b.Fatal(err)
			}
		}
		if err := br.StateStore.SetEncryptionEvent(ctx, room, enc); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := br.DB.Links.Join(ctx, "bench", roomA, roomB, alice, time.Now()); err != nil {
		b.Fatal(err)
	}
	n := 0
	relayOne := func() {
		n++
		raw, _ := json.Marshal(map[string]any{
			"event_id": fmt.Sprintf("$bench%d", n), "room_id": roomA, "sender": alice, "type": "m.room.encrypted",
			"origin_server_ts": 1, "content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
		})
		row := &database.InboxEvent{EventID: id.EventID(fmt.Sprintf("$bench%d", n)), RoomID: roomA, Sender: alice, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}
		if _, err := br.DB.Inbox.Insert(ctx, []*database.InboxEvent{row}); err != nil {
			b.Fatal(err)
		}
		rows, err := br.DB.Inbox.NextInRoom(ctx, roomA, workerBatch)
		if err != nil || len(rows) != 1 {
			b.Fatalf("inbox: %d rows, %v", len(rows), err)
		}
		bw := &batchWrites{}
		if !br.processRow(ctx, rows[0], bw) || !br.commitBatch(ctx, bw) {
			b.Fatal("processRow gave up")
		}
	}
	relayOne() // the ghost registers, joins and sets its profile once
	sends := hs.Counts()["PUT /_matrix/client/v3/rooms/{roomID}/send/{type}/{txnID}"]
	b.ReportAllocs()
	for b.Loop() {
		relayOne()
	}
	if got := hs.Counts()["PUT /_matrix/client/v3/rooms/{roomID}/send/{type}/{txnID}"] - sends; got != int64(b.N) {
		b.Fatalf("the fake homeserver received %d copies for %d messages", got, b.N)
	}
}

const benchHSToken = "hs-token-for-benchmarks"

// newBenchBridge builds a bridge on a fresh Postgres database without starting workers.
func newBenchBridge(b testing.TB, cr Crypto, hsURL string) *Bridge {
	b.Helper()
	return newBenchBridgeOn(b, cr, hsURL, dbtest.Postgres(b))
}

// newBenchBridgeOn is newBenchBridge on the given database.
func newBenchBridgeOn(b testing.TB, cr Crypto, hsURL string, root *dbutil.Database) *Bridge {
	b.Helper()
	ctx := context.Background()
	db := database.New(root, dbutil.NoopLogger)
	if err := db.Upgrade(ctx); err != nil {
		b.Fatal(err)
	}
	ss := sqlstatestore.NewSQLStateStore(root, dbutil.NoopLogger, false)
	if err := ss.Upgrade(ctx); err != nil {
		b.Fatal(err)
	}
	as := appservice.Create()
	as.HomeserverDomain = "ferry.test"
	as.Registration = &appservice.Registration{ID: "ferry", ServerToken: benchHSToken, AppToken: "as", SenderLocalpart: "ferrybot"}
	as.StateStore = ss
	if err := as.SetHomeserverURL(hsURL); err != nil {
		b.Fatal(err)
	}
	cfg := DefaultConfig()
	return New(zerolog.Nop(), &cfg, Permissions{"*": LevelRelay}, db, as, ss, cr)
}
