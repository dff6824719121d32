package bridge

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
)

// botEvent is an event of the bot in a room, with its content as ferry encrypted it (sealCrypto).
type botEvent struct {
	id      id.EventID
	typ     string // the type ferry encrypted (a status or a message)
	content map[string]any
}

// botEvents lists the bot's events in room, oldest first.
func (f *relayFixture) botEvents(t *testing.T, room id.RoomID) []botEvent {
	t.Helper()
	var out []botEvent
	for _, raw := range f.hs.Timeline(room) {
		var e struct {
			ID      id.EventID                  `json:"event_id"`
			Type    string                      `json:"type"`
			Sender  id.UserID                   `json:"sender"`
			Content event.EncryptedEventContent `json:"content"`
		}
		if json.Unmarshal(raw, &e) != nil || e.Type != event.EventEncrypted.Type || e.Sender != f.br.AS.BotMXID() {
			continue
		}
		data, err := base64.RawStdEncoding.DecodeString(string(e.Content.MegolmCiphertext))
		if err != nil {
			continue
		}
		var c map[string]any
		_ = json.Unmarshal(data, &c)
		typ := event.EventMessage.Type
		if _, ok := c["status"]; ok {
			typ = event.BeeperMessageStatus.Type
		}
		out = append(out, botEvent{id: e.ID, typ: typ, content: c})
	}
	return out
}

type statusSeen struct {
	about  id.EventID
	status event.MessageStatus
	reason event.MessageStatusReason
}

// statuses lists the com.beeper.message_send_status events the bot sent into room, oldest first.
func (f *relayFixture) statuses(t *testing.T, room id.RoomID) []statusSeen {
	t.Helper()
	var out []statusSeen
	for _, e := range f.botEvents(t, room) {
		if e.typ != event.BeeperMessageStatus.Type {
			continue
		}
		var c event.BeeperMessageStatusEventContent
		data, _ := json.Marshal(e.content)
		_ = json.Unmarshal(data, &c)
		if c.RelatesTo.Type != event.RelReference || c.Network != statusNetwork {
			t.Fatalf("status %s relates as %q on network %q", e.id, c.RelatesTo.Type, c.Network)
		}
		out = append(out, statusSeen{about: c.RelatesTo.EventID, status: c.Status, reason: c.Reason})
	}
	return out
}

// noticeAbout returns the bot's notice replying to evt that contains text, or fails.
func (f *relayFixture) noticeAbout(t *testing.T, room id.RoomID, evt id.EventID, text string) id.EventID {
	t.Helper()
	for _, e := range f.botEvents(t, room) {
		body, _ := e.content["body"].(string)
		rel, _ := e.content["m.relates_to"].(map[string]any)
		irt, _ := rel["m.in_reply_to"].(map[string]any)
		if e.content["msgtype"] == string(event.MsgNotice) && strings.Contains(body, text) && irt["event_id"] == string(evt) {
			return e.id
		}
	}
	t.Fatalf("no notice replying to %s with %q in %q", evt, text, f.notices(t, room))
	return ""
}

// TestStalledNoticeGoesWhenRelayed: the sender of a message whose send keeps failing is told (a notice replying to
// it, FAIL_RETRIABLE); once it is relayed the notice is redacted and its status is SUCCESS.
func TestStalledNoticeGoesWhenRelayed(t *testing.T) {
	f := newRelayFixtureWith(t, newScriptedCrypto())
	f.relayOne(t)
	f.flaky.lock.Lock()
	for range maxSendAttempts + 1 {
		f.flaky.script = append(f.flaky.script, answer(http.StatusTooManyRequests, `{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":1}`))
	}
	f.flaky.lock.Unlock()
	row := f.relayOne(t)
	notice := f.noticeAbout(t, f.roomA, row.EventID, "has not managed to relay this message")
	if !slices.Contains(f.redactions(f.roomA), notice) {
		t.Fatal("the stall notice stayed after the message was relayed")
	}
	want := []statusSeen{{row.EventID, event.MessageStatusRetriable, event.MessageStatusNetworkError}, {row.EventID, event.MessageStatusSuccess, ""}}
	if got := f.statuses(t, f.roomA); !slices.Equal(got, want) {
		t.Fatalf("statuses = %+v, want %+v", got, want)
	}
	if v, _ := f.br.DB.KV.Get(context.Background(), deliveryKey(row.EventID)); v != "" {
		t.Fatalf("a resolved status is still remembered: %q", v)
	}
}

// lateKeyCrypto cannot decrypt the events in missing until they are taken out.
type lateKeyCrypto struct {
	*scriptedCrypto
	missing map[id.EventID]bool
}

func (c *lateKeyCrypto) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	if c.missing[evt.ID] {
		return nil, crypto.ErrKeyMissing
	}
	return c.scriptedCrypto.Decrypt(ctx, evt)
}

func (c *lateKeyCrypto) WaitForKey(context.Context, *event.Event, time.Duration) bool { return false }

// parkedMessage records an encrypted message from alice in A whose key has not come: it is parked.
func parkedMessage(t *testing.T, f *relayFixture, cr *lateKeyCrypto, evtID id.EventID) *database.InboxEvent {
	t.Helper()
	cr.missing[evtID] = true
	f.process(t, encryptedFrom(evtID, f.roomA, f.alice))
	row, err := f.br.DB.Inbox.Get(context.Background(), evtID)
	if err != nil || row == nil || row.State != database.InboxWaitingKeys {
		t.Fatalf("the message was not parked: %+v, %v", row, err)
	}
	return row
}

// TestUndecryptableStatus: a message parked for its key gets a notice replying to it and FAIL_RETRIABLE; when the
// key comes and it relays, the notice goes and the status is SUCCESS. A message whose key never comes is given up:
// FAIL_PERMANENT, its notice replaced by the room's summary.
func TestUndecryptableStatus(t *testing.T) {
	cr := &lateKeyCrypto{scriptedCrypto: newScriptedCrypto(), missing: map[id.EventID]bool{}}
	f := newRelayFixtureWith(t, cr)
	f.br.Config.KeyWait = 10 * time.Millisecond
	ctx := context.Background()

	late := parkedMessage(t, f, cr, "$late")
	f.br.noticeMissingKey(ctx, late)
	f.br.noticeMissingKey(ctx, late) // the parked loop looks again: told once
	notice := f.noticeAbout(t, f.roomA, late.EventID, "could not decrypt a message from")
	if n := len(f.notices(t, f.roomA)); n != 1 {
		t.Fatalf("%d notices, want 1", n)
	}
	delete(cr.missing, late.EventID)
	if _, err := f.br.DB.Inbox.Wake(ctx, "S"); err != nil {
		t.Fatal(err)
	}
	rows, err := f.br.DB.Inbox.NextInRoom(ctx, f.roomA, workerBatch)
	if err != nil || len(rows) != 1 {
		t.Fatalf("woken rows = %d, %v", len(rows), err)
	}
	bw := &batchWrites{}
	if !f.br.processRow(ctx, rows[0], bw) || !f.br.commitBatch(ctx, bw) {
		t.Fatal("the worker gave up")
	}
	if !slices.Contains(f.redactions(f.roomA), notice) {
		t.Fatal("the missing-key notice stayed after the message relayed")
	}
	want := []statusSeen{{late.EventID, event.MessageStatusRetriable, event.MessageStatusUndecryptable}, {late.EventID, event.MessageStatusSuccess, ""}}
	if got := f.statuses(t, f.roomA); !slices.Equal(got, want) {
		t.Fatalf("statuses = %+v, want %+v", got, want)
	}

	never := parkedMessage(t, f, cr, "$never")
	f.br.noticeMissingKey(ctx, never)
	neverNotice := f.noticeAbout(t, f.roomA, never.EventID, "could not decrypt a message from")
	parked, err := f.br.DB.Inbox.Parked(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f.br.expireParked(ctx, parked, time.Now().Add(parkedExpiry+time.Hour))
	if !slices.Contains(f.redactions(f.roomA), neverNotice) {
		t.Fatal("the notice of a message given up stayed")
	}
	got := f.statuses(t, f.roomA)
	if last := got[len(got)-1]; last != (statusSeen{never.EventID, event.MessageStatusFail, event.MessageStatusUndecryptable}) {
		t.Fatalf("last status = %+v, want FAIL_PERMANENT for the message given up", last)
	}
	if notices := f.notices(t, f.roomA); !strings.Contains(notices[len(notices)-1], "gave up waiting for the room keys of 1 message(s)") {
		t.Fatalf("notices = %q", notices)
	}
	if v, _ := f.br.DB.KV.Get(ctx, deliveryKey(never.EventID)); v != "" {
		t.Fatalf("a message given up is still remembered: %q", v)
	}
}

// TestDeliveryNoticesReplace: a later problem of the same message replaces the notice about an earlier one (a
// stalled send that fails for good); a notice posted by an earlier ferry (legacy missing-key entry) still goes
// when its message relays.
func TestDeliveryNoticesReplace(t *testing.T) {
	f := newRelayFixtureWith(t, newScriptedCrypto())
	ctx := context.Background()
	d := delivery{room: f.roomA, event: "$m", sender: f.alice}
	f.br.tellSender(ctx, d, deliveryProblem{status: event.MessageStatusRetriable, reason: event.MessageStatusNetworkError, kind: "stalled", notice: renderNotice("still trying")})
	first := f.noticeAbout(t, f.roomA, "$m", "still trying")
	f.br.tellSender(ctx, d, deliveryProblem{status: event.MessageStatusFail, reason: event.MessageStatusNetworkError, kind: "gaveup", notice: renderNotice("gave up")})
	f.noticeAbout(t, f.roomA, "$m", "gave up")
	if !slices.Contains(f.redactions(f.roomA), first) {
		t.Fatal("the notice of the earlier problem stayed")
	}

	legacy, err := f.br.sendRenderedNotice(ctx, f.roomA, missingKeyNotice(f.alice), "", "legacy")
	if err != nil {
		t.Fatal(err)
	}
	if err = f.br.DB.KV.Set(ctx, legacyKeyNoticeKey("$old"), string(f.roomA)+" "+string(legacy)); err != nil {
		t.Fatal(err)
	}
	f.br.deliveredLate(ctx, &database.InboxEvent{EventID: "$old", RoomID: f.roomA, Sender: f.alice})
	if !slices.Contains(f.redactions(f.roomA), legacy) {
		t.Fatal("a missing-key notice of an earlier ferry stayed")
	}
}
