package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"time"

	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/internal/fakehs"
)

// floorResult is the crypto floor: one Megolm decrypt plus one Megolm encrypt of the same plaintext with the
// raw session primitives (goolm), no JSON event handling, no store.
type floorResult struct {
	Messages      int     `json:"messages"`
	PlaintextLen  int     `json:"plaintext_bytes"`
	PerMsgUs      float64 `json:"per_msg_us"` // decrypt + encrypt, median of 5 rounds
	DecryptUs     float64 `json:"decrypt_us"`
	EncryptUs     float64 `json:"encrypt_us"`
	Ed25519SignUs float64 `json:"ed25519_sign_us"`
	Ed25519VerUs  float64 `json:"ed25519_verify_us"`
}

// cryptoFloor measures, on one goroutine, decrypting a stream of Megolm messages from one session and
// re-encrypting each plaintext with another session, as a relay must at the very least.
func cryptoFloor(n int, plaintext []byte) (floorResult, error) {
	res := floorResult{Messages: n, PlaintextLen: len(plaintext)}
	const rounds = 5
	per := max(n/rounds, 1)
	var totals, decs, encs []float64
	for range rounds {
		source, inbound, target, err := relaySessions()
		if err != nil {
			return res, err
		}
		cts := make([][]byte, per)
		for i := range cts {
			if cts[i], err = source.Encrypt(plaintext); err != nil {
				return res, err
			}
		}
		pts := make([][]byte, per)
		runtime.GC()
		start := time.Now()
		for i, ct := range cts {
			if pts[i], _, err = inbound.Decrypt(ct); err != nil {
				return res, err
			}
		}
		mid := time.Now()
		for _, pt := range pts {
			if _, err = target.Encrypt(pt); err != nil {
				return res, err
			}
		}
		end := time.Now()
		dec := float64(mid.Sub(start).Microseconds()) / float64(per)
		enc := float64(end.Sub(mid).Microseconds()) / float64(per)
		decs, encs, totals = append(decs, dec), append(encs, enc), append(totals, dec+enc)
	}
	res.PerMsgUs, res.DecryptUs, res.EncryptUs = median(totals), median(decs), median(encs)

	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	const sigs = 2000
	var sig []byte
	start := time.Now()
	for range sigs {
		sig = ed25519.Sign(priv, plaintext)
	}
	res.Ed25519SignUs = float64(time.Since(start).Microseconds()) / sigs
	start = time.Now()
	for range sigs {
		if !ed25519.Verify(pub, plaintext, sig) {
			return res, errors.New("ed25519 verify failed")
		}
	}
	res.Ed25519VerUs = float64(time.Since(start).Microseconds()) / sigs
	return res, nil
}

// relaySessions are the Megolm sessions a relay works with: a sender's outbound session, the relay's inbound copy
// of it, and the relay's own outbound session for the other room.
func relaySessions() (source olm.OutboundGroupSession, inbound olm.InboundGroupSession, target olm.OutboundGroupSession, err error) {
	if source, err = olm.NewOutboundGroupSession(); err != nil {
		return
	}
	if inbound, err = olm.NewInboundGroupSession([]byte(source.Key())); err != nil {
		return
	}
	target, err = olm.NewOutboundGroupSession()
	return
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// megolmPlaintext is the plaintext a Megolm message of this benchmark carries (what the floor encrypts).
func megolmPlaintext(payload int) []byte {
	data, _ := json.Marshal(map[string]any{
		"type":    "m.room.message",
		"content": map[string]any{"msgtype": "m.text", "body": messageBody("floor", 0, payload)},
		"room_id": "!0123456789abcdefgh:" + benchDomain,
	})
	return data
}

// naiveResult is the naive path: mautrix's OlmMachine decrypting and re-encrypting each message on its SQL
// store in Postgres, one message after another, as bridges do today.
type naiveResult struct {
	Messages    int          `json:"messages"`
	PerMsgMs    float64      `json:"per_msg_ms"`
	StmtsPerMsg float64      `json:"pg_statements_per_msg"`
	CommitsMsg  float64      `json:"pg_commits_per_msg"`
	TripsPerMsg float64      `json:"pg_round_trips_per_msg"`
	WaitPerMsg  float64      `json:"pg_wait_us_per_msg"`
	CPUPerMsgUs float64      `json:"process_cpu_us_per_msg"`
	PGCPUPerMsg float64      `json:"postgres_cpu_us_per_msg"`
	MachPerMsg  float64      `json:"machine_cpu_us_per_msg"`
	AllocsMsg   float64      `json:"allocs_per_msg"`
	Top         []queryCount `json:"pg_top_statements"`
}

// naivePath measures the naive relay on a fresh database: a bot device on SQLCryptoStore (mautrix defaults,
// shared-session tracking on), one sender and one cross-signed receiver.
func naivePath(ctx context.Context, st settings, n int) (naiveResult, error) {
	res := naiveResult{Messages: n}
	bdb, err := createDatabase(st.adminURL)
	if err != nil {
		return res, err
	}
	defer bdb.drop()
	hs := fakehs.New(fakehs.Options{Domain: benchDomain})
	defer hs.Close()
	mcrypto.PostgresArrayWrapper = pq.Array
	root, err := dbutil.NewWithDialect(bdb.uri, pgDriverName)
	if err != nil {
		return res, err
	}
	defer root.Close()
	ss := sqlstatestore.NewSQLStateStore(root, dbutil.NoopLogger, false)
	if err = ss.Upgrade(ctx); err != nil {
		return res, err
	}
	botID := id.NewUserID("naivebot", benchDomain)
	cli, err := mautrix.NewClient(hs.URL, "", "")
	if err != nil {
		return res, err
	}
	cli.Client = hs.Client()
	cli.Log = zerolog.Nop()
	if _, err = cli.Login(ctx, &mautrix.ReqLogin{Type: mautrix.AuthTypePassword, Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: botID.String()}, Password: benchPassword, StoreCredentials: true}); err != nil {
		return res, err
	}
	cs := mcrypto.NewSQLCryptoStore(root, dbutil.NoopLogger, "naive", cli.DeviceID, []byte(randomToken()))
	if err = cs.DB.Upgrade(ctx); err != nil {
		return res, err
	}
	nop := zerolog.Nop()
	mach := mcrypto.NewOlmMachine(cli, &nop, cs, ss)
	if err = mach.Load(ctx); err != nil {
		return res, err
	}
	if err = mach.ShareKeys(ctx, -1); err != nil {
		return res, err
	}
	sender, err := hs.NewUser(ctx, id.NewUserID("nsender", benchDomain), fakehs.UserOptions{CrossSign: true})
	if err != nil {
		return res, err
	}
	receiver, err := hs.NewUser(ctx, id.NewUserID("nreceiver", benchDomain), fakehs.UserOptions{CrossSign: true})
	if err != nil {
		return res, err
	}
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1, RotationPeriodMessages: 100, RotationPeriodMillis: 7 * 24 * 3600 * 1000}
	roomA := hs.CreateRoom(sender.ID, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{botID}})
	roomB := hs.CreateRoom(receiver.ID, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{botID}})
	if err = sender.SetRoom(ctx, roomA, []id.UserID{sender.ID, botID}, enc); err != nil {
		return res, err
	}
	for room, users := range map[id.RoomID][]id.UserID{roomA: {sender.ID, botID}, roomB: {receiver.ID, botID}} {
		for _, u := range users {
			if err = ss.SetMembership(ctx, room, u, event.MembershipJoin); err != nil {
				return res, err
			}
		}
		if err = ss.SetEncryptionEvent(ctx, room, enc); err != nil {
			return res, err
		}
	}
	evts := make([]*event.Event, n+1)
	for i := range evts {
		content := &event.MessageEventContent{MsgType: event.MsgText, Body: messageBody("naive", i, st.payload)}
		encrypted, _, err := sender.Encrypt(ctx, roomA, event.EventMessage, content)
		if err != nil {
			return res, err
		}
		evts[i] = &event.Event{
			ID: fakehs.EventID("naive", fmt.Sprint(i)), RoomID: roomA, Sender: sender.ID, Type: event.EventEncrypted,
			Timestamp: time.Now().UnixMilli(), Content: event.Content{Parsed: encrypted},
		}
	}
	for _, evt := range hs.TakeToDevice(botID, cli.DeviceID) {
		mach.HandleToDeviceEvent(ctx, evt)
	}
	relay := func(evt *event.Event) error {
		dec, err := mach.DecryptMegolmEvent(ctx, evt)
		if err != nil {
			return fmt.Errorf("naive decrypt: %w", err)
		}
		_, err = mach.EncryptMegolmEvent(ctx, roomB, dec.Type, &dec.Content)
		if errors.Is(err, mcrypto.ErrNoGroupSession) || errors.Is(err, mcrypto.ErrSessionExpired) || errors.Is(err, mcrypto.ErrSessionNotShared) {
			if err = mach.ShareGroupSession(ctx, roomB, []id.UserID{receiver.ID, botID}); err != nil {
				return fmt.Errorf("naive share: %w", err)
			}
			_, err = mach.EncryptMegolmEvent(ctx, roomB, dec.Type, &dec.Content)
		}
		if err != nil {
			return fmt.Errorf("naive encrypt: %w", err)
		}
		return nil
	}
	// The first message creates the Olm session to the receiver and the first outbound session: setup.
	if err = relay(evts[0]); err != nil {
		return res, err
	}
	before := baseSnapshot()
	for _, evt := range evts[1:] {
		if err = relay(evt); err != nil {
			return res, err
		}
	}
	after := baseSnapshot()
	pg := after.pg.sub(before.pg)
	res.PerMsgMs = ms(after.at.Sub(before.at)) / float64(n)
	res.StmtsPerMsg = perMsg(float64(pg.Statements), n)
	res.TripsPerMsg = perMsg(float64(pg.RoundTrips), n)
	res.CommitsMsg = perMsg(float64(pg.Commits), n)
	res.WaitPerMsg = perMsg(float64(pg.Wait.Microseconds()), n)
	res.CPUPerMsgUs = perMsg(float64((after.procCPU - before.procCPU).Microseconds()), n)
	res.PGCPUPerMsg = perMsg(float64((after.pgCPU - before.pgCPU).Microseconds()), n)
	res.MachPerMsg = perMsg(float64(after.machBusy-before.machBusy)/clockTicks*1e6, n)
	res.AllocsMsg = perMsg(float64(after.mallocs-before.mallocs), n)
	res.Top = pg.top(10)
	return res, nil
}

// pgBaseline is what one statement costs on this machine through lib/pq, one at a time on one connection.
type pgBaseline struct {
	SelectUs       float64 `json:"select_us"`
	SelectTrips    float64 `json:"select_round_trips"`
	SelectPGCPUUs  float64 `json:"select_postgres_cpu_us"`
	SelectProcCPU  float64 `json:"select_process_cpu_us"`
	InsertUs       float64 `json:"autocommit_insert_us"`
	InsertPGCPUUs  float64 `json:"autocommit_insert_postgres_cpu_us"`
	InsertProcCPU  float64 `json:"autocommit_insert_process_cpu_us"`
	BatchRowUs     float64 `json:"batched_insert_us_per_row"`
	BatchRowPGCPU  float64 `json:"batched_insert_postgres_cpu_us_per_row"`
	BatchRowsPerTx int     `json:"batched_rows_per_statement"`
}

// scratchDatabase creates a fresh database with one table (schema), opened through the counting driver; done
// closes and drops it.
func scratchDatabase(ctx context.Context, st settings, schema string) (db *dbutil.Database, done func(), err error) {
	bdb, err := createDatabase(st.adminURL)
	if err != nil {
		return nil, nil, err
	}
	if db, err = dbutil.NewWithDialect(bdb.uri, pgDriverName); err == nil {
		if _, err = db.Exec(ctx, schema); err != nil {
			_ = db.Close()
		}
	}
	if err != nil {
		bdb.drop()
		return nil, nil, err
	}
	return db, func() { _ = db.Close(); bdb.drop() }, nil
}

// postgresBaseline times a trivial parameterised SELECT, a one-row autocommit INSERT (one WAL flush each) and
// rows inserted 100 per statement, so per-message statement counts translate into time.
func postgresBaseline(ctx context.Context, st settings) (pgBaseline, error) {
	var res pgBaseline
	db, done, err := scratchDatabase(ctx, st, `CREATE TABLE baseline (id BIGINT PRIMARY KEY, v TEXT NOT NULL)`)
	if err != nil {
		return res, err
	}
	defer done()
	db.RawDB.SetMaxOpenConns(1)
	measure := func(n int, fn func(i int) error) (wall, trips, pgCPU, procCPU float64, err error) {
		before := baseSnapshot()
		for i := range n {
			if err = fn(i); err != nil {
				return
			}
		}
		after := baseSnapshot()
		pg := after.pg.sub(before.pg)
		wall = float64(after.at.Sub(before.at).Microseconds()) / float64(n)
		trips = float64(pg.RoundTrips) / float64(n)
		pgCPU = float64((after.pgCPU - before.pgCPU).Microseconds()) / float64(n)
		procCPU = float64((after.procCPU - before.procCPU).Microseconds()) / float64(n)
		return
	}
	const selects, inserts, batches, perBatch = 3000, 1000, 20, 100
	var v int
	res.SelectUs, res.SelectTrips, res.SelectPGCPUUs, res.SelectProcCPU, err = measure(selects, func(i int) error {
		return db.QueryRow(ctx, `SELECT $1::int`, i).Scan(&v)
	})
	if err != nil {
		return res, err
	}
	payload := messageBody("baseline", 0, st.payload)
	res.InsertUs, _, res.InsertPGCPUUs, res.InsertProcCPU, err = measure(inserts, func(i int) error {
		_, err := db.Exec(ctx, `INSERT INTO baseline (id, v) VALUES ($1, $2)`, i, payload)
		return err
	})
	if err != nil {
		return res, err
	}
	query := `INSERT INTO baseline (id, v) VALUES `
	for j := range perBatch {
		if j > 0 {
			query += ","
		}
		query += fmt.Sprintf("($%d, $%d)", 2*j+1, 2*j+2)
	}
	res.BatchRowsPerTx = perBatch
	wall, _, pgCPU, _, err := measure(batches, func(i int) error {
		args := make([]any, 0, 2*perBatch)
		for j := range perBatch {
			args = append(args, inserts+i*perBatch+j, payload)
		}
		_, err := db.Exec(ctx, query, args...)
		return err
	})
	res.BatchRowUs, res.BatchRowPGCPU = wall/perBatch, pgCPU/perBatch
	return res, err
}
