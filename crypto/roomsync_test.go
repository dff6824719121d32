package crypto

import (
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// batchWatch collects the rooms-only /sync's batches.
type batchWatch struct {
	got chan SyncedBatch
}

func watchBatches(m *Machine) *batchWatch {
	w := &batchWatch{got: make(chan SyncedBatch, 100)}
	m.SyncedTimeline = func(_ context.Context, b SyncedBatch) error {
		w.got <- b
		return nil
	}
	return w
}

// waitFor waits for a batch holding evtID and returns it.
func (w *batchWatch) waitFor(t *testing.T, evtID id.EventID) SyncedBatch {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case b := <-w.got:
			if slices.ContainsFunc(b.Events, func(e *event.Event) bool { return e.ID == evtID }) {
				return b
			}
		case <-deadline:
			t.Fatalf("no /sync batch showed %s", evtID)
		}
	}
}

// In appservice mode the bot user's /sync without a device shows the rooms' events (a transaction the homeserver
// never sends is still seen), and it leaves everything of the device to the transactions: it never names the
// device (whose to-device messages such a /sync would take) and never uploads keys for it.
func TestRoomSyncShowsRoomEventsWithoutTheDevice(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := newASRig(t, fakehs.Options{KeepTimeline: true}, "")
	r.m.RoomSync = true
	w := watchBatches(r.m)
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	room := r.srv.CreateRoom(r.member.ID, fakehs.RoomOptions{Name: "synced", Encryption: r.enc, Members: []id.UserID{r.bot, r.ghost}})
	// The first batch (no token yet) only marks where the sync starts.
	select {
	case b := <-w.got:
		if !b.Initial {
			t.Fatal("the first batch of the rooms-only /sync is not marked initial")
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the rooms-only /sync never answered")
	}
	uploads := r.srv.Counts()["POST /_matrix/client/v3/keys/upload"]
	resp, err := r.asClient(t, r.ghost).SendMessageEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "seen by /sync"})
	if err != nil {
		t.Fatal(err)
	}
	b := w.waitFor(t, resp.EventID)
	if b.Initial {
		t.Error("a later batch is marked initial")
	}
	for _, e := range b.Events {
		if e.ID == resp.EventID && e.RoomID != room {
			t.Errorf("the synced event has room %s, want %s", e.RoomID, room)
		}
	}
	// Its token is kept apart from the device's (which the to-device catch-ups use): a device /sync never reads
	// on from it.
	if tok, err := r.m.bot.store.GetSecret(ctx, secretRoomSyncToken); err != nil || tok == "" {
		t.Errorf("the rooms-only /sync did not keep its token apart (%q, %v)", tok, err)
	}
	if n := r.srv.Counts()["POST /_matrix/client/v3/keys/upload"]; n != uploads {
		t.Errorf("the rooms-only /sync uploaded keys %d times (its answers have no key counts)", n-uploads)
	}
	calls := roomSyncCalls(r.srv)
	if len(calls) < 2 {
		t.Fatalf("%d /sync calls with the rooms-only filter, want at least 2", len(calls))
	}
	for _, c := range calls {
		if c.User != r.bot || !c.Appservice || c.Device != "" {
			t.Fatalf("a rooms-only /sync as %s, device %q, appservice token %v: want the bot with the appservice token and no device", c.User, c.Device, c.Appservice)
		}
	}

	// A restart reads on from the saved token: the first /sync of the new run is not initial, and shows what
	// happened while ferry was away.
	r.m.Stop()
	resp, err = r.asClient(t, r.ghost).SendMessageEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "sent while ferry was away"})
	if err != nil {
		t.Fatal(err)
	}
	before := len(roomSyncCalls(r.srv))
	r.m = r.newMachine(t)
	r.m.RoomSync = true
	w = watchBatches(r.m)
	if err = r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	if b = w.waitFor(t, resp.EventID); b.Initial {
		t.Error("after a restart the rooms-only /sync started over instead of reading on from its token")
	}
	if c := roomSyncCalls(r.srv)[before]; c.Since == "" {
		t.Error("the first /sync after the restart had no since token")
	}
}

// A homeserver that refuses the rooms-only /sync for good ends it, and says so once; it is not asked again and
// again.
func TestRoomSyncRefusedForGoodEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := newASRig(t, fakehs.Options{KeepTimeline: true, RefuseRoomSync: true}, "")
	r.m.RoomSync = true
	refused := make(chan error, 1)
	r.m.RoomSyncRefused = func(err error) { refused <- err }
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	select {
	case <-refused:
	case <-time.After(15 * time.Second):
		t.Fatal("a refused rooms-only /sync was never reported")
	}
	n := len(roomSyncCalls(r.srv))
	time.Sleep(time.Second)
	if again := len(roomSyncCalls(r.srv)); again != n {
		t.Errorf("the refused /sync was asked again %d times", again-n)
	}
	if got := r.logs.warnings("refuses the bot's rooms-only /sync"); len(got) != 1 {
		t.Errorf("%d warnings about the refusal, want 1", len(got))
	}
}

// With RoomSyncWanted false the rooms-only /sync idles after a batch: no request waits at the homeserver (each
// would be computed again for every event in the bot's rooms), and it reads once when woken, or after
// roomSyncIdle. While wanted, it reads on.
func TestRoomSyncIdlesUntilWoken(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	defer func(d time.Duration) { roomSyncIdle = d }(roomSyncIdle)
	roomSyncIdle = time.Hour
	r := newASRig(t, fakehs.Options{KeepTimeline: true}, "")
	r.m.RoomSync = true
	var wanted atomic.Bool
	r.m.RoomSyncWanted = wanted.Load
	w := watchBatches(r.m)
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	room := r.srv.CreateRoom(r.member.ID, fakehs.RoomOptions{Name: "idle", Encryption: r.enc, Members: []id.UserID{r.bot, r.ghost}})
	send := func(body string) id.EventID {
		resp, err := r.asClient(t, r.ghost).SendMessageEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
		if err != nil {
			t.Fatal(err)
		}
		return resp.EventID
	}
	select {
	case <-w.got: // the first batch
	case <-time.After(15 * time.Second):
		t.Fatal("the rooms-only /sync never answered")
	}
	time.Sleep(200 * time.Millisecond)
	idle := len(roomSyncCalls(r.srv))
	quiet := send("no /sync waits for this")
	time.Sleep(500 * time.Millisecond)
	if n := len(roomSyncCalls(r.srv)); n != idle {
		t.Fatalf("the idle rooms-only /sync made %d more requests", n-idle)
	}
	r.m.WakeRoomSync()
	if b := w.waitFor(t, quiet); b.Initial {
		t.Fatal("the read after a wake-up is marked initial")
	}
	// Wanted, it reads on: a message sent later is shown without another wake-up.
	wanted.Store(true)
	r.m.WakeRoomSync()
	time.Sleep(300 * time.Millisecond)
	w.waitFor(t, send("shown by the waiting /sync"))
}

// An idle rooms-only /sync still reads every roomSyncIdle, unwoken: an event no push brought, with no transaction
// after it to show the gap, is shown within that time.
func TestIdleRoomSyncReadsOnItsOwn(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	defer func(d time.Duration) { roomSyncIdle = d }(roomSyncIdle)
	roomSyncIdle = 300 * time.Millisecond
	r := newASRig(t, fakehs.Options{KeepTimeline: true}, "")
	r.m.RoomSync = true
	r.m.RoomSyncWanted = func() bool { return false }
	w := watchBatches(r.m)
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	select {
	case <-w.got: // the first batch
	case <-time.After(15 * time.Second):
		t.Fatal("the rooms-only /sync never answered")
	}
	room := r.srv.CreateRoom(r.member.ID, fakehs.RoomOptions{Name: "unwoken", Encryption: r.enc, Members: []id.UserID{r.bot, r.ghost}})
	resp, err := r.asClient(t, r.ghost).SendMessageEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "never pushed"})
	if err != nil {
		t.Fatal(err)
	}
	w.waitFor(t, resp.EventID)
}

// roomSyncCalls are the /sync calls of the rooms-only sync loop: those with a stored filter (the to-device
// catch-ups of appservice mode give theirs inline).
func roomSyncCalls(srv *fakehs.Server) []fakehs.SyncCall {
	return slices.DeleteFunc(srv.SyncCalls(), func(c fakehs.SyncCall) bool { return strings.HasPrefix(c.Filter, "{") })
}

// A room the bot joined since the previous batch comes with events from before the join (Synapse shows the
// room's recent history with it). They are marked BeforeJoin, and no gap before them is filled: they are the
// room's past, which the relay must not apply over newer state or relay. A later join of someone else, or the
// bot's own profile change, marks nothing.
func TestSyncedBatchMarksHistoryBeforeTheBotsJoin(t *testing.T) {
	ctx := context.Background()
	bot := id.UserID("@bot:example.org")
	member := func(evtID id.EventID, user id.UserID, membership string, prev string) *event.Event {
		evt := &event.Event{ID: evtID, Type: event.StateMember, Sender: user, StateKey: ptr(user.String()),
			Content: event.Content{Raw: map[string]any{"membership": membership}}}
		if prev != "" {
			evt.Unsigned.PrevContent = &event.Content{Raw: map[string]any{"membership": prev}}
		}
		return evt
	}
	plain := func(evtID id.EventID, t event.Type) *event.Event {
		return &event.Event{ID: evtID, Type: t, Sender: "@alice:example.org", StateKey: ptr("")}
	}
	var got SyncedBatch
	store := &afterBatchStore{SyncStore: mautrix.NewMemorySyncStore()}
	s := &cryptoSyncer{roomsOnly: true, client: &mautrix.Client{UserID: bot}, store: store, log: zerolog.Nop(),
		timeline: func(_ context.Context, b SyncedBatch) error { got = b; return nil }}
	resp := &mautrix.RespSync{NextBatch: "s2"}
	resp.Rooms.Join = map[id.RoomID]*mautrix.SyncJoinedRoom{
		// Joined in this batch, with a limited timeline: the old power levels come before the join.
		"!new:example.org": {Timeline: mautrix.SyncTimeline{Limited: true, PrevBatch: "p1", SyncEventsList: mautrix.SyncEventsList{Events: []*event.Event{
			plain("$create", event.StateCreate), plain("$old-power", event.StatePowerLevels),
			member("$invite", bot, "invite", ""), member("$join", bot, "join", "invite"), plain("$new-power", event.StatePowerLevels),
		}}}},
		// A room the bot was in already: someone else joins, the bot changes its name.
		"!old:example.org": {Timeline: mautrix.SyncTimeline{SyncEventsList: mautrix.SyncEventsList{Events: []*event.Event{
			plain("$topic", event.StateTopic), member("$carol", "@carol:example.org", "join", ""), member("$rename", bot, "join", "join"),
		}}}},
	}
	if err := s.ProcessResponse(ctx, resp, "s1"); err != nil {
		t.Fatal(err)
	}
	for evtID, want := range map[id.EventID]bool{"$create": true, "$old-power": true, "$invite": true, "$join": false, "$new-power": false, "$topic": false, "$carol": false, "$rename": false} {
		if got.BeforeJoin[evtID] != want {
			t.Errorf("%s: BeforeJoin %v, want %v", evtID, got.BeforeJoin[evtID], want)
		}
	}
	if got.Incomplete["!new:example.org"] {
		t.Error("the joined room is marked incomplete: its events since the join are all there")
	}
}

func ptr[T any](v T) *T { return &v }

// Stop returns only once the /sync loop has: a batch still being handled when Stop is called ends (its context
// cancelled) before Stop returns, so nothing of the loop (a handler, a saved token, a log line) runs on after the
// caller closed what it uses. Both loops: the rooms-only /sync of appservice mode (Synapse), and the bot device's
// /sync of the login + /sync path (a homeserver without MSC4190, as Dendrite).
func TestStopWaitsForTheSyncLoop(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts fakehs.Options
	}{
		{"rooms-only", fakehs.Options{KeepTimeline: true}},
		{"device", fakehs.Options{KeepTimeline: true, NoMSC4190: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r := newASRig(t, tc.opts, "")
			r.m.RoomSync = true
			r.m.RoomSyncWanted = func() bool { return true }
			entered := make(chan struct{})
			var once atomic.Bool
			var ended atomic.Bool
			r.m.SyncedTimeline = func(ctx context.Context, _ SyncedBatch) error {
				if !once.CompareAndSwap(false, true) {
					return nil
				}
				close(entered)
				<-ctx.Done()
				time.Sleep(200 * time.Millisecond) // a handler finishing its write after the cancel
				ended.Store(true)
				return ctx.Err()
			}
			if err := r.m.Init(ctx); err != nil {
				t.Fatal(err)
			}
			if got := r.m.AppserviceMode(); got != (tc.name == "rooms-only") {
				t.Fatalf("appservice mode %v on this homeserver", got)
			}
			r.m.Start(ctx)
			select {
			case <-entered:
			case <-time.After(15 * time.Second):
				t.Fatal("the /sync never answered")
			}
			r.m.Stop()
			if !ended.Load() {
				t.Fatal("Stop returned while a /sync batch was still being handled")
			}
			calls := len(r.srv.SyncCalls())
			time.Sleep(300 * time.Millisecond)
			if n := len(r.srv.SyncCalls()); n != calls {
				t.Fatalf("%d /sync requests after Stop returned", n-calls)
			}
		})
	}
}
