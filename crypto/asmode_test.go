package crypto

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

const (
	asmodeASToken = "asmode-as-token"
	asmodePickle  = "asmode-pickle-key"
)

// Request counters of the fake homeserver that tell which encryption path ferry took.
const (
	routeLogin     = "POST /_matrix/client/v3/login"
	routeSync      = "GET /_matrix/client/v3/sync"
	routePutDevice = "PUT /_matrix/client/v3/devices/{deviceID}"
	routeKeysQuery = "POST /_matrix/client/v3/keys/query"
)

// lockedBuffer collects log output written from several goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// lines returns the JSON log lines at warn level or above whose message contains substr.
func (b *lockedBuffer) warnings(substr string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, line := range strings.Split(b.buf.String(), "\n") {
		var entry struct {
			Level   string `json:"level"`
			Message string `json:"message"`
		}
		if json.Unmarshal([]byte(line), &entry) != nil || (entry.Level != "warn" && entry.Level != "error") {
			continue
		}
		if strings.Contains(entry.Message, substr) {
			out = append(out, entry.Message)
		}
	}
	return out
}

// asRig is ferry's crypto Machine with encryption.appservice on, in front of a fake homeserver, with one real
// member (a mautrix OlmMachine cross-signed like an Element user, sharing its room keys only with cross-signed
// devices) in an encrypted room with ferry's bot and one ghost.
type asRig struct {
	srv    *fakehs.Server
	m      *Machine
	logs   *lockedBuffer
	member *fakehs.User
	bot    id.UserID
	ghost  id.UserID
	room   id.RoomID
	enc    *event.EncryptionEventContent
	db     *dbutil.Database
	ss     *sqlstatestore.SQLStateStore
	secret string
}

func newASRig(t *testing.T, opts fakehs.Options, sharedSecret string) *asRig {
	t.Helper()
	return newASRigOn(t, opts, sharedSecret, dbtest.Open(t, "postgres"))
}

// newASRigOn is newASRig on the given database.
func newASRigOn(t *testing.T, opts fakehs.Options, sharedSecret string, db *dbutil.Database) *asRig {
	t.Helper()
	ctx := context.Background()
	opts.ASID, opts.ASToken, opts.HSToken, opts.ASBotLocalpart = "ferry", asmodeASToken, "asmode-hs-token", "ferrybot"
	opts.ASUsers = regexp.MustCompile(`^@ghost_.*:` + regexp.QuoteMeta(fakehs.DefaultDomain) + `$`)
	opts.NoEcho = true
	srv := fakehs.New(opts)
	t.Cleanup(srv.Close)
	r := &asRig{srv: srv, logs: &lockedBuffer{}, bot: srv.BotID(), ghost: id.NewUserID("ghost_alice", srv.Domain()),
		room: id.RoomID("!asmode:" + srv.Domain()), enc: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}}

	// The ghost is registered by the appservice before it sends, as the relay's intents do.
	if _, err := r.asClient(t, r.bot).MakeRequest(ctx, http.MethodPost, r.asClient(t, r.bot).BuildClientURL("v3", "register"),
		map[string]any{"type": mautrix.AuthTypeAppservice, "username": r.ghost.Localpart(), "inhibit_login": true}, nil); err != nil {
		t.Fatal(err)
	}
	var err error
	r.member, err = srv.NewUser(ctx, id.NewUserID("member", srv.Domain()), fakehs.UserOptions{CrossSign: true, ShareMinTrust: id.TrustStateCrossSignedTOFU})
	if err != nil {
		t.Fatal(err)
	}

	ss := sqlstatestore.NewSQLStateStore(db, dbutil.NoopLogger, false)
	if err = ss.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	inRoom := []id.UserID{r.member.ID, r.bot, r.ghost}
	for _, u := range inRoom {
		if err = ss.SetMembership(ctx, r.room, u, event.MembershipJoin); err != nil {
			t.Fatal(err)
		}
	}
	if err = ss.SetEncryptionEvent(ctx, r.room, r.enc); err != nil {
		t.Fatal(err)
	}
	if err = r.member.SetRoom(ctx, r.room, inRoom, r.enc); err != nil {
		t.Fatal(err)
	}

	r.db, r.ss, r.secret = db, ss, sharedSecret
	r.m = r.newMachine(t)
	srv.ResetCounts() // from here on the counters show only what ferry's Machine does
	return r
}

// startASRig is newASRig with the Machine initialised and started (the caller stops it).
func startASRig(ctx context.Context, t *testing.T, opts fakehs.Options, sharedSecret string) *asRig {
	t.Helper()
	r := newASRig(t, opts, sharedSecret)
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	return r
}

// newMachine makes ferry's crypto Machine (encryption.appservice on) over the rig's database, as a start does.
func (r *asRig) newMachine(t *testing.T) *Machine {
	cfg := DefaultConfig()
	cfg.PickleKey, cfg.Appservice = asmodePickle, true
	isOwn := func(u id.UserID) bool { return u == r.bot || strings.HasPrefix(string(u), "@ghost_") }
	m := NewMachine(zerolog.New(r.logs), cfg, r.db, r.ss, r.asClient(t, r.bot), isOwn)
	m.SharedSecret = r.secret
	m.NewUserClient = func(u id.UserID) *mautrix.Client { return r.asClient(t, u) }
	return m
}

// asClient is an appservice client acting as user, as appservice.AppService.NewMautrixClient makes them.
func (r *asRig) asClient(t *testing.T, user id.UserID) *mautrix.Client {
	t.Helper()
	cli, err := mautrix.NewClient(r.srv.URL, user, asmodeASToken)
	if err != nil {
		t.Fatal(err)
	}
	cli.SetAppServiceUserID = true
	cli.Client = r.srv.Client()
	cli.Log = zerolog.Nop()
	return cli
}

// sendAs encrypts a message as one of ferry's users through the Machine, as the relay does.
func (r *asRig) sendAs(t *testing.T, sender id.UserID, body string) *event.Event {
	t.Helper()
	enc, err := r.m.Encrypt(context.Background(), sender, r.room, event.EventMessage, &event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: body}})
	if err != nil {
		t.Fatalf("%s cannot send %q: %v", sender, body, err)
	}
	return &event.Event{ID: id.EventID("$" + strings.ReplaceAll(body, " ", "_")), RoomID: r.room, Sender: sender, Type: event.EventEncrypted, Content: event.Content{Parsed: enc}}
}

// memberReads has the member receive its to-device messages and decrypt evt, and returns the trust its client
// gives the sending device.
func (r *asRig) memberReads(t *testing.T, evt *event.Event, body string) id.TrustState {
	t.Helper()
	ctx := context.Background()
	r.member.ReceiveToDevice(ctx)
	dec, err := r.member.Decrypt(ctx, evt)
	if err != nil {
		t.Fatalf("the member cannot decrypt %q from %s: %v", body, evt.Sender, err)
	}
	if got := dec.Content.AsMessage().Body; got != body {
		t.Fatalf("the member decrypted %q, want %q", got, body)
	}
	return dec.Mautrix.TrustState
}

// memberSends has the member send a message into the room (sharing its room key with the room's cross-signed
// devices) and returns it as the bot would receive it.
func (r *asRig) memberSends(t *testing.T, body string) *event.Event {
	t.Helper()
	enc, _, err := r.member.Encrypt(context.Background(), r.room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
	if err != nil {
		t.Fatal(err)
	}
	return &event.Event{ID: id.EventID("$member_" + strings.ReplaceAll(body, " ", "_")), RoomID: r.room, Sender: r.member.ID, Type: event.EventEncrypted, Content: event.Content{Parsed: enc}}
}

// TestAppserviceModeMSC4190 runs the Machine with encryption.appservice on a homeserver that offers MSC4190 and
// asks ordinary users for their password before cross-signing uploads (as Synapse does): the bot's and a ghost's
// devices are created through the appservice and cross-signed without any password, login or /sync; the member
// reads the ghost's and the bot's messages with their devices cross-signed by their owners; and the member's room
// key reaches the bot only through an appservice transaction.
func TestAppserviceModeMSC4190(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := startASRig(ctx, t, fakehs.Options{CrossSigningUIA: true}, "")
	first := r.m
	defer first.Stop()
	if !r.m.AppserviceMode() {
		t.Fatal("the Machine left appservice mode on a homeserver with MSC4190")
	}
	if got := r.logs.warnings("MSC4190"); len(got) != 0 {
		t.Errorf("warnings about MSC4190 on a homeserver that has it: %q", got)
	}
	botDevices := r.srv.Devices(r.bot)
	if len(botDevices) != 1 || botDevices[0] != r.m.DeviceID() {
		t.Fatalf("the bot's devices on the server are %v, want only %s", botDevices, r.m.DeviceID())
	}

	// A ghost's message: its own device, created through MSC4190 and cross-signed by the ghost.
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	ghostDevices := r.srv.Devices(r.ghost)
	if len(ghostDevices) != 1 {
		t.Fatalf("the ghost has devices %v on the server, want exactly one", ghostDevices)
	}
	ghostMsg := r.sendAs(t, r.ghost, "hello from the ghost")
	if dev := ghostMsg.Content.AsEncrypted().DeviceID; dev != ghostDevices[0] {
		t.Errorf("the ghost's message was encrypted by device %s, want the ghost's own device %s", dev, ghostDevices[0])
	}
	if trust := r.memberReads(t, ghostMsg, "hello from the ghost"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's client sees the ghost's device as %s, want cross-signed by its owner (%s)", trust, id.TrustStateCrossSignedTOFU)
	}
	// The bot's own reply.
	botMsg := r.sendAs(t, r.bot, "the bot replies")
	if dev := botMsg.Content.AsEncrypted().DeviceID; dev != r.m.DeviceID() {
		t.Errorf("the bot's reply was encrypted by device %s, want the bot's device %s", dev, r.m.DeviceID())
	}
	if trust := r.memberReads(t, botMsg, "the bot replies"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's client sees the bot's device as %s, want cross-signed by its owner (%s)", trust, id.TrustStateCrossSignedTOFU)
	}

	// The member writes: its client shares the room key only with cross-signed devices, so the bot gets it only
	// because its device is cross-signed, and only through the transaction the homeserver pushes.
	memberMsg := r.memberSends(t, "hello ferry")
	if _, err := r.m.Decrypt(ctx, memberMsg); !errors.Is(err, ErrKeyMissing) {
		t.Fatalf("before the transaction the bot's decryption gave %v, want %v", err, ErrKeyMissing)
	}
	if err := r.m.HandleTransactionCrypto(ctx, r.srv.TakeAppserviceTransaction()); err != nil {
		t.Fatal(err)
	}
	dec, err := r.m.Decrypt(ctx, memberMsg)
	if err != nil || dec.Content.AsMessage().Body != "hello ferry" {
		t.Fatalf("the bot cannot decrypt the member's message after the transaction: %v", err)
	}
	// The transaction also carried the member's room key to the ghost's device, and that queue is now empty.
	if left := r.srv.TakeToDevice(r.ghost, ghostDevices[0]); len(left) != 0 {
		t.Errorf("%d to-device events still queued for the ghost's device after the transaction", len(left))
	}

	counts := r.srv.Counts()
	if counts[routeLogin] != 0 {
		t.Errorf("appservice mode logged in %d times, want none", counts[routeLogin])
	}
	// (A device /sync loop begun by Start would have asked by now, through all the round trips above.)
	onlyToDeviceCatchUps(t, r.srv, r.bot, first.DeviceID())
	if counts[routePutDevice] != 2 {
		t.Errorf("%d MSC4190 device creations, want 2 (the bot and the ghost)", counts[routePutDevice])
	}
	if n := counts["POST /_synapse/admin/v1/register"]; n != 0 {
		t.Errorf("ferry used the shared-secret registration %d times without needing it", n)
	}

	// A restart reuses the bot's and the ghost's devices and identities: no new devices, and the member's
	// client still sees the ghost's messages as cross-signed by the same owner.
	first.Stop()
	botDevice := first.DeviceID()
	r.m = r.newMachine(t)
	if err = r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	if r.m.DeviceID() != botDevice {
		t.Errorf("after a restart the bot uses device %s, want %s", r.m.DeviceID(), botDevice)
	}
	if err = r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	if devs := r.srv.Devices(r.bot); len(devs) != 1 {
		t.Errorf("after a restart the bot has devices %v, want one", devs)
	}
	if devs := r.srv.Devices(r.ghost); len(devs) != 1 || devs[0] != ghostDevices[0] {
		t.Errorf("after a restart the ghost has devices %v, want only %s", devs, ghostDevices[0])
	}
	again := r.sendAs(t, r.ghost, "the ghost after a restart")
	if trust := r.memberReads(t, again, "the ghost after a restart"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("after a restart the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
	}
	if n := r.srv.Counts()[routeLogin]; n != 0 {
		t.Errorf("the restart logged in (%d requests)", n)
	}
	onlyToDeviceCatchUps(t, r.srv, r.bot, botDevice)
}

// onlyToDeviceCatchUps checks that every /sync ferry ran in appservice mode was a catch-up of the bot device's
// to-device messages: the appservice's token as the bot's device, rooms and everything else filtered out.
func onlyToDeviceCatchUps(t *testing.T, srv *fakehs.Server, bot id.UserID, device id.DeviceID) {
	t.Helper()
	for _, c := range srv.SyncCalls() {
		if c.User != bot || c.Device != device || !c.Appservice || c.Filter != drainFilter {
			t.Errorf("appservice mode ran a /sync that is not a to-device catch-up of the bot's device: %+v", c)
		}
	}
}

// TestAppserviceModeWithoutMSC4190 runs the Machine with encryption.appservice on homeservers without MSC4190
// (cross-signing needs the password UIA there, as on Dendrite): ferry says so in one warning that names the
// config key and what the homeserver lacks, then falls back to m.login.application_service devices and /sync;
// with homeserver.registration_shared_secret ghosts still get their own cross-signed devices, without it they
// use the bot's device (single-device mode). A homeserver that allows no appservice login either stops start-up
// with an error naming the key.
func TestAppserviceModeWithoutMSC4190(t *testing.T) {
	t.Run("shared_secret", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r := newASRig(t, fakehs.Options{NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"}, "asmode-secret")
		if err := r.m.Init(ctx); err != nil {
			t.Fatal(err)
		}
		checkFallbackLine(t, r, "404 M_NOT_FOUND", "per-ghost devices")
		r.m.Start(ctx)
		defer r.m.Stop()

		if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
			t.Fatal(err)
		}
		ghostDevices := r.srv.Devices(r.ghost)
		if len(ghostDevices) != 1 {
			t.Fatalf("the ghost has devices %v on the server, want exactly one", ghostDevices)
		}
		ghostMsg := r.sendAs(t, r.ghost, "ghost after fallback")
		if dev := ghostMsg.Content.AsEncrypted().DeviceID; dev != ghostDevices[0] {
			t.Errorf("the ghost's message was encrypted by device %s, want the ghost's own device %s", dev, ghostDevices[0])
		}
		if trust := r.memberReads(t, ghostMsg, "ghost after fallback"); trust != id.TrustStateCrossSignedTOFU {
			t.Errorf("the member's client sees the ghost's device as %s, want cross-signed by its owner", trust)
		}
		// The member's room key reaches the bot through its /sync loop.
		memberMsg := r.memberSends(t, "hello over sync")
		if !r.m.WaitForKey(ctx, memberMsg, 10*time.Second) {
			t.Fatal("the member's room key never reached the bot through /sync")
		}
		if dec, err := r.m.Decrypt(ctx, memberMsg); err != nil || dec.Content.AsMessage().Body != "hello over sync" {
			t.Fatalf("the bot cannot decrypt the member's message: %v", err)
		}
		if n := r.srv.Counts()[routeLogin]; n == 0 {
			t.Error("the fallback did not log any device in")
		}
	})

	t.Run("single_device", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r := newASRig(t, fakehs.Options{NoMSC4190: true, CrossSigningUIA: true}, "")
		if err := r.m.Init(ctx); err != nil {
			t.Fatal(err)
		}
		checkFallbackLine(t, r, "404 M_NOT_FOUND", "single-device mode")
		r.m.Start(ctx)
		defer r.m.Stop()

		ghostMsg := r.sendAs(t, r.ghost, "ghost in single-device mode")
		if dev := ghostMsg.Content.AsEncrypted().DeviceID; dev != r.m.DeviceID() {
			t.Errorf("the ghost's message was encrypted by device %s, want the bot's device %s", dev, r.m.DeviceID())
		}
		if devs := r.srv.Devices(r.ghost); len(devs) != 0 {
			t.Errorf("the ghost got devices %v in single-device mode", devs)
		}
		r.memberReads(t, ghostMsg, "ghost in single-device mode")
	})

	t.Run("no_device_possible", func(t *testing.T) {
		r := newASRig(t, fakehs.Options{NoMSC4190: true, NoAppserviceLogin: true}, "")
		err := r.m.Init(context.Background())
		if err == nil {
			t.Fatal("Init succeeded on a homeserver that allows the bot no device")
		}
		for _, want := range []string{"encryption.appservice", "MSC4190", "m.login.application_service"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("the start-up error %q does not mention %s", err, want)
			}
		}
	})
}

// TestMSC4190Detection: each way a homeserver without MSC4190 refuses appservice device creation makes ferry fall
// back (in one warning) to m.login.application_service devices, while a server error, a rate limit or a refusal
// for another reason stops start-up with an error naming encryption.appservice instead of switching paths for the
// whole run on a passing failure.
func TestMSC4190Detection(t *testing.T) {
	for _, tc := range []struct {
		status   int
		code     string
		fallback bool
	}{
		{http.StatusNotFound, "M_NOT_FOUND", true},
		{http.StatusNotFound, "M_UNRECOGNIZED", true},
		{http.StatusNotFound, "", true},
		{http.StatusMethodNotAllowed, "", true},
		{http.StatusMethodNotAllowed, "M_UNRECOGNIZED", true},
		{http.StatusNotImplemented, "", true},
		{http.StatusBadRequest, "M_UNRECOGNIZED", true},
		{http.StatusBadRequest, "M_UNKNOWN", true},
		{http.StatusInternalServerError, "M_UNKNOWN", false},
		{http.StatusBadGateway, "", false},
		{http.StatusForbidden, "M_FORBIDDEN", false},
		{http.StatusTooManyRequests, "M_LIMIT_EXCEEDED", false},
		{http.StatusBadRequest, "M_INVALID_PARAM", false},
	} {
		name := fmt.Sprintf("%d_%s", tc.status, tc.code)
		t.Run(name, func(t *testing.T) {
			r := newASRig(t, fakehs.Options{NoMSC4190: true, NoMSC4190Status: tc.status, NoMSC4190Code: tc.code}, "")
			err := r.m.Init(context.Background())
			if !tc.fallback {
				if err == nil {
					t.Fatalf("Init fell back or went on after %s", name)
				}
				if !strings.Contains(err.Error(), "encryption.appservice") {
					t.Errorf("the start-up error %q does not name encryption.appservice", err)
				}
				if n := r.srv.Counts()[routeLogin]; n != 0 {
					t.Errorf("ferry logged in (%d times) after %s instead of stopping", n, name)
				}
				return
			}
			if err != nil {
				t.Fatalf("Init did not fall back after %s: %v", name, err)
			}
			answered := strings.TrimSpace(fmt.Sprintf("%d %s", tc.status, tc.code))
			checkFallbackLine(t, r, answered+")", "single-device mode")
			if n := r.srv.Counts()[routeLogin]; n != 1 {
				t.Errorf("the fallback logged the bot's device in %d times, want once", n)
			}
		})
	}
}

// checkFallbackLine checks that Init said, in exactly one warning, that encryption.appservice cannot be used
// because the homeserver lacks MSC4190, and what it falls back to.
func checkFallbackLine(t *testing.T, r *asRig, answered, fallback string) {
	t.Helper()
	if r.m.AppserviceMode() {
		t.Fatal("the Machine stayed in appservice mode on a homeserver without MSC4190")
	}
	lines := r.logs.warnings("MSC4190")
	if len(lines) != 1 {
		t.Fatalf("%d warnings about MSC4190, want exactly one: %q", len(lines), lines)
	}
	t.Logf("start-up warning: %s", lines[0])
	for _, want := range []string{"encryption.appservice", "does not offer MSC4190", "answered " + answered, "/sync", fallback} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("the fallback warning %q does not say %q", lines[0], want)
		}
	}
	// A transaction the homeserver might still push is left to /sync, which delivers the same events.
	if err := r.m.HandleTransactionCrypto(context.Background(), json.RawMessage(`{"events":[]}`)); err != nil {
		t.Errorf("a transaction after the fallback failed: %v", err)
	}
}

// TestDecryptOwn: ferry reads back what its own devices encrypted (the relay does so after an unclean stop to
// find what it had sent): a ghost's message with the ghost's device's copy of its session, the bot's with the
// bot's, also after a restart of the Machine (a new process); a member's message is not ferry's own.
func TestDecryptOwn(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := startASRig(ctx, t, fakehs.Options{CrossSigningUIA: true}, "")
	ghostMsg := r.sendAs(t, r.ghost, "the ghost's copy")
	botMsg := r.sendAs(t, r.bot, "the bot's notice")
	memberMsg := r.memberSends(t, "the member's message")
	check := func(m *Machine, evt *event.Event, body string) {
		t.Helper()
		dec, err := m.DecryptOwn(ctx, evt)
		if err != nil {
			t.Fatalf("cannot read back %q: %v", body, err)
		}
		if got := dec.Content.AsMessage().Body; got != body {
			t.Fatalf("read back %q, want %q", got, body)
		}
	}
	check(r.m, ghostMsg, "the ghost's copy")
	check(r.m, botMsg, "the bot's notice")
	if _, err := r.m.DecryptOwn(ctx, memberMsg); err == nil {
		t.Error("a member's message was read back as ferry's own")
	}
	// An unclean stop (no Stop): the next process still reads back what the last one sent.
	again := r.newMachine(t)
	if err := again.Init(ctx); err != nil {
		t.Fatal(err)
	}
	again.Start(ctx)
	defer again.Stop()
	check(again, ghostMsg, "the ghost's copy")
	check(again, botMsg, "the bot's notice")
}

// TestBotDeviceVanished: when the bot's device was deleted on the homeserver while ferry was stopped, the next
// start notices (its keys are gone from the server), says so, and creates a fresh device, cross-signed again,
// whose messages members read; the old device is not used again and does not linger on the server. Both paths:
// MSC4190 devices, and m.login.application_service logins with password UIA (Dendrite).
func TestBotDeviceVanished(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   fakehs.Options
		secret string
	}{
		{"msc4190", fakehs.Options{CrossSigningUIA: true}, ""},
		{"login", fakehs.Options{NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"}, "asmode-secret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r := startASRig(ctx, t, tc.opts, tc.secret)
			old := r.m.DeviceID()
			r.memberReads(t, r.sendAs(t, r.bot, "before the deletion"), "before the deletion")
			r.m.Stop()

			r.srv.DeleteDevice(r.bot, old)
			r.m = r.newMachine(t)
			if err := r.m.Init(ctx); err != nil {
				t.Fatalf("start after the device vanished: %v", err)
			}
			r.m.Start(ctx)
			defer r.m.Stop()
			if got := r.logs.warnings("vanished"); len(got) != 1 {
				t.Errorf("%d warnings about the vanished device, want one: %q", len(got), got)
			}
			fresh := r.m.DeviceID()
			if fresh == "" || fresh == old {
				t.Fatalf("the bot's device is %q after %q vanished, want a new one", fresh, old)
			}
			if devs := r.srv.Devices(r.bot); len(devs) != 1 || devs[0] != fresh {
				t.Fatalf("the bot's devices on the server are %v, want only %s", devs, fresh)
			}
			msg := r.sendAs(t, r.bot, "after the deletion")
			if dev := msg.Content.AsEncrypted().DeviceID; dev != fresh {
				t.Errorf("the bot's message was encrypted by %s, want the new device %s", dev, fresh)
			}
			if trust := r.memberReads(t, msg, "after the deletion"); trust != id.TrustStateCrossSignedTOFU {
				t.Errorf("the member sees the new device as %s, want cross-signed by the bot", trust)
			}
		})
	}
}

// TestDeviceListChangesWaitForKeyShares: the device-list fetch a change triggers (from /sync, or from an
// appservice transaction) waits while a key share holds the member's key lock, so a share never sees a member's
// new device before its signatures; it happens once the lock is free.
func TestDeviceListChangesWaitForKeyShares(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   fakehs.Options
		secret string
	}{
		{"sync", fakehs.Options{NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"}, "asmode-secret"},
		{"transaction", fakehs.Options{CrossSigningUIA: true}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r := startASRig(ctx, t, tc.opts, tc.secret)
			defer r.m.Stop()
			r.sendAs(t, r.bot, "the member's devices are now tracked")
			change := func() {
				if tc.name == "sync" {
					resp := &mautrix.RespSync{DeviceLists: mautrix.DeviceLists{Changed: []id.UserID{r.member.ID}}}
					_ = r.m.client.Syncer.(*cryptoSyncer).ProcessResponse(ctx, resp, "since")
				} else {
					raw, _ := json.Marshal(map[string]any{"events": []any{}, "device_lists": map[string]any{"changed": []id.UserID{r.member.ID}}})
					_ = r.m.HandleTransactionCrypto(ctx, raw)
				}
			}
			queries := func() int64 { return r.srv.Counts()[routeKeysQuery] }

			unlock := r.m.cache.keyLocks.lock([]id.UserID{r.member.ID}) // a key share is checking the member's devices
			before := queries()
			done := make(chan struct{})
			go func() {
				defer close(done)
				change()
			}()
			select {
			case <-done:
				unlock()
				t.Fatal("the device-list change was handled while a key share held the lock")
			case <-time.After(300 * time.Millisecond):
			}
			if n := queries(); n != before {
				t.Errorf("%d key queries while a key share held the lock", n-before)
			}
			unlock()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("the device-list change was not handled after the lock was freed")
			}
			if queries() == before {
				t.Error("the changed device list was never fetched")
			}
		})
	}
}

// TestKeySharesDoNotWaitForOtherMembersFetches: a key share waits only for fetches of the device lists of the
// users it shares with. While the homeserver is slow to answer for one member's keys (a device-list change
// being fetched), a key share into another room, where that member is not, goes ahead. Before, one lock held
// every share in every room behind any fetch: an established link's session rotation waited seconds while new
// senders' ghosts were set up in other rooms, and the link's messages behind it.
func TestKeySharesDoNotWaitForOtherMembersFetches(t *testing.T) {
	t.Run("sync", func(t *testing.T) { keySharesDoNotWait(t, true) })
	t.Run("transaction", func(t *testing.T) { keySharesDoNotWait(t, false) })
}

// keySharesDoNotWait is TestKeySharesDoNotWaitForOtherMembersFetches with the device-list change coming from
// /sync (Dendrite's path) or from an appservice transaction (Synapse's).
func keySharesDoNotWait(t *testing.T, syncPath bool) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var holdFor sync.Map // user ID → true: key queries asking for that user wait until release
	held := make(chan struct{}, 1)
	release := make(chan struct{})
	var releaseOnce sync.Once
	releaseAll := func() { releaseOnce.Do(func() { close(release) }) }
	defer releaseAll()
	opts, secret := fakehs.Options{CrossSigningUIA: true}, ""
	if syncPath {
		opts, secret = fakehs.Options{NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"}, "asmode-secret"
	}
	opts.BeforeRequest = func(route string, body []byte) {
		if route != routeKeysQuery {
			return
		}
		hold := false
		holdFor.Range(func(u, _ any) bool {
			hold = hold || bytes.Contains(body, []byte(u.(id.UserID)))
			return !hold
		})
		if hold {
			select {
			case held <- struct{}{}:
			default:
			}
			<-release
		}
	}
	r := startASRig(ctx, t, opts, secret)
	defer r.m.Stop()
	r.sendAs(t, r.ghost, "the member's devices are now tracked")

	// A second room, without the member.
	other, err := r.srv.NewUser(ctx, id.NewUserID("other", r.srv.Domain()), fakehs.UserOptions{CrossSign: true, ShareMinTrust: id.TrustStateCrossSignedTOFU})
	if err != nil {
		t.Fatal(err)
	}
	roomY := id.RoomID("!other-room:" + r.srv.Domain())
	inY := []id.UserID{other.ID, r.bot, r.ghost}
	for _, u := range inY {
		if err = r.ss.SetMembership(ctx, roomY, u, event.MembershipJoin); err != nil {
			t.Fatal(err)
		}
	}
	if err = r.ss.SetEncryptionEvent(ctx, roomY, r.enc); err != nil {
		t.Fatal(err)
	}
	if err = other.SetRoom(ctx, roomY, inY, r.enc); err != nil {
		t.Fatal(err)
	}

	// The member's device list changes; the homeserver is slow to answer ferry's fetch of it.
	holdFor.Store(r.member.ID, true)
	changed := make(chan struct{})
	go func() {
		defer close(changed)
		if syncPath {
			resp := &mautrix.RespSync{DeviceLists: mautrix.DeviceLists{Changed: []id.UserID{r.member.ID}}}
			_ = r.m.client.Syncer.(*cryptoSyncer).ProcessResponse(ctx, resp, "since")
			return
		}
		raw, _ := json.Marshal(map[string]any{"events": []any{}, "device_lists": map[string]any{"changed": []id.UserID{r.member.ID}}})
		_ = r.m.HandleTransactionCrypto(ctx, raw)
	}()
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("ferry never fetched the member's changed device list")
	}

	type result struct {
		enc *event.EncryptedEventContent
		err error
	}
	sent := make(chan result, 1)
	go func() {
		enc, err := r.m.Encrypt(ctx, r.ghost, roomY, event.EventMessage, &event.Content{Parsed: &event.MessageEventContent{MsgType: event.MsgText, Body: "in the other room"}})
		sent <- result{enc, err}
	}()
	var res result
	select {
	case res = <-sent:
	case <-time.After(5 * time.Second):
		t.Error("a key share into a room without the member waited for the fetch of the member's device list")
		releaseAll()
		res = <-sent
	}
	releaseAll()
	<-changed
	if res.err != nil {
		t.Fatalf("the ghost cannot send into the other room: %v", res.err)
	}
	other.ReceiveToDevice(ctx)
	evt := &event.Event{ID: "$other", RoomID: roomY, Sender: r.ghost, Type: event.EventEncrypted, Content: event.Content{Parsed: res.enc}}
	if dec, err := other.Decrypt(ctx, evt); err != nil {
		t.Fatalf("the other room's member cannot decrypt the ghost's message: %v", err)
	} else if got := dec.Content.AsMessage().Body; got != "in the other room" {
		t.Fatalf("the other room's member decrypted %q", got)
	}
}

// The homeserver may push transactions while ferry is still setting up encryption (ferry listens first, so
// nothing the homeserver sends is lost): HandleTransactionCrypto runs concurrently with Init and must neither race
// with it (go test -race) nor take encryption data before the bot's device exists.
func TestTransactionsDuringInit(t *testing.T) {
	ctx := context.Background()
	r := newASRig(t, fakehs.Options{}, "")
	stop := make(chan struct{})
	done := make(chan struct{})
	refused := 0
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := r.m.HandleTransactionCrypto(ctx, json.RawMessage(`{"events":[]}`)); err != nil {
				refused++
			}
		}
	}()
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	close(stop)
	<-done
	if err := r.m.HandleTransactionCrypto(ctx, json.RawMessage(`{"events":[]}`)); err != nil {
		t.Fatalf("after Init a transaction is refused: %v", err)
	}
	if refused == 0 {
		t.Log("no transaction arrived before the bot's device existed (timing); the race detector still saw the accesses")
	}
}
