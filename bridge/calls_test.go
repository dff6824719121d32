package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

// The call fixtures live in testdata/calls: <case>.event.json is a call event shaped like the spec's examples,
// as it arrives (decrypted) in room !a; <case>.want.json is the content ferry must send into room !b, where the
// call has the ID callFixtureTarget, without the origin marker. Cases without a want file must fail as listed.
const callFixtures = "testdata/calls"

const callFixtureTarget = "1767225600123abcd-b"

var callCases = map[string]struct {
	age     time.Duration // how long before the relay the event was sent
	wantErr error
}{
	"invite":                      {age: 30 * time.Second},
	"invite_without_invitee":      {age: 30 * time.Second},
	"invite_without_lifetime":     {age: 30 * time.Second},
	"invite_version_0":            {age: 30 * time.Second},
	"invite_expired":              {age: 30 * time.Second, wantErr: errCallExpired},
	"invite_without_call_id":      {age: time.Second, wantErr: errCallMalformed},
	"candidates":                  {age: 30 * time.Second},
	"answer":                      {age: 30 * time.Second},
	"select_answer":               {age: 30 * time.Second},
	"reject":                      {age: 30 * time.Second},
	"negotiate":                   {age: 5 * time.Second},
	"sdp_stream_metadata_changed": {age: 30 * time.Second},
	"hangup":                      {age: 30 * time.Second},
}

func readCallFixture(t *testing.T, name string) *event.Event {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(callFixtures, name+".event.json"))
	if err != nil {
		t.Fatal(err)
	}
	var evt event.Event
	if err = json.Unmarshal(data, &evt); err != nil {
		t.Fatal(err)
	}
	evt.Type.Class = event.MessageEventType
	_ = evt.Content.ParseRaw(evt.Type)
	return &evt
}

// TestCallMapping runs every fixture through what relayTo does with a call event: Translate, then
// mapCallContent for the target room.
func TestCallMapping(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(callFixtures, "*.event.json"))
	if len(files) != len(callCases) {
		t.Fatalf("%d fixtures but %d table entries", len(files), len(callCases))
	}
	for name, tc := range callCases {
		t.Run(name, func(t *testing.T) {
			evt := readCallFixture(t, name)
			evtType, content, err := resolveAndTranslate(evt, newFakeMapper(), testOrigin(evt))
			if err != nil {
				t.Fatalf("Translate: %v", err)
			}
			if !isLegacyCall(evtType) {
				t.Fatalf("%s is not treated as a 1:1 call event", evtType.Type)
			}
			sentAt := time.UnixMilli(evt.Timestamp)
			err = mapCallContent(evtType.Type, content.Raw, callFixtureTarget, sentAt, sentAt.Add(tc.age), testNamer.Counterpart)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("got error %v, want %v", err, tc.wantErr)
				}
				return
			} else if err != nil {
				t.Fatalf("mapCallContent: %v", err)
			}
			data, err := os.ReadFile(filepath.Join(callFixtures, name+".want.json"))
			if err != nil {
				t.Fatal(err)
			}
			var want map[string]any
			if err = json.Unmarshal(data, &want); err != nil {
				t.Fatal(err)
			}
			got := map[string]any{}
			for k, v := range content.Raw {
				got[k] = v
			}
			if _, ok := got[OriginKey]; !ok {
				t.Error("the origin marker is missing")
			}
			delete(got, OriginKey)
			if !reflect.DeepEqual(got, want) {
				g, _ := json.MarshalIndent(got, "", "  ")
				t.Errorf("content mismatch\n got: %s\nwant: %s", g, data)
			}
			// party_id is never rewritten: each device keeps its party on both sides.
			orig := contentRaw(evt)
			if orig["party_id"] != got["party_id"] {
				t.Errorf("party_id changed from %v to %v", orig["party_id"], got["party_id"])
			}
		})
	}
}

func TestCopyCallID(t *testing.T) {
	grammar := regexp.MustCompile(`^[0-9a-zA-Z._~-]{1,255}$`)
	long := strings.Repeat("x", 255)
	seen := map[string]bool{}
	for _, original := range []string{"1767225600123abcd", "1767225600123abcd", "c0ffee.call~1", long} {
		got := copyCallID(original)
		if !grammar.MatchString(got) {
			t.Errorf("copy of %q is %q, outside the call_id grammar", original, got)
		}
		// Unpredictable: the same original gets another suffix every time, so nobody can compute a copy's ID.
		if got == original || seen[got] || got == copyCallID(original) {
			t.Errorf("copy of %q is %q, not unique", original, got)
		}
		seen[got] = true
		if original != long && !strings.HasPrefix(got, original+"-") {
			t.Errorf("copy %q does not keep the original %q as its prefix", got, original)
		}
		if suffix := got[strings.LastIndexByte(got, '-')+1:]; len(suffix) != 2*copyCallIDRandomBytes {
			t.Errorf("copy %q has a suffix of %d characters", got, len(suffix))
		}
	}
}

// TestCallParty: who may act on a call, where.
func TestCallParty(t *testing.T) {
	const alice, bob, carol = id.UserID("@alice:x"), id.UserID("@bob:x"), id.UserID("@carol:x")
	ringing := &database.Call{OriginRoom: "!a", Caller: alice}
	named := &database.Call{OriginRoom: "!a", Caller: alice, Invitee: bob}
	answered := &database.Call{OriginRoom: "!a", Caller: alice, Invitee: "", Callee: bob}
	for name, tc := range map[string]struct {
		call   *database.Call
		room   id.RoomID
		sender id.UserID
		want   bool
	}{
		"the caller in her room":                        {call: ringing, room: "!a", sender: alice, want: true},
		"another member of the caller's room":           {call: ringing, room: "!a", sender: carol},
		"anyone in the callee room, no invitee":         {call: ringing, room: "!b", sender: carol, want: true},
		"the invitee":                                   {call: named, room: "!b", sender: bob, want: true},
		"someone else than the invitee":                 {call: named, room: "!b", sender: carol},
		"the callee once answered":                      {call: answered, room: "!b", sender: bob, want: true},
		"another member once answered":                  {call: answered, room: "!b", sender: carol},
		"the caller in a callee room":                   {call: ringing, room: "!b", sender: alice, want: true},
		"the caller in a callee room once answered":     {call: answered, room: "!b", sender: alice},
		"the callee in the caller's room":               {call: answered, room: "!a", sender: bob},
		"another member of a third room, once answered": {call: answered, room: "!c", sender: carol},
	} {
		t.Run(name, func(t *testing.T) {
			if got := callParty(tc.call, tc.room, tc.sender); got != tc.want {
				t.Fatalf("callParty = %t, want %t", got, tc.want)
			}
		})
	}
}

// TestCallParties: glare only between the two parties calling each other.
func TestCallParties(t *testing.T) {
	const alice, bob, carol = id.UserID("@alice:x"), id.UserID("@bob:x"), id.UserID("@carol:x")
	for name, tc := range map[string]struct {
		caller, invitee, rivalCaller, rivalInvitee id.UserID
		want                                       bool
	}{
		"nobody named":                         {caller: alice, rivalCaller: bob, want: true},
		"each names the other":                 {caller: alice, invitee: bob, rivalCaller: bob, rivalInvitee: alice, want: true},
		"one names the other":                  {caller: alice, invitee: bob, rivalCaller: bob, want: true},
		"the new call names a third user":      {caller: alice, invitee: carol, rivalCaller: bob},
		"the rival names a third user":         {caller: alice, rivalCaller: bob, rivalInvitee: carol},
		"a third user calls someone else":      {caller: carol, invitee: carol, rivalCaller: bob, rivalInvitee: alice},
		"a bystander calls without an invitee": {caller: carol, rivalCaller: alice, rivalInvitee: bob},
	} {
		t.Run(name, func(t *testing.T) {
			if got := callParties(tc.caller, tc.invitee, tc.rivalCaller, tc.rivalInvitee); got != tc.want {
				t.Fatalf("callParties = %t, want %t", got, tc.want)
			}
		})
	}
}

// TestGlareWinner checks that ferry's verdict is the same whichever invite it sees first, and that a client
// comparing its own call with the copy of the other one (the spec's rule) reaches the same verdict.
func TestGlareWinner(t *testing.T) {
	cases := []struct {
		a, b   string // original call IDs, placed in !a and !b
		aWins  bool
		reason string
	}{
		{"1767225600123abcd", "1767225600456efgh", true, "js-sdk style IDs, earlier timestamp is lesser"},
		{"1767225600456efgh", "1767225600123abcd", false, "the same the other way round"},
		{"abc", "abcd", true, "a prefix is lesser"},
		{"same", "same", true, "equal IDs fall back to the room ID"},
	}
	for _, tc := range cases {
		t.Run(tc.reason, func(t *testing.T) {
			aWins := glareWinner(tc.a, "!a:x", tc.b, "!b:x")
			bWins := glareWinner(tc.b, "!b:x", tc.a, "!a:x")
			if aWins != tc.aWins || aWins == bWins {
				t.Fatalf("glareWinner(a, b)=%v, (b, a)=%v, want a wins=%v and exactly one winner", aWins, bWins, tc.aWins)
			}
			if tc.a == tc.b {
				return
			}
			// In room !b, bob's client compares its own b with the copy of a; in !a, alice's with the copy of b.
			copyA, copyB := copyCallID(tc.a), copyCallID(tc.b)
			if (copyA < tc.b) != aWins {
				t.Errorf("in !b a client comparing %q with its own %q would pick the other call", copyA, tc.b)
			}
			if (tc.a < copyB) != aWins {
				t.Errorf("in !a a client comparing its own %q with %q would pick the other call", tc.a, copyB)
			}
		})
	}
}

func TestCallEventKinds(t *testing.T) {
	for _, typ := range []string{callInvite, callCandidates, callAnswer, callSelectAnswer, callReject, callNegotiate, callHangup, callStreamsMetadata, "m.call.asserted_identity"} {
		et := event.Type{Type: typ, Class: event.MessageEventType}
		if !isLegacyCall(et) || !relayable(et) {
			t.Errorf("%s: legacy=%v relayable=%v", typ, isLegacyCall(et), relayable(et))
		}
	}
	for _, typ := range []string{rtcNotification, rtcNotificationUnstable, callNotify, callNotifyUnstable} {
		et := event.Type{Type: typ, Class: event.MessageEventType}
		if isLegacyCall(et) || !isCallNotification(et) || !relayable(et) || kindOf(et) != kindMessage {
			t.Errorf("%s is not relayed as a standalone notification", typ)
		}
	}
	for _, typ := range []string{"m.call.member", "org.matrix.msc3401.call.member"} {
		if !isCallMember(event.Type{Type: typ, Class: event.StateEventType}) {
			t.Errorf("%s is not a call member type", typ)
		}
	}
}

// TestRingNotificationDropsItsReference: a ring refers to the caller's member event in its own room, which
// never crosses; the copy stands alone and keeps its mentions and intent.
func TestRingNotificationDropsItsReference(t *testing.T) {
	evt := &event.Event{
		Type: event.Type{Type: rtcNotification, Class: event.MessageEventType}, Sender: "@alice:example.org",
		ID: "$ring", RoomID: "!a:ferry.example", Timestamp: 1767225600000,
	}
	raw := `{"m.mentions":{"user_ids":[],"room":true},"notification_type":"ring","m.relates_to":{"rel_type":"m.reference","event_id":"$member"},"sender_ts":1767225600000,"lifetime":30000,"m.call.intent":"video"}`
	evt.Content.VeryRaw = json.RawMessage(raw)
	_, content, err := resolveAndTranslate(evt, newFakeMapper(), testOrigin(evt))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := content.Raw["m.relates_to"]; ok {
		t.Error("the reference to a source-room member event crossed the link")
	}
	if content.Raw["notification_type"] != "ring" || content.Raw["m.call.intent"] != "video" {
		t.Errorf("ringing fields changed: %v", content.Raw)
	}
}

func TestActiveCallMember(t *testing.T) {
	cases := map[string]struct {
		content string
		want    bool
	}{
		"per-device membership (msc3401 as Element Call sends it)": {`{"application":"m.call","call_id":"","scope":"m.room","device_id":"DEV","focus_active":{"type":"livekit","focus_selection":"oldest_membership"},"foci_preferred":[{"type":"livekit","livekit_service_url":"https://lk.example","livekit_alias":"!a"}],"m.call.intent":"audio"}`, true},
		"left (empty content)":           {`{}`, false},
		"original msc3401 with a call":   {`{"m.calls":[{"m.call_id":"c1","m.devices":[{"device_id":"DEV","session_id":"s","expires_ts":1767225700000,"feeds":[]}]}]}`, true},
		"original msc3401 with no calls": {`{"m.calls":[]}`, false},
		"unrelated junk":                 {`{"foo":"bar"}`, false},
	}
	for name, tc := range cases {
		var raw map[string]any
		if err := json.Unmarshal([]byte(tc.content), &raw); err != nil {
			t.Fatal(err)
		}
		if got := activeCallMember(raw); got != tc.want {
			t.Errorf("%s: got %v, want %v", name, got, tc.want)
		}
	}
}

// callEvt builds a decrypted call event as the relay sees it.
func callEvt(t *testing.T, evtID id.EventID, room id.RoomID, sender id.UserID, typ string, sentAt time.Time, content map[string]any) *event.Event {
	t.Helper()
	data, err := json.Marshal(content)
	if err != nil {
		t.Fatal(err)
	}
	evt := &event.Event{ID: evtID, RoomID: room, Sender: sender, Type: event.Type{Type: typ, Class: event.MessageEventType}, Timestamp: sentAt.UnixMilli()}
	evt.Content.VeryRaw = data
	_ = evt.Content.ParseRaw(evt.Type)
	return evt
}

// TestCallRelayDecisions drives the relay's call bookkeeping on a real database for a link of three rooms: which
// events cross into which room with which call_id, expiry, calls ferry does not know, ended calls, and glare in
// both orders. (Sending is covered end to end; the homeserver here is unreachable, so hangups only get logged.)
func TestCallRelayDecisions(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			b := newTestBridge(t, dialect)
			// A homeserver that refuses everything at once, so the hangups glare sends fail fast.
			hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusForbidden)
				_, _ = w.Write([]byte(`{"errcode":"M_FORBIDDEN","error":"test"}`))
			}))
			defer hs.Close()
			if err := b.AS.SetHomeserverURL(hs.URL); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			const roomA, roomB, roomC = id.RoomID("!a:ferry.test"), id.RoomID("!b:ferry.test"), id.RoomID("!c:ferry.test")
			now := time.Now()
			if _, err := b.DB.Links.Join(ctx, "L1", roomA, roomB, "@admin:ferry.test", now); err != nil {
				t.Fatal(err)
			}
			link, err := b.DB.Links.Join(ctx, "unused", roomA, roomC, "@admin:ferry.test", now.Add(time.Second))
			if err != nil {
				t.Fatal(err)
			}
			const alice, bob = id.UserID("@alice:ferry.test"), id.UserID("@bob:ferry.test")
			relays := func(evt *event.Event) bool {
				t.Helper()
				res, stop := b.prepareCall(ctx, evt, link)
				if stop && res.err != nil {
					t.Fatalf("prepareCall(%s): %v", evt.ID, res.err)
				}
				return !stop
			}
			// mapped returns the call_id evt gets in target, or "" when it does not cross there.
			mapped := func(evt *event.Event, target id.RoomID) string {
				t.Helper()
				refs, err := b.resolveCopy(ctx, evt, copyRoute{room: target})
				if errors.Is(err, errCallUnknown) {
					return ""
				} else if err != nil {
					t.Fatalf("resolveCopy(%s, %s): %v", evt.ID, target, err)
				}
				_, content, err := translateCopy(evt, refs, copyRoute{room: target}, Origin{EventID: evt.ID, RoomID: evt.RoomID}, "ferry.test", time.Now())
				if errors.Is(err, errCallExpired) {
					return ""
				} else if err != nil {
					t.Fatalf("translateCopy(%s, %s): %v", evt.ID, target, err)
				}
				var back map[string]any
				if err = json.Unmarshal(content.VeryRaw, &back); err != nil || back["call_id"] != content.Raw["call_id"] {
					t.Fatalf("VeryRaw does not hold the mapped content: %s", content.VeryRaw)
				}
				return callString(content.Raw, "call_id")
			}
			base := func(callID, party string, extra map[string]any) map[string]any {
				c := map[string]any{"call_id": callID, "party_id": party, "version": "1"}
				for k, v := range extra {
					c[k] = v
				}
				return c
			}
			offer := map[string]any{"lifetime": 60000, "offer": map[string]any{"type": "offer", "sdp": "v=0\r\n"}}

			inv := callEvt(t, "$inv", roomA, alice, callInvite, now.Add(-time.Second), base("100call", "PA", offer))
			if !relays(inv) {
				t.Fatal("a fresh invite was not relayed")
			}
			inB, inC := mapped(inv, roomB), mapped(inv, roomC)
			if inB == "" || inC == "" || inB == inC || inB == "100call" {
				t.Fatalf("invite call_ids: B=%q C=%q", inB, inC)
			}
			// Candidates from the caller reach both callee rooms under their IDs.
			cand := callEvt(t, "$cand", roomA, alice, callCandidates, now, base("100call", "PA", map[string]any{"candidates": []any{}}))
			if !relays(cand) || mapped(cand, roomB) != inB || mapped(cand, roomC) != inC {
				t.Fatal("caller's candidates not mapped per room")
			}
			// bob answers in B: it reaches alice under her ID, and not the other callee room.
			ans := callEvt(t, "$ans", roomB, bob, callAnswer, now, base(inB, "PB", map[string]any{"answer": map[string]any{"type": "answer", "sdp": "v=0\r\n"}}))
			if !relays(ans) || mapped(ans, roomA) != "100call" || mapped(ans, roomC) != "" {
				t.Fatal("the answer from B must map to A's call_id only")
			}
			if c, _ := b.DB.Calls.ByRoomCallID(ctx, roomA, "100call"); c == nil || c.State != "answered" || c.Callee != bob || c.CalleeParty != "PB" {
				t.Fatalf("answer not recorded: %+v", c)
			}
			// Only the call's parties act on it: not another member of the caller's room, not another member of a
			// callee room once bob answered.
			const carol, dave = id.UserID("@carol:ferry.test"), id.UserID("@dave:ferry.test")
			if relays(callEvt(t, "$x1", roomA, carol, callHangup, now, base("100call", "PX", nil))) ||
				relays(callEvt(t, "$x2", roomB, dave, callHangup, now, base(inB, "PX", nil))) ||
				relays(callEvt(t, "$x3", roomC, dave, callAnswer, now, base(inC, "PX", map[string]any{"answer": map[string]any{"type": "answer", "sdp": "v=0\r\n"}}))) ||
				relays(callEvt(t, "$x4", roomA, carol, callSelectAnswer, now, base("100call", "PX", map[string]any{"selected_party_id": "PX"}))) {
				t.Fatal("a call event from someone who is not a party was relayed")
			}
			if c, _ := b.DB.Calls.ByRoomCallID(ctx, roomA, "100call"); c == nil || c.State != "answered" {
				t.Fatalf("a bystander's hangup ended the call: %+v", c)
			}
			// The copy's ID in A, or the original's in B, mean nothing.
			if relays(callEvt(t, "$stray1", roomA, alice, callCandidates, now, base(inB, "PA", nil))) ||
				relays(callEvt(t, "$stray2", roomB, bob, callCandidates, now, base("100call", "PB", nil))) {
				t.Fatal("a call_id from the wrong room was accepted")
			}
			// Hangup ends the call; later signaling for it does not cross.
			if !relays(callEvt(t, "$hang", roomB, bob, callHangup, now, base(inB, "PB", nil))) {
				t.Fatal("hangup not relayed")
			}
			if relays(callEvt(t, "$late", roomA, alice, callCandidates, now, base("100call", "PA", nil))) {
				t.Fatal("candidates of an ended call were relayed")
			}
			// Expired invite: not relayed, not recorded.
			if relays(callEvt(t, "$old", roomA, alice, callInvite, now.Add(-2*time.Minute), base("200old", "PA", offer))) {
				t.Fatal("an expired invite was relayed")
			}
			if c, _ := b.DB.Calls.ByRoomCallID(ctx, roomA, "200old"); c != nil {
				t.Fatal("an expired invite was recorded")
			}
			if relays(callEvt(t, "$nocall", roomA, alice, callInvite, now, map[string]any{"version": "1", "lifetime": 60000})) {
				t.Fatal("an invite without call_id was relayed")
			}

			// Glare, lesser call_id second: it wins and the first is ended.
			if !relays(callEvt(t, "$g1", roomB, bob, callInvite, now, base("300glare-b", "GB", offer))) {
				t.Fatal("first glare invite not relayed")
			}
			if !relays(callEvt(t, "$g2", roomA, alice, callInvite, now, base("300glare-a", "GA", offer))) {
				t.Fatal("the winning glare invite was not relayed")
			}
			if c, _ := b.DB.Calls.ByRoomCallID(ctx, roomB, "300glare-b"); c == nil || c.State != "ended" {
				t.Fatalf("the losing call was not ended: %+v", c)
			}
			// Glare, greater call_id second: it loses and is recorded as ended.
			if relays(callEvt(t, "$g3", roomC, "@carol:ferry.test", callInvite, now, base("300glare-c", "GC", offer))) {
				t.Fatal("the losing glare invite was relayed")
			}
			if c, _ := b.DB.Calls.ByRoomCallID(ctx, roomC, "300glare-c"); c == nil || c.State != "ended" {
				t.Fatalf("the losing invite is not recorded as ended: %+v", c)
			}
			if c, _ := b.DB.Calls.ByRoomCallID(ctx, roomA, "300glare-a"); c == nil || c.State != "ringing" {
				t.Fatalf("the winner is no longer ringing: %+v", c)
			}
			// A lesser call ID from someone calling a third user is no glare: both calls ring.
			if !relays(callEvt(t, "$g4", roomB, dave, callInvite, now, base("000other", "GD", map[string]any{"lifetime": 60000, "invitee": "@zed:ferry.test"}))) {
				t.Fatal("an invite to a third user was refused as glare")
			}
			if c, _ := b.DB.Calls.ByRoomCallID(ctx, roomA, "300glare-a"); c == nil || c.State != "ringing" {
				t.Fatalf("a call to a third user ended alice's call: %+v", c)
			}
		})
	}
}

// TestCallRingingLimit: ferry rings a room at most once a minute: a retry of the same cause may claim again, a
// second cause within the window is refused (and leaves the record alone), and one after the window rings.
func TestCallRingingLimit(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			b := newTestBridge(t, dialect)
			ctx := context.Background()
			const room, other = id.RoomID("!b:ferry.test"), id.RoomID("!c:ferry.test")
			if !b.claimCallNotification(ctx, room, "$join1") {
				t.Fatal("the first ringing of a room was refused")
			}
			if !b.claimCallNotification(ctx, room, "$join1") {
				t.Error("a retry of the same cause was refused")
			}
			if b.claimCallNotification(ctx, room, "$join2") {
				t.Error("a second cause rang the room again within the window")
			}
			if !b.claimCallNotification(ctx, other, "$join2") {
				t.Error("ringing one room held back another")
			}
			// Move the record back past the window: the next cause rings.
			past := time.Now().Add(-callNotifyWindow - time.Second).UnixMilli()
			if err := b.DB.KV.Set(ctx, callNotifiedKey(room), strconv.FormatInt(past, 10)+" $join1"); err != nil {
				t.Fatal(err)
			}
			if !b.claimCallNotification(ctx, room, "$join3") {
				t.Error("a cause after the window was refused")
			}
			if b.claimCallNotification(ctx, room, "$join4") {
				t.Error("the claim after the window was not recorded")
			}
		})
	}
}
