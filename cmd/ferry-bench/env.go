package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/url"
	"path"
	"regexp"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/fakehs"
	"go.ferry.im/ferry/internal/metrics"
)

// Identities of the simulated deployment.
const (
	benchDomain  = "bench.test"
	benchASID    = "ferry"
	botLocalpart = "ferrybot"
	// benchPassword logs in the naive path's bot (the fake homeserver accepts any password on first login).
	benchPassword = "naive-bot-password"
)

// env is one ferry instance, wired as cmd/ferry's start() wires it, against a fake homeserver, with the
// simulated users and linked rooms around it.
type env struct {
	st  settings
	log zerolog.Logger

	db    *benchDB
	hs    *fakehs.Server
	root  *dbutil.Database
	as    *appservice.AppService
	mach  *crypto.Machine
	timed *timedCrypto
	http  *timedTransport
	br    *bridge.Bridge
	asSrv *httptest.Server
	pairs []*pair
	// steady is the established link whose traffic goes on while the others' new senders speak (-steady-rate)
	steady *pair
	enc    *event.EncryptionEventContent
	// What a second ferry process on the same database and homeserver needs (the scale runs).
	asToken, hsToken, sharedSecret, pickleKey string

	// sessionsReceived counts Megolm sessions ferry's bot imported (SessionReceived callbacks).
	sessionsReceived atomic.Int64
	// sessionsShared counts Megolm sessions the simulated senders shared (each one reaches the bot once).
	sessionsShared atomic.Int64

	// byTxn and byEvent index every generated message; they are filled before traffic starts and only read after.
	byTxn   map[string]*msg
	byEvent map[id.EventID]*msg
	current atomic.Pointer[phaseState]

	duplicates, plaintextCopies, echoes atomic.Int64
	// guards the following fields
	otherMu    sync.Mutex
	otherSends map[string]int64
}

// pair is one link: source room A (senders and the bot) and target room B (receivers and the bot).
type pair struct {
	idx       int
	a, b      id.RoomID
	senders   []*fakehs.User
	receivers []*fakehs.User
}

// benchDB is a fresh database on the Postgres server named by the admin URL, dropped by drop.
type benchDB struct {
	uri   string
	name  string
	admin *sql.DB
}

func createDatabase(adminURL string) (*benchDB, error) {
	admin, err := sql.Open("postgres", adminURL)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "ferry_bench_" + hex.EncodeToString(b)
	if _, err = admin.Exec(`CREATE DATABASE ` + name); err != nil {
		_ = admin.Close()
		return nil, fmt.Errorf("create database: %w", err)
	}
	u, err := url.Parse(adminURL)
	if err != nil {
		_ = admin.Close()
		return nil, err
	}
	u.Path = "/" + name
	return &benchDB{uri: u.String(), name: name, admin: admin}, nil
}

func (d *benchDB) drop() {
	_, _ = d.admin.Exec(`DROP DATABASE IF EXISTS ` + d.name + ` WITH (FORCE)`)
	_ = d.admin.Close()
}

// newEnv starts the fake homeserver and ferry (as cmd/ferry's start() does, in login + /sync mode, the path
// Dendrite needs), then creates the users, rooms and links.
func newEnv(ctx context.Context, st settings, log zerolog.Logger) (*env, error) {
	e := &env{st: st, log: log, otherSends: map[string]int64{}, byTxn: map[string]*msg{}, byEvent: map[id.EventID]*msg{}}
	e.enc = &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1, RotationPeriodMillis: 7 * 24 * 3600 * 1000, RotationPeriodMessages: 100}
	var err error
	if e.db, err = createDatabase(st.adminURL); err != nil {
		return nil, err
	}
	asToken, hsToken := randomToken(), randomToken()
	ghostPrefix := bridge.DefaultGhostPrefix
	users := regexp.MustCompile(fmt.Sprintf("^@(%s|%s.*):%s$", regexp.QuoteMeta(botLocalpart), regexp.QuoteMeta(ghostPrefix), regexp.QuoteMeta(benchDomain)))
	hsOpts := fakehs.Options{
		Domain: benchDomain, ASID: benchASID, ASToken: asToken, HSToken: hsToken, ASBotLocalpart: botLocalpart, ASUsers: users,
		// Like Dendrite 0.13.8, the homeserver ferry's login + /sync mode is for: cross-signing uploads need the
		// account password.
		CrossSigningUIA: true,
		Latency:         st.hsLatency,
	}
	if st.encPath == "appservice" {
		// Synapse with its appservice-mode encryption: MSC4190 devices, no password for cross-signing.
		hsOpts.CrossSigningUIA = false
	} else if st.deviceMode == crypto.DeviceModePerGhost {
		// Per-ghost devices on such a homeserver need homeserver.registration_shared_secret.
		hsOpts.SharedSecret = randomToken()
	}
	e.asToken, e.hsToken, e.sharedSecret = asToken, hsToken, hsOpts.SharedSecret
	// Goroutines inherit their creator's profiler labels: everything the fake homeserver and ferry start (their
	// HTTP servers' connections, ferry's workers and clients, the homeserver's transaction sender) is labelled
	// side=homeserver or side=ferry in CPU profiles, so a profile tells how much of this process is ferry's own
	// (go tool pprof -tags; unlabelled: the benchmark's clients and the Go runtime's background work).
	pprof.Do(ctx, pprof.Labels(profileSide, "homeserver"), func(context.Context) { e.hs = fakehs.New(hsOpts) })
	e.hs.OnSend = e.onSend
	e.hs.OnTransaction = e.onTransaction
	pprof.Do(ctx, pprof.Labels(profileSide, "ferry"), func(ctx context.Context) {
		err = e.startFerry(ctx, asToken, hsToken, hsOpts.SharedSecret, users)
	})
	if err != nil {
		e.close()
		return nil, err
	}
	if err = e.createPairs(ctx); err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

// profileSide is the CPU profile label that tells ferry's goroutines from the fake homeserver's.
const profileSide = "side"

func randomToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// startFerry mirrors cmd/ferry's start(): database and its upgrades, state store, appservice, crypto machine,
// bridge, HTTP endpoint, homeserver check, encryption init, relay start.
func (e *env) startFerry(ctx context.Context, asToken, hsToken, sharedSecret string, users *regexp.Regexp) error {
	log := e.log
	mcrypto.PostgresArrayWrapper = pq.Array
	dbLog := log.With().Str("component", "database").Logger()
	root, err := dbutil.NewFromConfig("ferry", dbutil.Config{PoolConfig: dbutil.PoolConfig{
		Type: pgDriverName, URI: database.TuneURI("postgres", e.db.uri), MaxOpenConns: e.st.dbMaxOpen, MaxIdleConns: e.st.dbMaxIdle,
	}}, dbutil.ZeroLogger(dbLog))
	if err != nil {
		return fmt.Errorf("open database: %w", err)
	}
	e.root = root
	db := database.New(root, dbutil.ZeroLogger(dbLog.With().Str("db_section", "ferry").Logger()))
	if err = db.Upgrade(ctx); err != nil {
		return err
	}
	stateStore := sqlstatestore.NewSQLStateStore(root, dbutil.ZeroLogger(dbLog.With().Str("db_section", "state").Logger()), false)
	if err = stateStore.Upgrade(ctx); err != nil {
		return err
	}

	as := appservice.Create()
	as.Log = log.With().Str("component", "appservice").Logger()
	as.HomeserverDomain = benchDomain
	as.Registration = &appservice.Registration{
		ID: benchASID, AppToken: asToken, ServerToken: hsToken, SenderLocalpart: botLocalpart, RateLimited: new(false),
	}
	as.Registration.Namespaces.UserIDs.Register(users, true)
	as.StateStore = stateStore
	if err = as.SetHomeserverURL(e.hs.URL); err != nil {
		return err
	}
	// Same transport as production, timed.
	e.http = &timedTransport{base: metrics.Transport(bridge.HomeserverTransport())}
	as.HTTPClient.Transport = e.http
	e.as = as

	bcfg := bridge.DefaultConfig()
	if err = bcfg.CompileDisplaynameTemplate(); err != nil {
		return err
	}
	ecfg := crypto.DefaultConfig()
	ecfg.PickleKey = randomToken()
	e.pickleKey = ecfg.PickleKey
	ecfg.DeviceMode = e.st.deviceMode
	ecfg.Appservice = e.st.encPath == "appservice"
	mach := crypto.NewMachine(log.With().Str("component", "crypto").Logger(), ecfg, root, stateStore, as.NewMautrixClient(as.BotMXID()), nil)
	e.mach = mach
	e.timed = &timedCrypto{Machine: mach}
	br := bridge.New(log.With().Str("component", "bridge").Logger(), &bcfg, bridge.Permissions{"*": bridge.LevelRelay}, db, as, stateStore, e.timed)
	e.br = br
	mach.SetIsOwn(br.Ghosts.IsOwn)
	mach.SharedSecret = sharedSecret
	mach.Transient = database.Transient
	mach.RetryWait = bridge.RetryWait
	mach.NewUserClient = as.NewMautrixClient
	as.StateStore = mach.WrapStateStore(stateStore)
	mach.SessionReceived = func(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) {
		e.sessionsReceived.Add(1)
		br.SessionArrived(ctx, roomID, sessionID)
	}
	mach.SyncedTimeline = br.IngestSynced
	var toDevice bridge.ToDeviceHandler
	if ecfg.Appservice {
		e.hs.SetPushEncryption(true)
		toDevice = mach
	}
	e.asSrv = httptest.NewServer(br.Router(toDevice))
	as.Registration.URL = e.asSrv.URL
	e.hs.SetAppserviceURL(e.asSrv.URL)

	if err = checkHomeserver(ctx, as); err != nil {
		return err
	}
	br.EncryptionPath = "login + /sync (m.login.application_service devices, to-device and device lists through /sync)"
	if ecfg.Appservice {
		br.EncryptionPath = "appservice (MSC4190 devices, to-device events and device lists pushed in transactions)"
	}
	if err = mach.Init(ctx); err != nil {
		return fmt.Errorf("set up encryption: %w", err)
	}
	mach.Start(ctx)
	return br.Start(ctx)
}

// checkHomeserver is cmd/ferry's start-up check, minus the retry loop.
func checkHomeserver(ctx context.Context, as *appservice.AppService) error {
	bot := as.BotIntent()
	versions, err := bot.Versions(ctx)
	if err != nil {
		return err
	}
	if as.SpecVersions != nil {
		*as.SpecVersions = *versions
	}
	if err = bot.EnsureRegistered(ctx); err != nil {
		return err
	}
	whoami, err := bot.Whoami(ctx)
	if err != nil {
		return err
	} else if whoami.UserID != as.BotMXID() {
		return fmt.Errorf("whoami returned %s", whoami.UserID)
	}
	if versions.Supports(mautrix.FeatureAppservicePing) {
		if _, err = bot.AppservicePing(ctx, as.Registration.ID, ""); err != nil {
			return fmt.Errorf("appservice ping: %w", err)
		}
	}
	return bot.SetDisplayName(ctx, "Ferry bridge bot")
}

// createPairs makes the simulated users (cross-signed, like Element users), the linked rooms and the links,
// and seeds ferry's state store with the rooms' members and encryption (as after the bot joined them).
func (e *env) createPairs(ctx context.Context) error {
	bot := e.as.BotMXID()
	ss := e.br.StateStore
	n := e.st.pairs
	if e.st.steadyRate > 0 && !e.st.steadyInLink {
		n++ // the last pair is the steady one
	}
	for i := range n {
		p := &pair{idx: i}
		var steadySender *fakehs.User
		if i == 0 && e.st.steadyRate > 0 && e.st.steadyInLink {
			// The established sender of the first link, who speaks beside its new senders.
			u, err := e.hs.NewUser(ctx, id.NewUserID("steady0", benchDomain), fakehs.UserOptions{DisplayName: "Steady", CrossSign: true})
			if err != nil {
				return err
			}
			steadySender = u
		}
		for j := range e.st.senders {
			u, err := e.hs.NewUser(ctx, id.NewUserID(fmt.Sprintf("alice%d.%d", i, j), benchDomain), fakehs.UserOptions{
				DisplayName: fmt.Sprintf("Alice %d.%d", i, j), CrossSign: true,
			})
			if err != nil {
				return err
			}
			p.senders = append(p.senders, u)
		}
		for j := range e.st.receivers {
			u, err := e.hs.NewUser(ctx, id.NewUserID(fmt.Sprintf("bob%d.%d", i, j), benchDomain), fakehs.UserOptions{
				DisplayName: fmt.Sprintf("Bob %d.%d", i, j), CrossSign: true,
			})
			if err != nil {
				return err
			}
			p.receivers = append(p.receivers, u)
		}
		aMembers := []id.UserID{bot}
		aSenders := p.senders
		if steadySender != nil {
			aSenders = append(aSenders[:len(aSenders):len(aSenders)], steadySender)
		}
		for _, u := range aSenders {
			aMembers = append(aMembers, u.ID)
		}
		bMembers := []id.UserID{bot}
		for _, u := range p.receivers {
			bMembers = append(bMembers, u.ID)
		}
		p.a = e.hs.CreateRoom(p.senders[0].ID, fakehs.RoomOptions{Name: fmt.Sprintf("Bench A%d", i), Encryption: e.enc, Members: aMembers})
		p.b = e.hs.CreateRoom(p.receivers[0].ID, fakehs.RoomOptions{Name: fmt.Sprintf("Bench B%d", i), Encryption: e.enc, Members: bMembers})
		for _, u := range aSenders {
			if err := u.SetRoom(ctx, p.a, aMembers, e.enc); err != nil {
				return err
			}
		}
		for _, u := range p.receivers {
			if err := u.SetRoom(ctx, p.b, bMembers, e.enc); err != nil {
				return err
			}
		}
		for room, members := range map[id.RoomID][]*fakehs.User{p.a: aSenders, p.b: p.receivers} {
			for _, u := range members {
				if err := ss.SetMember(ctx, room, u.ID, &event.MemberEventContent{Membership: event.MembershipJoin, Displayname: u.ID.Localpart()}); err != nil {
					return err
				}
			}
			if err := ss.SetMembership(ctx, room, bot, event.MembershipJoin); err != nil {
				return err
			}
			if err := ss.SetEncryptionEvent(ctx, room, e.enc); err != nil {
				return err
			}
		}
		if _, err := e.br.DB.Links.Join(ctx, fmt.Sprintf("bench%d", i), p.a, p.b, p.senders[0].ID, time.Now()); err != nil {
			return err
		}
		if steadySender != nil {
			e.steady = &pair{idx: i, a: p.a, b: p.b, senders: []*fakehs.User{steadySender}, receivers: p.receivers}
		}
		if i == e.st.pairs {
			e.steady = p
		}
		if i < e.st.pairs {
			e.pairs = append(e.pairs, p)
		}
	}
	if p := e.steady; p != nil {
		w := &watchedLink{a: p.a, b: p.b, sendPath: "/_matrix/client/v3/rooms/" + url.PathEscape(string(p.b)) + "/send/"}
		if e.st.steadyInLink {
			w.sender, w.ghost = p.senders[0].ID, e.br.Ghosts.Ghost(p.senders[0].ID)
			w.mine = func(txnID string) bool {
				m := e.byTxn[txnID]
				return m != nil && m.sender == p.senders[0]
			}
		}
		e.timed.watched.Store(w)
		e.http.watched.Store(w)
	}
	return e.primeSenders(ctx)
}

// primeSenders makes every sender share its first Megolm session with the bot, one at a time so the bot's
// one-time keys are replenished (through its /sync) between claims, as they would be between real users
// joining over time.
func (e *env) primeSenders(ctx context.Context) error {
	bot, dev := e.as.BotMXID(), e.mach.DeviceID()
	pairs := e.pairs
	if e.steady != nil {
		pairs = append(pairs[:len(pairs):len(pairs)], e.steady)
	}
	for _, p := range pairs {
		for _, u := range p.senders {
			deadline := time.Now().Add(30 * time.Second)
			for e.hs.OTKCount(bot, dev) < 5 {
				if time.Now().After(deadline) {
					return errors.New("ferry's bot did not replenish its one-time keys")
				}
				time.Sleep(5 * time.Millisecond)
			}
			_, shared, err := u.Encrypt(ctx, p.a, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "prime"})
			if err != nil {
				return fmt.Errorf("prime %s: %w", u.ID, err)
			}
			if shared {
				e.sessionsShared.Add(1)
			}
		}
	}
	return nil
}

// waitForSessions waits until ferry's bot imported every Megolm session the senders shared.
func (e *env) waitForSessions(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for e.sessionsReceived.Load() < e.sessionsShared.Load() {
		if time.Now().After(deadline) {
			return fmt.Errorf("ferry's bot imported %d of %d room keys within %s", e.sessionsReceived.Load(), e.sessionsShared.Load(), timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

func (e *env) close() {
	if e.br != nil {
		e.br.Stop()
	}
	if e.mach != nil {
		e.mach.Stop()
	}
	if e.asSrv != nil {
		e.asSrv.Close()
	}
	if e.hs != nil {
		e.hs.Close()
	}
	if e.root != nil {
		_ = e.root.Close()
	}
	if e.db != nil {
		if e.st.keepDB {
			fmt.Printf("ferry-bench: kept database %s\n", e.db.name)
			_ = e.db.admin.Close()
		} else {
			e.db.drop()
		}
	}
}

// timedCrypto is ferry's crypto machine with its Decrypt and Encrypt calls timed (wall time, including the
// crypto store's database work).
type timedCrypto struct {
	*crypto.Machine
	decrypts, decryptNanos, encrypts, encryptNanos atomic.Int64
	// watched keeps the durations of the steady link's calls apart (-steady-rate)
	watched atomic.Pointer[watchedLink]
}

func (t *timedCrypto) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	start := time.Now()
	dec, err := t.Machine.Decrypt(ctx, evt)
	took := time.Since(start)
	t.decryptNanos.Add(int64(took))
	t.decrypts.Add(1)
	if w := t.watched.Load(); w != nil && (w.sender == "" || evt.Sender == w.sender) {
		w.note(evt.RoomID, took, 0)
	}
	return dec, err
}

func (t *timedCrypto) Encrypt(ctx context.Context, sender id.UserID, roomID id.RoomID, evtType event.Type, content *event.Content) (*event.EncryptedEventContent, error) {
	start := time.Now()
	enc, err := t.Machine.Encrypt(ctx, sender, roomID, evtType, content)
	took := time.Since(start)
	t.encryptNanos.Add(int64(took))
	t.encrypts.Add(1)
	if w := t.watched.Load(); w != nil && (w.ghost == "" || sender == w.ghost) {
		w.note(roomID, 0, took)
	}
	return enc, err
}

// watchedLink collects how long ferry's decryptions in one link's source room and encryptions into its target
// room took, to tell where that link's messages waited.
type watchedLink struct {
	a, b id.RoomID
	// sendPath starts the path of ferry's sends into b
	sendPath string
	// sender and ghost, when set, narrow the link's calls to one sender's (a sender among others in the room)
	sender, ghost id.UserID
	// mine, when set, tells the link's own sends by their transaction IDs
	mine func(txnID string) bool
	mu   sync.Mutex
	on   bool
	dec  []time.Duration
	enc  []time.Duration
	send []time.Duration
}

// noteSend records a request of ferry's if it sends an event into the watched link's target room.
func (w *watchedLink) noteSend(req *http.Request, took time.Duration) {
	if w == nil || req.Method != http.MethodPut || !strings.HasPrefix(req.URL.EscapedPath(), w.sendPath) {
		return
	}
	if w.mine != nil && !w.mine(path.Base(req.URL.Path)) {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.on {
		w.send = append(w.send, took)
	}
}

func (w *watchedLink) note(room id.RoomID, dec, enc time.Duration) {
	if w == nil || (room != w.a && room != w.b) {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.on {
		return
	}
	if room == w.a && dec > 0 {
		w.dec = append(w.dec, dec)
	} else if room == w.b && enc > 0 {
		w.enc = append(w.enc, enc)
	}
}

// collect starts collecting afresh, or stops and returns what was collected.
func (w *watchedLink) collect(on bool) (dec, enc, send []time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	dec, enc, send = w.dec, w.enc, w.send
	w.on, w.dec, w.enc, w.send = on, nil, nil, nil
	return dec, enc, send
}

// timedTransport times ferry's requests to the homeserver and counts new TCP connections.
type timedTransport struct {
	base                      http.RoundTripper
	requests, nanos, newConns atomic.Int64
	watched                   atomic.Pointer[watchedLink]
}

func (t *timedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		if !info.Reused {
			t.newConns.Add(1)
		}
	}}
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	start := time.Now()
	resp, err := t.base.RoundTrip(req)
	took := time.Since(start)
	t.nanos.Add(int64(took))
	t.watched.Load().noteSend(req, took)
	t.requests.Add(1)
	return resp, err
}
