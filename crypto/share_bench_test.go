package crypto

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
)

// Key-share benchmark (docs/BENCHMARKS.md, "Key sharing"):
//
//	FERRY_TEST_PG=... go test -tags goolm ./crypto/ -run '^$' -bench 'KeyShare|GhostDrain' -benchtime 5x
//
// One new outbound Megolm session is shared from a ghost's device (ferry's share path, durable state in
// Postgres) to N member devices over the fake homeserver, with the Olm sessions to those devices already there
// ("existing") or to be created from claimed one-time keys ("new"). The same run measures mautrix's
// OlmMachine.ShareGroupSession on its SQL store (same Postgres) and on its in-memory store. Members are
// cross-signed and the policy is cross-signed TOFU for both. After every share one member decrypts a message
// of the new session, so a broken share fails the benchmark. FERRY_KEYSHARE_SIZES overrides the sizes.

// shareRigs are built once per size for one top-level benchmark (with its cleanup), and reused by its
// sub-benchmarks.
var (
	shareRigs  = map[int]*benchRig{}
	rigsParent *testing.B
)

func resetRigs(parent *testing.B) {
	shareRigs, rigsParent = map[int]*benchRig{}, parent
}

type benchRig struct {
	*shareRig
	naiveSQL *crypto.OlmMachine
	naiveMem *crypto.OlmMachine
	memStore *crypto.MemoryStore
}

func benchSizes() []int {
	sizes := []int{10, 100, 1000}
	if env := os.Getenv("FERRY_KEYSHARE_SIZES"); env != "" {
		sizes = nil
		for _, s := range strings.Split(env, ",") {
			if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil && n > 0 {
				sizes = append(sizes, n)
			}
		}
	}
	return sizes
}

func getBenchRig(_ *testing.B, n int) *benchRig {
	if r := shareRigs[n]; r != nil {
		return r
	}
	b := rigsParent
	ctx := context.Background()
	start := time.Now()
	sr := newShareRig(b, dbtest.Postgres(b), n)
	r := &benchRig{shareRig: sr}
	if _, err := sr.ghost.devicesOf(ctx, sr.users); err != nil {
		b.Fatal(err)
	}
	// mautrix's own machines, one on its SQL store in the same database, one in memory.
	sqlStore := crypto.NewSQLCryptoStore(sr.db, dbutil.NoopLogger, "naive-sql", "", []byte(sharePickleKey))
	r.naiveSQL = r.naiveMachine(b, "naivesql", func(deviceID id.DeviceID) crypto.Store {
		sqlStore.DeviceID = deviceID
		return sqlStore
	})
	r.memStore = crypto.NewMemoryStore(nil)
	r.naiveMem = r.naiveMachine(b, "naivemem", func(id.DeviceID) crypto.Store { return r.memStore })
	b.Logf("set up %d cross-signed member devices in %s", n, time.Since(start).Round(time.Millisecond))
	shareRigs[n] = r
	return r
}

// naiveMachine logs a sender in and gives it an OlmMachine on the store, with the members' devices fetched.
func (r *benchRig) naiveMachine(b *testing.B, localpart string, store func(id.DeviceID) crypto.Store) *crypto.OlmMachine {
	ctx := context.Background()
	cli, err := mautrix.NewClient(r.srv.URL, "", "")
	if err != nil {
		b.Fatal(err)
	}
	cli.Client = r.srv.Client()
	cli.Log = zerolog.Nop()
	if _, err = cli.Login(ctx, &mautrix.ReqLogin{Type: mautrix.AuthTypePassword,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: localpart}, Password: "p", StoreCredentials: true}); err != nil {
		b.Fatal(err)
	}
	log := zerolog.Nop()
	mach := crypto.NewOlmMachine(cli, &log, store(cli.DeviceID), mautrix.NewMemoryStateStore().(crypto.StateStore))
	mach.SendKeysMinTrust = id.TrustStateCrossSignedTOFU
	mach.DisableDeviceChangeKeyRotation = true
	if err = mach.Load(ctx); err != nil {
		b.Fatal(err)
	}
	if err = mach.ShareKeys(ctx, -1); err != nil {
		b.Fatal(err)
	}
	if _, err = mach.FetchKeys(ctx, r.users, true); err != nil {
		b.Fatal(err)
	}
	return mach
}

// verify has the last member decrypt a message encrypted by the sender's newest session in the room.
func (r *benchRig) verify(b *testing.B, sender id.UserID, mach *crypto.OlmMachine) {
	ctx := context.Background()
	u := r.members[len(r.members)-1]
	u.ReceiveToDevice(ctx)
	body := "check " + string(sender)
	enc, err := mach.EncryptMegolmEvent(ctx, r.room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
	if err != nil {
		b.Fatal(err)
	}
	evt := &event.Event{ID: "$check", RoomID: r.room, Sender: sender, Type: event.EventEncrypted, Content: event.Content{Parsed: enc}}
	dec, err := u.Decrypt(ctx, evt)
	if err != nil || dec.Content.AsMessage().Body != body {
		b.Fatalf("%s cannot decrypt the shared session: %v", u.ID, err)
	}
}

func BenchmarkKeyShare(b *testing.B) {
	resetRigs(b)
	for _, n := range benchSizes() {
		for _, olm := range []string{"existing", "new"} {
			b.Run(fmt.Sprintf("devices=%d/olm=%s/ferry", n, olm), func(b *testing.B) {
				r := getBenchRig(b, n)
				ctx := context.Background()
				var phases [4]time.Duration
				if olm == "existing" {
					r.rotate(b)
					if _, err := r.ghost.share(ctx, r.room, r.users, r.policy()); err != nil {
						b.Fatal(err)
					}
				}
				r.benchLoop(b, func() {
					r.rotate(b)
					if olm == "new" {
						r.forgetOlm(b)
					}
				}, func() {
					stats, err := r.ghost.share(ctx, r.room, r.users, r.policy())
					if err != nil {
						b.Fatal(err)
					}
					phases[0] += stats.Load
					phases[1] += stats.Encrypt
					phases[2] += stats.Save
					phases[3] += stats.Send
				}, func() { r.verify(b, r.ghost.userID, r.ghost.mach) })
				for i, name := range []string{"load-ms/op", "encrypt-ms/op", "save-ms/op", "send-ms/op"} {
					b.ReportMetric(float64(phases[i].Microseconds())/1000/float64(b.N), name)
				}
			})
			b.Run(fmt.Sprintf("devices=%d/olm=%s/mautrix-sql", n, olm), func(b *testing.B) {
				r := getBenchRig(b, n)
				ctx := context.Background()
				mach := r.naiveSQL
				if olm == "existing" {
					r.naiveShare(b, mach)
				}
				r.benchLoop(b, func() {
					if err := mach.CryptoStore.RemoveOutboundGroupSession(ctx, r.room); err != nil {
						b.Fatal(err)
					}
					if olm == "new" {
						// A fresh store object: the SQL store caches Olm sessions in memory.
						if _, err := r.db.Exec(ctx, `DELETE FROM crypto_olm_session WHERE account_id='naive-sql'`); err != nil {
							b.Fatal(err)
						}
						store := crypto.NewSQLCryptoStore(r.db, dbutil.NoopLogger, "naive-sql", mach.Client.DeviceID, []byte(sharePickleKey))
						log := zerolog.Nop()
						fresh := crypto.NewOlmMachine(mach.Client, &log, store, mach.StateStore)
						fresh.SendKeysMinTrust = mach.SendKeysMinTrust
						fresh.DisableDeviceChangeKeyRotation = true
						if err := fresh.Load(ctx); err != nil {
							b.Fatal(err)
						}
						mach = fresh
						r.naiveSQL = fresh
					}
				}, func() {
					if err := mach.ShareGroupSession(ctx, r.room, r.users); err != nil {
						b.Fatal(err)
					}
				}, func() { r.verify(b, mach.Client.UserID, mach) })
			})
			b.Run(fmt.Sprintf("devices=%d/olm=%s/mautrix-memory", n, olm), func(b *testing.B) {
				r := getBenchRig(b, n)
				ctx := context.Background()
				if olm == "existing" {
					r.naiveShare(b, r.naiveMem)
				}
				r.benchLoop(b, func() {
					if err := r.memStore.RemoveOutboundGroupSession(ctx, r.room); err != nil {
						b.Fatal(err)
					}
					if olm == "new" {
						r.memStore.Sessions = make(map[id.SenderKey]crypto.OlmSessionList)
					}
				}, func() {
					if err := r.naiveMem.ShareGroupSession(ctx, r.room, r.users); err != nil {
						b.Fatal(err)
					}
				}, func() { r.verify(b, r.naiveMem.Client.UserID, r.naiveMem) })
			})
		}
	}
}

func (r *benchRig) naiveShare(b *testing.B, mach *crypto.OlmMachine) {
	ctx := context.Background()
	if err := mach.CryptoStore.RemoveOutboundGroupSession(ctx, r.room); err != nil {
		b.Fatal(err)
	}
	if err := mach.ShareGroupSession(ctx, r.room, r.users); err != nil {
		b.Fatal(err)
	}
	r.takeAll()
}

// benchLoop times share b.N times (prepare and check untimed) and reports the to-device messages and requests
// and the one-time key claims per share.
func (r *benchRig) benchLoop(b *testing.B, prepare, share, check func()) {
	r.takeAll()
	var msgs, sends, claims int64
	b.ResetTimer()
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		prepare()
		r.srv.ResetCounts()
		b.StartTimer()
		share()
		b.StopTimer()
		counts := r.srv.Counts()
		sends += counts["PUT /_matrix/client/v3/sendToDevice/{type}/{txnID}"]
		claims += counts["POST /_matrix/client/v3/keys/claim"]
		check()
		msgs += int64(r.takeAll()) + 1 // the member that checked consumed its own message
	}
	b.ReportMetric(float64(msgs)/float64(b.N), "to-device/op")
	b.ReportMetric(float64(sends)/float64(b.N), "send-requests/op")
	b.ReportMetric(float64(claims)/float64(b.N), "claims/op")
}

// BenchmarkGhostDrain measures one drain of a ghost device's to-device queue (ferry's side: sync token read,
// /sync, token write) with an empty queue and with 10 queued room keys, over the fake homeserver.
func BenchmarkGhostDrain(b *testing.B) {
	resetRigs(b)
	for _, queued := range []int{0, 10} {
		b.Run(fmt.Sprintf("queued=%d", queued), func(b *testing.B) {
			r := getBenchRig(b, benchSizes()[0])
			ctx := context.Background()
			if _, err := r.ghost.drain(ctx); err != nil {
				b.Fatal(err)
			}
			sender := r.members[0]
			b.ResetTimer()
			b.StopTimer()
			events := 0
			for i := 0; i < b.N; i++ {
				if queued > 0 {
					msgs := make(map[id.DeviceID]*event.Content)
					msgs[r.ghost.client.DeviceID] = &event.Content{Raw: map[string]any{"algorithm": id.AlgorithmOlmV1,
						"sender_key": "x", "ciphertext": map[string]any{}}}
					for j := 0; j < queued; j++ {
						if _, err := sender.Client.SendToDevice(ctx, event.ToDeviceEncrypted, &mautrix.ReqSendToDevice{
							Messages: map[id.UserID]map[id.DeviceID]*event.Content{r.ghost.userID: msgs}}); err != nil {
							b.Fatal(err)
						}
					}
				}
				b.StartTimer()
				stats, err := r.ghost.drain(ctx)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				events += stats.Events
			}
			if events != queued*b.N {
				b.Fatalf("drained %d events, want %d", events, queued*b.N)
			}
		})
	}
}
