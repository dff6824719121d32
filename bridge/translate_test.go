package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// The translation fixtures live in testdata/translate: <case>.event.json is the event as the homeserver delivers
// it (after decryption) in room !a, and <case>.want.json the {"type", "content"} ferry must send into room !b.
// Cases that must fail have no want file; the table below names their error.
const translateFixtures = "testdata/translate"

// errFakeStore is what fakeMapper returns for $lookup-fails, standing for a database error.
var errFakeStore = errors.New("fake event map unavailable")

type ctxKey struct{}

// testNamer is the ghost namer of the fixtures: ferry runs on ferry.example, real users are elsewhere.
var testNamer = GhostNamer{Prefix: "_ferry_", Domain: "ferry.example", BotUserID: "@ferrybot:ferry.example"}

// testOrigin is the marker the fixtures expect.
func testOrigin(evt *event.Event) Origin {
	return Origin{EventID: evt.ID, RoomID: evt.RoomID, Instance: "ferry@ferry.example"}
}

// fakeMapper maps IDs for target room !b the way the relay's mapper does, from a fixed event map.
type fakeMapper struct {
	// copies maps events seen in room !a to their counterparts in room !b.
	copies map[id.EventID]id.EventID
	// badCtx is set when CopyOf was called without the context Resolve was given.
	badCtx bool
	// lookups counts the calls of CopyOf and CopyInPredecessor.
	lookups int
}

func newFakeMapper() *fakeMapper {
	return &fakeMapper{
		copies: map[id.EventID]id.EventID{
			"$alice-hello":   "$alice-hello.b",   // relayed from !a to !b
			"$thread-root":   "$thread-root.b",   //
			"$thread-latest": "$thread-latest.b", //
			"$poll-start":    "$poll-start.b",    //
			"$bob-hi.a":      "$bob-hi",          // a copy in !a of Bob's message in !b maps back to the original
		},
	}
}

func (fm *fakeMapper) CopyOf(ctx context.Context, evt id.EventID) (id.EventID, bool, error) {
	if ctx.Value(ctxKey{}) == nil {
		fm.badCtx = true
	}
	fm.lookups++
	if evt == "$lookup-fails" {
		return "", false, errFakeStore
	}
	target, ok := fm.copies[evt]
	return target, ok, nil
}

// CopyInPredecessor knows one event relayed into !b-old, the room !b replaced when it was upgraded.
func (fm *fakeMapper) CopyInPredecessor(_ context.Context, evt id.EventID) (*id.MatrixURI, error) {
	fm.lookups++
	if evt == "$before-upgrade" {
		return id.RoomID("!b-old:ferry.example").EventURI("$before-upgrade.b-old", "ferry.example"), nil
	}
	return nil, nil
}

// isTarget reports whether evt is an event of room !b the fake knows, i.e. not a dangling ID.
func (fm *fakeMapper) isTarget(evt string) bool {
	for _, target := range fm.copies {
		if string(target) == evt {
			return true
		}
	}
	return false
}

func testContext() context.Context {
	return context.WithValue(context.Background(), ctxKey{}, true)
}

// resolveAndTranslate is the relay's path for one copy: Resolve through m (the fixtures' event map, ghosts named
// by testNamer), then Translate.
func resolveAndTranslate(src *event.Event, m Mapper, origin Origin) (event.Type, *event.Content, error) {
	refs, err := Resolve(testContext(), src, m, testNamer)
	if err != nil {
		return event.Type{}, nil, err
	}
	return Translate(src, refs, origin)
}

// translateCases lists every fixture; wantErr nil means <name>.want.json holds the expected copy. trustFlag is
// why the source room's clients would flag the sender (the copy is then marked).
var translateCases = map[string]struct {
	wantErr   error
	trustFlag string
}{
	// Plain messages: content passes through, the marker is added (replacing another instance's).
	"text":              {},
	"notice":            {},
	"emote":             {},
	"text_unknown_keys": {},
	"marker_replaced":   {},
	// ferry's own keys (im.ferry.*) never cross from a user's content, also not inside m.new_content.
	"ferry_keys_stripped":      {},
	"call_ferry_keys_stripped": {},
	// A sender the source room's clients would flag: the copy says so, visibly and under im.ferry.sender_trust.
	"untrusted_sender_marked":   {trustFlag: "unsigned_device"},
	"untrusted_reaction_marked": {trustFlag: "untrusted_forwarded_key"},
	// Mentions and pills.
	"html_pills_and_mentions":      {},
	"mentions_absent_stay_absent":  {},
	"mentions_duplicates_and_junk": {},
	"pills_only_in_html_format":    {},
	// Media, including encrypted attachments, passes through unchanged.
	"image_with_thumbnail":                {},
	"image_encrypted_with_thumbnail_file": {},
	"file_encrypted":                      {},
	"audio_voice":                         {},
	"video_encrypted":                     {},
	"location":                            {},
	"sticker":                             {},
	"sticker_encrypted_file":              {},
	// Replies.
	"reply_html_fallback":             {},
	"reply_plain_fallback":            {},
	"reply_without_fallback":          {},
	"reply_to_copy_maps_to_original":  {},
	"reply_target_unknown_sent_plain": {},
	// A reply to an event that lives in a room !b replaced (room upgrades): a link to it, not an m.in_reply_to
	// that clients would fail to load in !b. Media keep their body (a file name or caption) and lose the reply.
	"reply_into_upgraded_room_links_old_room": {},
	"reply_plain_into_upgraded_room":          {},
	"image_reply_into_upgraded_room":          {},
	// Edits of such events belong in the old room: the relay sends them there (relay.go), not into !b.
	"edit_target_in_upgraded_room": {wantErr: ErrRelationTargetUnknown},
	"reply_genuine_quote_kept":     {},
	"reply_nested_html_fallback":   {},
	"quote_without_reply_kept":     {},
	"sticker_reply":                {},
	// Threads.
	"thread_falling_back":                           {},
	"thread_genuine_reply":                          {},
	"thread_in_reply_to_unknown_falls_back_to_root": {},
	"thread_without_in_reply_to":                    {},
	"thread_root_unknown_sent_plain":                {},
	"thread_root_unknown_genuine_reply_kept":        {},
	// Edits.
	"edit": {},
	"edit_caption_drops_relation_inside_new_content": {},
	"edit_target_unknown":                            {wantErr: ErrRelationTargetUnknown},
	"edit_without_target":                            {wantErr: ErrRelationTargetUnknown},
	// Reactions.
	"reaction":                          {},
	"reaction_to_copy_maps_to_original": {},
	"reaction_target_unknown":           {wantErr: ErrRelationTargetUnknown},
	"reaction_without_annotation":       {wantErr: ErrNotRelayable},
	// Polls and other relations.
	"poll_start":              {},
	"poll_response":           {},
	"poll_end_target_unknown": {wantErr: ErrRelationTargetUnknown},
	"message_reference_target_unknown_dropped": {},
	"unknown_relation_remapped":                {},
	"relation_not_an_object_dropped":           {},
	// Calls: untouched but for the marker.
	"call_invite":                      {},
	"call_candidates":                  {},
	"call_legacy_version_0":            {},
	"call_sdp_stream_metadata_changed": {},
	// Not relayed.
	"redaction":                   {wantErr: ErrNotRelayable},
	"encrypted_not_decrypted":     {wantErr: ErrNotRelayable},
	"state_event":                 {wantErr: ErrNotRelayable},
	"state_event_of_message_type": {wantErr: ErrNotRelayable},
	"unknown_event_type":          {wantErr: ErrNotRelayable},
	"verification_request":        {wantErr: ErrNotRelayable},
	"message_without_msgtype":     {wantErr: ErrNotRelayable},
	"content_not_an_object":       {wantErr: ErrNotRelayable},
	// A failing event map is an error to retry, not a reason to drop.
	"lookup_error": {wantErr: errFakeStore},
}

func readJSONFixture(t testing.TB, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(translateFixtures, name))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func loadEvent(t testing.TB, name string) *event.Event {
	t.Helper()
	var evt event.Event
	if err := json.Unmarshal(readJSONFixture(t, name+".event.json"), &evt); err != nil {
		t.Fatalf("bad fixture %s: %v", name, err)
	}
	return &evt
}

// assertJSONEqual compares two JSON documents by value.
func assertJSONEqual(t testing.TB, what string, got, want []byte) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("%s: got invalid JSON: %v", what, err)
	}
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatalf("%s: want invalid JSON: %v", what, err)
	}
	if !reflect.DeepEqual(g, w) {
		gi, _ := json.MarshalIndent(g, "", "  ")
		wi, _ := json.MarshalIndent(w, "", "  ")
		t.Errorf("%s differs\n got: %s\nwant: %s", what, gi, wi)
	}
}

type translated struct {
	Type    string          `json:"type"`
	Content json.RawMessage `json:"content"`
}

func runTranslate(t *testing.T, name string, src *event.Event) {
	t.Helper()
	tc := translateCases[name]
	fm := newFakeMapper()
	before, err := json.Marshal(src)
	if err != nil {
		t.Fatal(err)
	}
	origin := testOrigin(src)
	origin.TrustFlag = tc.trustFlag
	refs, err := Resolve(testContext(), src, fm, testNamer)
	if fm.badCtx {
		t.Error("CopyOf did not get Resolve's context")
	}
	var evtType event.Type
	var content *event.Content
	if err == nil {
		evtType, content, err = Translate(src, refs, origin)
		// Pure: the same event and refs give the same copy, and the lookups were all Resolve's.
		lookups := fm.lookups
		if evtType2, content2, err2 := Translate(src, refs, origin); evtType2 != evtType || fmt.Sprint(err2) != fmt.Sprint(err) ||
			(content == nil) != (content2 == nil) || content != nil && !bytes.Equal(content.VeryRaw, content2.VeryRaw) {
			t.Error("Translate gave another result for the same event and refs")
		}
		if fm.lookups != lookups {
			t.Error("Translate looked something up")
		}
	}
	after, _ := json.Marshal(src)
	assertJSONEqual(t, "source event after Translate", after, before)
	if tc.wantErr != nil {
		if !errors.Is(err, tc.wantErr) {
			t.Fatalf("err = %v, want %v", err, tc.wantErr)
		}
		if content != nil {
			t.Error("content returned with an error")
		}
		return
	} else if err != nil {
		t.Fatalf("unexpected error: %v", err)
	}
	if evtType.Class != event.MessageEventType {
		t.Errorf("class = %v, want message event", evtType.Class)
	}
	var want translated
	if err = json.Unmarshal(readJSONFixture(t, name+".want.json"), &want); err != nil {
		t.Fatal(err)
	}
	if evtType.Type != want.Type {
		t.Errorf("type = %s, want %s", evtType.Type, want.Type)
	}
	got, err := json.Marshal(content)
	if err != nil {
		t.Fatal(err)
	}
	assertJSONEqual(t, "content", got, want.Content)
	assertJSONEqual(t, "content.VeryRaw", content.VeryRaw, want.Content)
}

func TestTranslate(t *testing.T) {
	for name := range translateCases {
		t.Run(name, func(t *testing.T) {
			runTranslate(t, name, loadEvent(t, name))
		})
	}
}

// TestTranslateWithoutVeryRaw feeds the same contents as mautrix holds them after ParseRaw, minus the bytes
// (Raw and Parsed only), and as Raw only: the result must not change, and the source must stay untouched.
func TestTranslateWithoutVeryRaw(t *testing.T) {
	for name := range translateCases {
		t.Run(name+"/raw_only", func(t *testing.T) {
			src := loadEvent(t, name)
			src.Content.VeryRaw = nil
			runTranslate(t, name, src)
		})
		t.Run(name+"/raw_and_parsed", func(t *testing.T) {
			src := loadEvent(t, name)
			if err := src.Content.ParseRaw(src.Type); err != nil {
				t.Skip("mautrix has no struct for", src.Type.Type)
			}
			src.Content.VeryRaw = nil
			runTranslate(t, name, src)
		})
	}
}

// TestTranslateFixturesCovered keeps the table and testdata in step.
func TestTranslateFixturesCovered(t *testing.T) {
	entries, err := os.ReadDir(translateFixtures)
	if err != nil {
		t.Fatal(err)
	}
	files := make(map[string]bool)
	for _, e := range entries {
		files[e.Name()] = true
		name, ok := strings.CutSuffix(e.Name(), ".event.json")
		if !ok {
			name, ok = strings.CutSuffix(e.Name(), ".want.json")
		}
		if _, listed := translateCases[name]; !ok || !listed {
			t.Errorf("fixture %s belongs to no case", e.Name())
		}
	}
	for name, tc := range translateCases {
		if !files[name+".event.json"] {
			t.Errorf("case %s has no event fixture", name)
		}
		if hasWant := files[name+".want.json"]; hasWant != (tc.wantErr == nil) {
			t.Errorf("case %s: want fixture present = %v, but wantErr = %v", name, hasWant, tc.wantErr)
		}
	}
}

func TestTranslateNilEvent(t *testing.T) {
	if _, _, err := resolveAndTranslate(nil, newFakeMapper(), Origin{}); !errors.Is(err, ErrNotRelayable) {
		t.Errorf("err = %v, want ErrNotRelayable", err)
	}
}

// TestResolveReadsOnlyWhatTranslateNeeds: Resolve reads the event map for the relation's target and the reply's
// target (and, for a reply whose target is not in the target room, the rooms it replaced), and not at all for
// events without a relation or that Translate refuses before looking at one.
func TestResolveReadsOnlyWhatTranslateNeeds(t *testing.T) {
	for name, tc := range map[string]struct {
		evtType, content string
		lookups          int
		events           map[id.EventID]id.EventID
	}{
		"plain text":                 {"m.room.message", `{"msgtype":"m.text","body":"a \n b"}`, 0, nil},
		"without msgtype":            {"m.room.message", `{"body":"x","m.relates_to":{"m.in_reply_to":{"event_id":"$alice-hello"}}}`, 0, nil},
		"verification request":       {"m.room.message", `{"msgtype":"m.key.verification.request","m.relates_to":{"m.in_reply_to":{"event_id":"$alice-hello"}}}`, 0, nil},
		"reaction, no annotation":    {"m.reaction", `{"m.relates_to":{"rel_type":"m.reference","event_id":"$alice-hello"}}`, 0, nil},
		"state type":                 {"m.room.encrypted", `{"m.relates_to":{"event_id":"$alice-hello"}}`, 0, nil},
		"reply":                      {"m.room.message", `{"msgtype":"m.text","body":"x","m.relates_to":{"m.in_reply_to":{"event_id":"$alice-hello"}}}`, 1, map[id.EventID]id.EventID{"$alice-hello": "$alice-hello.b"}},
		"reply, target elsewhere":    {"m.room.message", `{"msgtype":"m.text","body":"x","m.relates_to":{"m.in_reply_to":{"event_id":"$before-upgrade"}}}`, 2, nil},
		"thread reply to root":       {"m.room.message", `{"msgtype":"m.text","body":"x","m.relates_to":{"rel_type":"m.thread","event_id":"$thread-root","m.in_reply_to":{"event_id":"$thread-root"}}}`, 1, map[id.EventID]id.EventID{"$thread-root": "$thread-root.b"}},
		"key spelled with an escape": {"m.reaction", `{"m.relat\u0065s_to":{"rel_type":"m.annotation","event_id":"$alice-hello","key":"x"}}`, 1, map[id.EventID]id.EventID{"$alice-hello": "$alice-hello.b"}},
	} {
		t.Run(name, func(t *testing.T) {
			src := &event.Event{Type: event.Type{Type: tc.evtType, Class: event.MessageEventType}, ID: "$src", RoomID: "!a:ferry.example", Sender: "@alice:example.org"}
			src.Content.VeryRaw = json.RawMessage(tc.content)
			fm := newFakeMapper()
			refs, err := Resolve(testContext(), src, fm, testNamer)
			if err != nil {
				t.Fatal(err)
			}
			if fm.lookups != tc.lookups {
				t.Errorf("%d lookups, want %d", fm.lookups, tc.lookups)
			}
			if len(refs.Events) != len(tc.events) || !reflect.DeepEqual(refs.Events, tc.events) && len(tc.events) > 0 {
				t.Errorf("events = %v, want %v", refs.Events, tc.events)
			}
		})
	}
}

// TestTranslateEmptyContent covers contents built in code without any JSON.
func TestTranslateEmptyContent(t *testing.T) {
	src := &event.Event{Type: event.CallHangup, ID: "$h", RoomID: "!a:ferry.example"}
	_, content, err := resolveAndTranslate(src, newFakeMapper(), testOrigin(src))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(content)
	assertJSONEqual(t, "content", got, []byte(`{"im.ferry.origin":{"event_id":"$h","room_id":"!a:ferry.example","instance":"ferry@ferry.example"}}`))
}

// TestTranslateErrorsCarryNoContent checks that error messages (which the relay logs) never quote content.
func TestTranslateErrorsCarryNoContent(t *testing.T) {
	for name, tc := range translateCases {
		if tc.wantErr == nil {
			continue
		}
		src := loadEvent(t, name)
		_, _, err := resolveAndTranslate(src, newFakeMapper(), testOrigin(src))
		for _, key := range []string{"body", "formatted_body", "ciphertext", "name"} {
			if s, _ := src.Content.Raw[key].(string); s != "" && strings.Contains(err.Error(), s) {
				t.Errorf("%s: error %q quotes the content's %s", name, err, key)
			}
		}
	}
}

func TestStripReplyFallback(t *testing.T) {
	for name, tc := range map[string]struct {
		content, want map[string]any
		isReply       bool
	}{
		"unterminated mx-reply kept": {
			content: map[string]any{"body": "> <@a:b> x\n\ny", "format": "org.matrix.custom.html", "formatted_body": "<mx-reply>x"},
			want:    map[string]any{"body": "> <@a:b> x\n\ny", "format": "org.matrix.custom.html", "formatted_body": "<mx-reply>x"},
			isReply: true,
		},
		"upper-case tags": {
			content: map[string]any{"body": "> <@a:b> x\n\ny", "format": "org.matrix.custom.html", "formatted_body": "<MX-REPLY>x</Mx-Reply>y"},
			want:    map[string]any{"body": "y", "format": "org.matrix.custom.html", "formatted_body": "y"},
		},
		"html fallback, body quote without blank line": {
			content: map[string]any{"body": "> <@a:b> x\ny", "format": "org.matrix.custom.html", "formatted_body": "<mx-reply>x</mx-reply>y"},
			want:    map[string]any{"body": "y", "format": "org.matrix.custom.html", "formatted_body": "y"},
			isReply: true,
		},
		"plain reply, quote is the whole body": {
			content: map[string]any{"body": "> <@a:b> x\n> y"},
			want:    map[string]any{"body": "> <@a:b> x\n> y"},
			isReply: true,
		},
		"plain reply, quote without blank line kept": {
			content: map[string]any{"body": "> <@a:b> x\ny"},
			want:    map[string]any{"body": "> <@a:b> x\ny"},
			isReply: true,
		},
		"plain reply, quote not shaped like a fallback kept": {
			content: map[string]any{"body": "> just a quote\n\ny"},
			want:    map[string]any{"body": "> just a quote\n\ny"},
			isReply: true,
		},
		"mx-reply not at the start kept": {
			content: map[string]any{"body": "a", "format": "org.matrix.custom.html", "formatted_body": "a<mx-reply>x</mx-reply>"},
			want:    map[string]any{"body": "a", "format": "org.matrix.custom.html", "formatted_body": "a<mx-reply>x</mx-reply>"},
			isReply: true,
		},
		"body not a string": {
			content: map[string]any{"body": 5.0, "format": "org.matrix.custom.html", "formatted_body": "<mx-reply>x</mx-reply>y"},
			want:    map[string]any{"body": 5.0, "format": "org.matrix.custom.html", "formatted_body": "y"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			stripReplyFallback(tc.content, tc.isReply)
			if !reflect.DeepEqual(tc.content, tc.want) {
				t.Errorf("got %#v, want %#v", tc.content, tc.want)
			}
		})
	}
}

func TestPermalink(t *testing.T) {
	tr := translator{refs: &Refs{Ghosts: testNamer}}
	for value, want := range map[string]string{
		"https://matrix.to/#/@alice:example.org":                     "https://matrix.to/#/@_ferry_alice=3aexample.org:ferry.example",
		"https://matrix.to/#/%40alice%3Aexample.org":                 "https://matrix.to/#/%40_ferry_alice%3D3aexample.org%3Aferry.example",
		"https://matrix.to/#/%40alice:example.org?via=x&amp;via=y":   "https://matrix.to/#/%40_ferry_alice%3D3aexample.org%3Aferry.example?via=x&amp;via=y",
		"HTTPS://MATRIX.TO/#/@_ferry_bob=3amatrix.org:ferry.example": "HTTPS://MATRIX.TO/#/@bob:matrix.org",
		"http://matrix.to/#/@Carol:example.org":                      "http://matrix.to/#/@_ferry__carol=3aexample.org:ferry.example",
		"matrix:u/alice:example.org":                                 "matrix:u/_ferry_alice=3aexample.org:ferry.example",
		"https://matrix.to/#/@we%20ird%22:example.org":               "https://matrix.to/#/%40_ferry_we%3D20ird%3D22%3D3aexample.org%3Aferry.example",
		"https://matrix.to/#/@_ferry_bob=3amatrix.org:other.example": "https://matrix.to/#/@_ferry___ferry__bob=3d3amatrix.org=3aother.example:ferry.example", // another instance's ghost is a real user here
		"https://matrix.to/#/@ferrybot:ferry.example":                "",                                                                                      // maps to itself
		"https://matrix.to/#/!room:example.org":                      "",
		"https://matrix.to/#/#alias:example.org":                     "",
		"https://matrix.to/#/!room:example.org/$event":               "",
		"https://matrix.to/#/@alice:example.org/extra":               "",
		"https://matrix.to/#/@alice":                                 "",
		"https://matrix.to/#/%zz":                                    "",
		"https://matrix.to/#/":                                       "",
		"matrix:r/room:example.org":                                  "",
		"https://example.org/#/@alice:example.org":                   "",
	} {
		got, ok := tr.permalink(value)
		if (want != "") != ok || got != want {
			t.Errorf("permalink(%q) = %q, %v; want %q", value, got, ok, want)
		}
	}
}

func TestOriginOf(t *testing.T) {
	want := &Origin{EventID: "$src", RoomID: "!a:ferry.example", Instance: "ferry@ferry.example"}
	markerJSON := `{"event_id":"$src","room_id":"!a:ferry.example","instance":"ferry@ferry.example"}`
	for name, tc := range map[string]struct {
		content *event.Content
		want    *Origin
	}{
		"nil content":    {nil, nil},
		"empty content":  {&event.Content{}, nil},
		"no marker":      {&event.Content{Raw: map[string]any{"body": "x"}}, nil},
		"raw map":        {&event.Content{Raw: map[string]any{OriginKey: map[string]any{"event_id": "$src", "room_id": "!a:ferry.example", "instance": "ferry@ferry.example"}}}, want},
		"raw struct":     {&event.Content{Raw: map[string]any{OriginKey: *want}}, want},
		"raw pointer":    {&event.Content{Raw: map[string]any{OriginKey: want}}, want},
		"raw nil ptr":    {&event.Content{Raw: map[string]any{OriginKey: (*Origin)(nil)}}, nil},
		"very raw only":  {&event.Content{VeryRaw: []byte(`{"body":"x","` + OriginKey + `":` + markerJSON + `}`)}, want},
		"parsed only":    {&event.Content{Parsed: map[string]any{OriginKey: json.RawMessage(markerJSON)}}, want},
		"not an object":  {&event.Content{Raw: map[string]any{OriginKey: "$src"}}, nil},
		"null":           {&event.Content{VeryRaw: []byte(`{"` + OriginKey + `":null}`)}, nil},
		"wrong fields":   {&event.Content{Raw: map[string]any{OriginKey: map[string]any{"event_id": 5.0, "x": "y"}}}, &Origin{}},
		"invalid JSON":   {&event.Content{VeryRaw: []byte(`{"` + OriginKey)}, nil},
		"typed, no mark": {&event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: "x"}}, nil},
	} {
		t.Run(name, func(t *testing.T) {
			if got := OriginOf(tc.content); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("OriginOf = %+v, want %+v", got, tc.want)
			}
		})
	}
	t.Run("translated content", func(t *testing.T) {
		src := loadEvent(t, "reaction")
		_, content, err := resolveAndTranslate(src, newFakeMapper(), *want)
		if err != nil {
			t.Fatal(err)
		}
		if got := OriginOf(content); !reflect.DeepEqual(got, want) {
			t.Errorf("OriginOf = %+v, want %+v", got, want)
		}
		var reparsed event.Content
		if err = json.Unmarshal(content.VeryRaw, &reparsed); err != nil {
			t.Fatal(err)
		}
		if got := OriginOf(&reparsed); !reflect.DeepEqual(got, want) {
			t.Errorf("OriginOf(reparsed) = %+v, want %+v", got, want)
		}
	})
}

// relationIDs collects every event ID in a content's relations, including one left inside m.new_content.
func relationIDs(content map[string]any) []string {
	var ids []string
	var walk func(m map[string]any)
	walk = func(m map[string]any) {
		rel, _ := m[keyRelatesTo].(map[string]any)
		if s, ok := rel[keyEventID].(string); ok {
			ids = append(ids, s)
		}
		irt, _ := rel[keyInReplyTo].(map[string]any)
		if s, ok := irt[keyEventID].(string); ok {
			ids = append(ids, s)
		}
		if nc, ok := m[keyNewContent].(map[string]any); ok {
			walk(nc)
		}
	}
	walk(content)
	return ids
}

func FuzzTranslate(f *testing.F) {
	names := make([]string, 0, len(translateCases))
	for name := range translateCases {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		evt := loadEvent(f, name)
		f.Add(evt.Type.Type, []byte(evt.Content.VeryRaw))
	}
	f.Add("m.room.message", []byte(`{"msgtype":"m.text","body":"x","m.relates_to":{"rel_type":"m.thread","event_id":"$thread-root","m.in_reply_to":"$alice-hello"}}`))
	f.Add("m.room.message", []byte(`{"msgtype":"m.text","m.mentions":{"user_ids":"@a:b"},"format":"org.matrix.custom.html","formatted_body":"<a href='matrix:u/'>"}`))
	f.Add("m.reaction", []byte(`{"m.relates_to":{"rel_type":"m.annotation","event_id":7}}`))
	f.Add("m.room.message", []byte(`[1,2]`))
	f.Add("m.room.message", []byte(`{"msgtype":"m.text","body":1e400}`))
	f.Add("m.room.message", []byte(`{"msgtype":"m.text","body":"x","im.ferry.txn":"forged","im.ferry.origin":{"event_id":"$x"}}`))
	f.Fuzz(func(t *testing.T, evtType string, content []byte) {
		src := &event.Event{
			Type:   event.Type{Type: evtType, Class: event.MessageEventType},
			ID:     "$fuzz",
			RoomID: "!a:ferry.example",
			Sender: "@alice:example.org",
		}
		_ = json.Unmarshal(content, &src.Content) // keeps the bytes in VeryRaw even when they are not valid JSON
		src.Content.VeryRaw = bytes.Clone(content)
		fm := newFakeMapper()
		origin := testOrigin(src)
		gotType, out, err := resolveAndTranslate(src, fm, origin)
		if !bytes.Equal(src.Content.VeryRaw, content) {
			t.Fatal("Translate modified the source content")
		}
		if err != nil {
			if !errors.Is(err, ErrNotRelayable) && !errors.Is(err, ErrRelationTargetUnknown) && !errors.Is(err, errFakeStore) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if gotType.Type != evtType {
			t.Errorf("type changed from %q to %q", evtType, gotType.Type)
		}
		if got := OriginOf(out); got == nil || *got != origin {
			t.Errorf("origin marker = %+v, want %+v", got, origin)
		}
		for k := range out.Raw {
			if strings.HasPrefix(k, ferryKeyPrefix) && k != OriginKey {
				t.Errorf("the copy carries the user's %s", k)
			}
		}
		if _, err = json.Marshal(out); err != nil {
			t.Fatalf("translated content does not marshal: %v", err)
		}
		if kindOf(src.Type) == kindCall {
			return // passed through untouched
		}
		for _, evtID := range relationIDs(out.Raw) {
			if !fm.isTarget(evtID) {
				t.Errorf("translated content points at %q, which is not in the target room", evtID)
			}
		}
	})
}

// TestTranslateRawAndParsed covers content built in code: Raw wins over Parsed (mautrix's own MarshalJSON would
// turn the call's "version": "1" into 1), Parsed-only fields are kept, and neither is modified.
func TestTranslateRawAndParsed(t *testing.T) {
	raw := map[string]any{"version": "1", "call_id": "c1", "x.extra": map[string]any{"a": 1.0}}
	parsed := &event.CallHangupEventContent{BaseCallEventContent: event.BaseCallEventContent{CallID: "c1", PartyID: "p1", Version: "1"}, Reason: "user_busy"}
	src := &event.Event{Type: event.CallHangup, ID: "$h", RoomID: "!a:ferry.example", Content: event.Content{Raw: raw, Parsed: parsed}}
	rawBefore, _ := json.Marshal(raw)
	parsedBefore := *parsed
	_, content, err := resolveAndTranslate(src, newFakeMapper(), testOrigin(src))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(content)
	assertJSONEqual(t, "content", got, []byte(`{"version":"1","call_id":"c1","party_id":"p1","reason":"user_busy","x.extra":{"a":1},
		"im.ferry.origin":{"event_id":"$h","room_id":"!a:ferry.example","instance":"ferry@ferry.example"}}`))
	rawAfter, _ := json.Marshal(raw)
	if !bytes.Equal(rawBefore, rawAfter) || *parsed != parsedBefore {
		t.Error("Translate modified the source content")
	}
	content.Raw["x.extra"].(map[string]any)["a"] = 2.0
	if raw["x.extra"].(map[string]any)["a"] != 1.0 {
		t.Error("translated content shares maps with the source")
	}
}

// TestTranslateTypedNilParsed: a typed nil in Parsed counts as no content.
func TestTranslateTypedNilParsed(t *testing.T) {
	src := &event.Event{Type: event.CallHangup, ID: "$h", RoomID: "!a:ferry.example", Content: event.Content{Parsed: (*event.CallHangupEventContent)(nil)}}
	if _, _, err := resolveAndTranslate(src, newFakeMapper(), testOrigin(src)); err != nil {
		t.Fatal(err)
	}
}
