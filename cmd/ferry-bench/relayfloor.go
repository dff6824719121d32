package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// relayFloorResult is the durable relay floor at a fixed rate: the least CPU a relay spends per message
// when it keeps ferry's two promises (a pushed event is recorded durably before the homeserver is answered, and
// recorded done once its copy was sent, so that neither a crash nor a redelivery loses or doubles it) and
// re-encrypts: one insert, a Megolm decrypt, a Megolm encrypt, the copy's send, one update. It uses the raw
// Megolm primitives, one table keyed by event ID whose done update touches no index, plain net/http and JSON,
// and nothing else ferry does (no trust, ordering, event map, ghosts, metrics or logs); on its own fake
// homeserver and database, at the same rate as ferry's run, measured the same way.
type relayFloorResult struct {
	Offered     float64 `json:"offered_msgs_per_sec"`
	Messages    int     `json:"messages"`
	Relayed     int     `json:"relayed"`
	MachPerMsg  float64 `json:"machine_cpu_us_per_msg"`
	ProcPerMsg  float64 `json:"process_cpu_us_per_msg"`
	PGCPUPerMsg float64 `json:"postgres_cpu_us_per_msg"`
	StmtsPerMsg float64 `json:"pg_statements_per_msg"`
	CommitsMsg  float64 `json:"pg_commits_per_msg"`
	StealPct    float64 `json:"steal_pct"`
}

const floorTable = `CREATE TABLE floor_inbox (event_id TEXT PRIMARY KEY, raw TEXT, done BOOLEAN NOT NULL DEFAULT false)`

// relayFloor runs the durable relay floor at rate msg/s for dur.
func relayFloor(ctx context.Context, st settings, rate float64, dur time.Duration) (relayFloorResult, error) {
	res := relayFloorResult{Offered: rate, Messages: max(int(rate*dur.Seconds()), 1)}
	db, done, err := scratchDatabase(ctx, st, floorTable)
	if err != nil {
		return res, err
	}
	defer done()
	asToken, hsToken := randomToken(), randomToken()
	hs := fakehs.New(fakehs.Options{Domain: benchDomain, ASID: "floor", ASToken: asToken, HSToken: hsToken, ASBotLocalpart: "floorbot", Latency: st.hsLatency})
	defer hs.Close()
	bot := hs.BotID()
	sender := id.NewUserID("floorsender", benchDomain)
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	roomA := hs.CreateRoom(sender, fakehs.RoomOptions{Encryption: enc, Members: []id.UserID{bot}})
	roomB := hs.CreateRoom(bot, fakehs.RoomOptions{Encryption: enc})

	source, inbound, target, err := relaySessions()
	if err != nil {
		return res, err
	}
	f := &floorRelay{
		db: db, hsToken: hsToken, asToken: asToken, bot: bot, roomB: roomB, hsURL: hs.URL, client: hs.Client(),
		inbound: inbound, target: target, work: make(chan floorEvent, 1024)}
	srv := httptest.NewServer(http.HandlerFunc(f.serveTransaction))
	defer srv.Close()
	hs.SetAppserviceURL(srv.URL)
	workCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go f.worker(workCtx)

	// The messages, encrypted beforehand as the relay runs' are; a second's worth more first, unmeasured, so that
	// connections are open and the measured window starts from a steady state.
	warm := max(int(rate), 1)
	total := warm + res.Messages
	ids := make([]id.EventID, total)
	raws := make([]json.RawMessage, total)
	for i := range raws {
		plain, _ := json.Marshal(map[string]any{
			"type": "m.room.message", "room_id": roomA,
			"content": map[string]any{"msgtype": "m.text", "body": messageBody("relayfloor", i, st.payload)},
		})
		ct, err := source.Encrypt(plain)
		if err != nil {
			return res, err
		}
		ids[i] = fakehs.EventID("relayfloor", fmt.Sprint(i))
		raws[i], _ = json.Marshal(map[string]any{
			"event_id": ids[i], "room_id": roomA, "sender": sender, "type": "m.room.encrypted",
			"origin_server_ts": time.Now().UnixMilli(),
			"content": map[string]any{
				"algorithm": id.AlgorithmMegolmV1, "sender_key": "floorsenderkey", "device_id": "FLOOR",
				"session_id": source.ID(), "ciphertext": string(ct),
			},
		})
	}
	deliver := func(from, to int) {
		start := time.Now()
		for i := from; i < to && ctx.Err() == nil; i++ {
			waitForSlot(start, i-from, rate)
			hs.Deliver(ids[i:i+1], raws[i:i+1])
		}
	}
	deliver(0, warm)
	if err := f.wait(ctx, int64(warm), st.drain); err != nil {
		return res, err
	}
	// Postgres counts a backend's CPU when it exits: the references before this one closed theirs.
	time.Sleep(time.Second)
	runtime.GC()

	before := baseSnapshot()
	deliver(warm, total)
	err = f.wait(ctx, int64(total), st.drain)
	after := baseSnapshot()
	if err != nil {
		return res, err
	}
	res.Relayed = int(f.done.Load()) - warm
	// What a crash would have left: every message recorded, and recorded done.
	var recorded, pending int
	if err = db.QueryRow(ctx, `SELECT COUNT(*), COUNT(*) FILTER (WHERE NOT done) FROM floor_inbox`).Scan(&recorded, &pending); err != nil {
		return res, err
	}
	if recorded != total || pending != 0 {
		return res, fmt.Errorf("relay floor: %d of %d messages recorded, %d not recorded done", recorded, total, pending)
	}
	// Measured as the relay runs measure ferry.
	cpu := cpuBetween(before, after, res.Relayed)
	res.ProcPerMsg, res.PGCPUPerMsg, res.MachPerMsg, res.StealPct = cpu.proc, cpu.pg, cpu.mach, cpu.stealPct
	pg := after.pg.sub(before.pg)
	res.StmtsPerMsg = perMsg(float64(pg.Statements), res.Relayed)
	res.CommitsMsg = perMsg(float64(pg.Commits), res.Relayed)
	return res, nil
}

// floorEvent is a pushed event recorded and waiting for its copy.
type floorEvent struct {
	id         id.EventID
	ciphertext string
}

// floorRelay is the relay floor's appservice: the transaction handler and one worker.
type floorRelay struct {
	db               *dbutil.Database
	hsToken, asToken string
	bot              id.UserID
	roomB            id.RoomID
	hsURL            string
	client           *http.Client
	inbound          olm.InboundGroupSession
	target           olm.OutboundGroupSession
	work             chan floorEvent
	done             atomic.Int64
	failed           atomic.Pointer[error]
	txnSeq           atomic.Int64
}

// wait waits until the worker relayed want events in all, looking as often as the relay runs do for ferry's
// copies, and says why when it did not.
func (f *floorRelay) wait(ctx context.Context, want int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for f.done.Load() < want && f.failed.Load() == nil && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(2 * time.Millisecond)
	}
	if err := f.failed.Load(); err != nil {
		return *err
	}
	if done := f.done.Load(); done < want {
		return fmt.Errorf("relay floor: %d of %d messages relayed", done, want)
	}
	return ctx.Err()
}

// serveTransaction records the transaction's events (one statement) before it answers, then queues them. The
// relay's own copies come back as echoes and are only read.
func (f *floorRelay) serveTransaction(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+f.hsToken {
		http.Error(w, `{"errcode":"M_FORBIDDEN"}`, http.StatusForbidden)
		return
	}
	var txn struct {
		Events []json.RawMessage `json:"events"`
	}
	if err := json.NewDecoder(r.Body).Decode(&txn); err != nil {
		http.Error(w, `{"errcode":"M_NOT_JSON"}`, http.StatusBadRequest)
		return
	}
	var rows []floorEvent
	var query strings.Builder
	var args []any
	for _, raw := range txn.Events {
		var evt struct {
			ID      id.EventID `json:"event_id"`
			Sender  id.UserID  `json:"sender"`
			Type    string     `json:"type"`
			Content struct {
				Ciphertext string `json:"ciphertext"`
			} `json:"content"`
		}
		if json.Unmarshal(raw, &evt) != nil || evt.Sender == f.bot || evt.Type != "m.room.encrypted" {
			continue
		}
		if len(rows) > 0 {
			query.WriteByte(',')
		}
		fmt.Fprintf(&query, "($%d, $%d)", len(args)+1, len(args)+2)
		args = append(args, evt.ID, string(raw))
		rows = append(rows, floorEvent{id: evt.ID, ciphertext: evt.Content.Ciphertext})
	}
	if len(rows) > 0 {
		if _, err := f.db.Exec(r.Context(), `INSERT INTO floor_inbox (event_id, raw) VALUES `+query.String()+` ON CONFLICT (event_id) DO NOTHING`, args...); err != nil {
			http.Error(w, `{"errcode":"M_UNKNOWN"}`, http.StatusInternalServerError)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte("{}"))
	for _, row := range rows {
		f.work <- row
	}
}

// worker decrypts each recorded event, encrypts its content for the other room, sends the copy and records the
// event done.
func (f *floorRelay) worker(ctx context.Context) {
	for {
		var evt floorEvent
		select {
		case evt = <-f.work:
		case <-ctx.Done():
			return
		}
		if err := f.relay(ctx, evt); err != nil {
			f.failed.CompareAndSwap(nil, &err)
			return
		}
		f.done.Add(1)
	}
}

func (f *floorRelay) relay(ctx context.Context, evt floorEvent) error {
	plain, _, err := f.inbound.Decrypt([]byte(evt.ciphertext))
	if err != nil {
		return fmt.Errorf("relay floor: decrypt: %w", err)
	}
	var orig struct {
		Type    string          `json:"type"`
		Content json.RawMessage `json:"content"`
	}
	if err = json.Unmarshal(plain, &orig); err != nil {
		return fmt.Errorf("relay floor: plaintext: %w", err)
	}
	copyPlain, _ := json.Marshal(map[string]any{"type": orig.Type, "content": orig.Content, "room_id": f.roomB})
	ct, err := f.target.Encrypt(copyPlain)
	if err != nil {
		return fmt.Errorf("relay floor: encrypt: %w", err)
	}
	body, _ := json.Marshal(map[string]any{
		"algorithm": id.AlgorithmMegolmV1, "sender_key": "floorbotkey", "device_id": "FLOORBOT",
		"session_id": f.target.ID(), "ciphertext": string(ct),
	})
	u := fmt.Sprintf("%s/_matrix/client/v3/rooms/%s/send/m.room.encrypted/floor%d", f.hsURL, url.PathEscape(f.roomB.String()), f.txnSeq.Add(1))
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+f.asToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := f.client.Do(req)
	if err != nil {
		return fmt.Errorf("relay floor: send: %w", err)
	}
	answer, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	var sent struct {
		EventID id.EventID `json:"event_id"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(answer, &sent) != nil || sent.EventID == "" {
		return fmt.Errorf("relay floor: send answered %d: %s", resp.StatusCode, answer)
	}
	if _, err = f.db.Exec(ctx, `UPDATE floor_inbox SET done=true, raw=NULL WHERE event_id=$1`, evt.id); err != nil {
		return fmt.Errorf("relay floor: record done: %w", err)
	}
	return nil
}
