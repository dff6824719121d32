package bridge

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// sealCrypto stands in for the E2EE layer where a test must read back what ferry sent: its "ciphertext" carries
// the content, and DecryptOwn reads it.
type sealCrypto struct{ benchCrypto }

func (c *sealCrypto) Encrypt(_ context.Context, _ id.UserID, _ id.RoomID, _ event.Type, content *event.Content) (*event.EncryptedEventContent, error) {
	data, err := json.Marshal(content)
	if err != nil {
		return nil, err
	}
	return &event.EncryptedEventContent{
		Algorithm: id.AlgorithmMegolmV1, MegolmCiphertext: []byte(base64.RawStdEncoding.EncodeToString(data)),
		SessionID: id.SessionID(strings.Repeat("S", 43)), SenderKey: id.SenderKey(strings.Repeat("K", 43)), DeviceID: "SEAL",
	}, nil
}

func (c *sealCrypto) DecryptOwn(_ context.Context, evt *event.Event) (*event.Event, error) {
	enc, ok := evt.Content.Parsed.(*event.EncryptedEventContent)
	if !ok {
		return nil, errors.New("not encrypted")
	}
	data, err := base64.RawStdEncoding.DecodeString(string(enc.MegolmCiphertext))
	if err != nil {
		return nil, err
	}
	dec := &event.Event{ID: evt.ID, RoomID: evt.RoomID, Sender: evt.Sender, Type: event.EventMessage, Timestamp: evt.Timestamp}
	if err = json.Unmarshal(data, &dec.Content); err != nil {
		return nil, err
	}
	return dec, nil
}

// size counts the events the ledger holds.
func (l *sentLedger) size() int {
	l.lock.Lock()
	defer l.lock.Unlock()
	return len(l.byTxn)
}

// ghostEvents lists the IDs of the encrypted events from sender in room, oldest first.
func (f *relayFixture) ghostEvents(room id.RoomID, sender id.UserID) []id.EventID {
	var out []id.EventID
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			ID     id.EventID `json:"event_id"`
			Type   string     `json:"type"`
			Sender id.UserID  `json:"sender"`
		}
		_ = json.Unmarshal(raw, &e)
		if e.Type == "m.room.encrypted" && e.Sender == sender {
			out = append(out, e.ID)
		}
	}
	return out
}

// loseNextSend makes the next send into room B reach the homeserver under another transaction ID (so the
// homeserver will not recognise a repeat, as Dendrite does not for a request cut off before it answered) and
// drops the connection before ferry reads the answer. then runs after the homeserver posted the event.
func (f *relayFixture) loseNextSend(then func()) {
	f.failNextSend(then, nil)
}

// failNextSend is loseNextSend, but answers with reply (when not nil) instead of dropping the connection.
func (f *relayFixture) failNextSend(then func(), reply func(http.ResponseWriter, *http.Request)) {
	f.flaky.lock.Lock()
	defer f.flaky.lock.Unlock()
	f.flaky.script = []func(http.ResponseWriter, *http.Request){func(w http.ResponseWriter, r *http.Request) {
		r.URL.Path += "-forgotten"
		r.URL.RawPath = ""
		f.flaky.proxy.ServeHTTP(httptest.NewRecorder(), r)
		if then != nil {
			then()
		}
		if reply != nil {
			reply(w, r)
			return
		}
		if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
			_ = conn.Close()
		}
	}}
}

// TestUnansweredSendIsNotRepeated: a copy whose send reached the homeserver but got no answer is found in the
// target room before the retry, and recorded instead of being posted a second time. A 500 (Dendrite's answer when it stopped waiting for its room server, which may still post the event) is
// treated the same way.
func TestUnansweredSendIsNotRepeated(t *testing.T) {
	for name, reply := range map[string]func(http.ResponseWriter, *http.Request){
		"dropped": nil,
		"500":     answer(500, `{"errcode":"M_UNKNOWN","error":"Internal Server Error"}`),
	} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
			f.relayOne(t) // the ghost registers, joins and sets its profile once
			ghost := f.br.Ghosts.Ghost(f.alice)
			f.failNextSend(nil, reply)
			row := f.relayOne(t)
			if row.State != database.InboxDone {
				t.Fatalf("inbox state %q, want done", row.State)
			}
			sent := f.ghostEvents(f.roomB, ghost)
			if len(sent) != 2 {
				t.Fatalf("room B holds %d copies for 2 messages: the unanswered send was posted again", len(sent))
			}
			if c, err := f.br.DB.EventMap.Get(ctx, row.EventID, f.roomB); err != nil || c == nil || c.TargetEvent != sent[1] {
				t.Fatalf("the event map holds %+v (%v), want the unanswered copy %s", c, err, sent[1])
			}
		})
	}
}

// TestSendInFlightAtCrashIsNotRepeated: ferry dies while a copy's send is in flight; the homeserver posted it.
// At the next start (the running marker tells it was unclean) ferry reads back the target room and records that
// copy instead of posting it again. A clean stop leaves the marker at "no".
func TestSendInFlightAtCrashIsNotRepeated(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	f.relayOne(t)
	ghost := f.br.Ghosts.Ghost(f.alice)

	// The run that dies: it marks itself running, and its worker is stopped dead during the send.
	if _, err := f.br.markRunning(ctx); err != nil {
		t.Fatal(err)
	}
	crash, die := context.WithCancel(ctx)
	f.loseNextSend(die)
	evtID := id.EventID("$crash")
	raw, _ := json.Marshal(map[string]any{
		"event_id": evtID, "room_id": f.roomA, "sender": f.alice, "type": "m.room.encrypted", "origin_server_ts": 1,
		"content": map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "session_id": "S", "sender_key": "K", "device_id": "D"},
	})
	if _, err := f.br.DB.Inbox.Insert(ctx, []*database.InboxEvent{{EventID: evtID, RoomID: f.roomA, Sender: f.alice, Type: "m.room.encrypted", Raw: raw, State: database.InboxPending, ReceivedAt: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	rows, err := f.br.DB.Inbox.NextInRoom(ctx, f.roomA, workerBatch)
	if err != nil || len(rows) != 1 {
		t.Fatalf("inbox: %d rows, %v", len(rows), err)
	}
	bw := &batchWrites{}
	if f.br.processRow(context.WithValue(crash, batchKey{}, bw), rows[0], bw) {
		t.Fatal("the worker went on after its context ended")
	}
	sent := f.ghostEvents(f.roomB, ghost)
	if len(sent) != 2 {
		t.Fatalf("room B holds %d copies, want 2 (the second posted without ferry knowing)", len(sent))
	}
	// The memory of the run that died is gone with it.
	f.br.sent = sentLedger{}

	if err = f.br.Start(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		cur, err := f.br.DB.Inbox.Get(ctx, evtID)
		if err != nil {
			t.Fatal(err)
		}
		if cur.State == database.InboxDone {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the message is still %s 15 s after the restart", cur.State)
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.br.Stop()
	if got := f.ghostEvents(f.roomB, ghost); len(got) != 2 {
		t.Fatalf("room B holds %d copies after the restart, want 2: the copy sent before the crash was posted again", len(got))
	}
	if c, err := f.br.DB.EventMap.Get(ctx, evtID, f.roomB); err != nil || c == nil || c.TargetEvent != sent[1] {
		t.Fatalf("the event map holds %+v (%v), want the copy sent before the crash, %s", c, err, sent[1])
	}
	if v, _ := f.br.DB.KV.Get(ctx, runningKey); v != "no" {
		t.Fatalf("after Stop the running marker is %q, want no", v)
	}
}

// TestNoticeIsReadBack: the bot's notices (command replies included) carry their transaction ID, so the
// read-back after an unclean stop finds them; relayed copies are found by their origin marker; events from
// other users and events older than the pending work are not taken.
func TestNoticeIsReadBack(t *testing.T) {
	ctx := context.Background()
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: benchMessage()}})
	row := f.relayOne(t)
	notice, err := f.br.sendRenderedNotice(ctx, f.roomA, renderNotice("a reply"), row.EventID, "ferry_reply_readback")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := f.br.readBack(ctx, f.roomA, time.Now().Add(-time.Minute)); err != nil || n != 1 {
		t.Fatalf("read back %d events in room A (%v), want the notice", n, err)
	}
	if got, ok := f.br.sent.take(f.roomA, "ferry_reply_readback"); !ok || got != notice {
		t.Fatalf("the ledger has %q for the notice's transaction, want %s", got, notice)
	}
	if n, err := f.br.readBack(ctx, f.roomB, time.Now().Add(-time.Minute)); err != nil || n != 1 {
		t.Fatalf("read back %d events in room B (%v), want the copy", n, err)
	}
	copyEvt, _ := f.br.DB.EventMap.Get(ctx, row.EventID, f.roomB)
	if got, ok := f.br.sent.take(f.roomB, TxnID(row.EventID, f.roomB)); !ok || copyEvt == nil || got != copyEvt.TargetEvent {
		t.Fatalf("the ledger has %q for the copy, want %+v", got, copyEvt)
	}
	// Nothing older than the pending work is looked at.
	if n, err := f.br.readBack(ctx, f.roomB, time.Now().Add(time.Minute)); err != nil || n != 0 || f.br.sent.size() != 0 {
		t.Fatalf("read back %d events older than the cut-off (%v)", n, err)
	}
}

// TestLedgerIsPerRoom: what the read-back found in one room never stands for a send into another.
func TestLedgerIsPerRoom(t *testing.T) {
	var l sentLedger
	l.put("!a:x", "ferry_txn", "$inA")
	if _, ok := l.take("!b:x", "ferry_txn"); ok {
		t.Fatal("an event found in room A was taken for a send into room B")
	}
	if got, ok := l.take("!a:x", "ferry_txn"); !ok || got != "$inA" {
		t.Fatalf("take in room A = %q, %t", got, ok)
	}
	l.markUncertain("!a:x", "ferry_txn", time.Now())
	if _, ok := l.takeUncertain("!b:x", "ferry_txn"); ok {
		t.Fatal("an unanswered send into room A made a send into room B uncertain")
	}
	if _, ok := l.takeUncertain("!a:x", "ferry_txn"); !ok {
		t.Fatal("the unanswered send into room A was forgotten")
	}
}

// TestUserMarkersAreNotTrusted: a user's message carrying ferry's transaction marker (naming a send ferry is
// about to make) and a forged origin marker is relayed, its copy carries neither, and the read-back of the copy's
// room finds only the copy under its own transaction ID.
func TestUserMarkersAreNotTrusted(t *testing.T) {
	ctx := context.Background()
	forged := benchMessage()
	forged.Content = event.Content{Raw: map[string]any{
		"msgtype": "m.text", "body": "hi", txnKey: "ferry_reply_victim", "im.ferry.other": true,
		OriginKey: map[string]any{"event_id": "$victim", "room_id": "!elsewhere:x", "instance": "ferry@ferry.test"},
	}}
	f := newRelayFixtureWith(t, &sealCrypto{benchCrypto{plaintext: forged}})
	row := f.relayOne(t)
	copyEvt, _ := f.br.DB.EventMap.Get(ctx, row.EventID, f.roomB)
	if copyEvt == nil {
		t.Fatal("a message carrying ferry's markers was not relayed")
	}
	if n, err := f.br.readBack(ctx, f.roomB, time.Now().Add(-time.Minute)); err != nil || n != 1 {
		t.Fatalf("read back %d events in room B (%v), want the copy", n, err)
	}
	if _, ok := f.br.sent.take(f.roomB, "ferry_reply_victim"); ok {
		t.Fatal("the user's forged transaction marker was taken for ferry's own send")
	}
	if got, ok := f.br.sent.take(f.roomB, TxnID(row.EventID, f.roomB)); !ok || got != copyEvt.TargetEvent {
		t.Fatalf("the copy was read back as %q, %t", got, ok)
	}
}
