// Package fakehs is an in-process fake Matrix homeserver for tests and benchmarks. It serves, over a real
// loopback HTTP server (httptest), the client-server endpoints ferry and mautrix clients call: versions, whoami,
// register and login (including m.login.application_service and MSC4190 device creation), rooms (create, join,
// invite, leave, members, state, send, redact), profiles, account data, filters, the E2EE endpoints (key upload,
// query and claim, cross-signing upload, signature upload, to-device) and a /sync limited to to-device events,
// one-time key counts and device-list changes. It pushes events to one appservice as transactions, one in flight
// at a time and at most 100 events each, like Synapse, and counts requests per endpoint.
//
// It enforces what catches real bugs (tokens, appservice namespaces and registration, room membership for
// sending, transaction-ID deduplication per access token and path like Dendrite) and nothing else: no power
// levels, no federation, no event signing, no media, no room DAG. It must never be used outside tests and
// benchmarks. It does not import ferry's packages.
package fakehs

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// DefaultDomain is the server name used when Options.Domain is empty.
const DefaultDomain = "fakehs.test"

// maxBody bounds request bodies (the spec's event size limit is 64 KiB; key uploads and to-device batches are larger).
const maxBody = 16 << 20

// Options configure a Server.
type Options struct {
	// Domain is the server name of every user and room ID the server makes. Default DefaultDomain.
	Domain string
	// ASID, ASToken, HSToken and ASBotLocalpart describe the one appservice the server knows. An empty ASToken
	// means no appservice.
	ASID           string
	ASToken        string
	HSToken        string
	ASBotLocalpart string
	// ASUsers matches the user IDs of the appservice's exclusive namespace besides its bot (nil: only the bot).
	ASUsers *regexp.Regexp
	// AppserviceURL is where transactions go; it may also be set later with SetAppserviceURL.
	AppserviceURL string
	// MaxTxnEvents bounds the events per appservice transaction (default 100, Synapse's limit).
	MaxTxnEvents int
	// NoEcho stops the server from pushing events created through its client API to the appservice. By default
	// it pushes them, like a real homeserver, when the appservice is interested (sender, state key or a room
	// member in its namespace).
	NoEcho bool
	// KeepTimeline records every event created through the client API, for Timeline. Off by default: long
	// benchmarks would hold every event in memory.
	KeepTimeline bool
	// RefuseRoomSync answers the /sync of a user without a device 403 M_FORBIDDEN, as a homeserver that does not
	// let appservices /sync as their users would.
	RefuseRoomSync bool
	// Latency delays every request by this long before it is handled, as a homeserver's own work and network
	// would (0: none).
	Latency time.Duration
	// PushEncryption makes appservice transactions carry to-device messages for the appservice's users, their
	// devices' one-time key counts and device-list changes by themselves (a transaction goes out when only those
	// changed), as Synapse does with MSC2409 and MSC3202 turned on. Off by default: tests hand
	// TakeAppserviceTransaction's body to ferry themselves.
	PushEncryption bool
	// SharedSecret enables the shared-secret registration API (/_synapse/admin/v1/register), as
	// registration_shared_secret does on Synapse and Dendrite. Admin accounts it creates may call Dendrite's
	// /_dendrite/admin/resetPassword.
	SharedSecret string
	// CrossSigningUIA makes /keys/device_signing/upload ask for the account password (m.login.password UIA),
	// as Dendrite 0.13.8 does even for appservice users. Accounts without a password cannot upload. Requests made
	// with the as_token are exempt unless NoMSC4190 is set, as on Synapse with MSC4190 enabled.
	CrossSigningUIA bool
	// UIASessionRequired makes the password UIA refuse an answer without the session of an earlier challenge
	// (the spec lets a server ask for it; Dendrite 0.13.8 and Synapse take a first answer without one).
	UIASessionRequired bool
	// NoMSC4190 turns appservice device creation (MSC4190, PUT /devices/{id} with the as_token) off: creating a
	// device answers 404 M_NOT_FOUND like a homeserver without it (Dendrite 0.13.8), renaming an existing device
	// still works, and cross-signing uploads with the as_token need the password UIA too.
	NoMSC4190 bool
	// NoMSC4190Status and NoMSC4190Code, with NoMSC4190, change how creating an unknown device is refused (404
	// M_NOT_FOUND when Status is 0). An empty Code answers with a plain-text body, as a reverse proxy or a server
	// without the route does.
	NoMSC4190Status int
	NoMSC4190Code   string
	// NoAppserviceLogin refuses m.login.application_service logins (M_UNKNOWN, unsupported login type), like a
	// homeserver that offers appservices no devices at all.
	NoAppserviceLogin bool
	// MessagesSkipAtPageEnd makes backward /messages skip the event right after a full page, as Dendrite 0.13.8
	// skips the rest of a group of concurrent events (same depth) when a page ends inside it.
	MessagesSkipAtPageEnd bool
	// HoldAfterFailure makes the server wait this long (doubling while retries fail) after a failed transaction
	// before it tries again, unless an appservice ping reaches the appservice meanwhile, which makes it retry at
	// once: Synapse's recovery of an appservice it counts as down (2 s, 4 s … 512 s). 0: a short backoff.
	HoldAfterFailure time.Duration
	// FailTransaction, when set, picks transaction attempts that fail without reaching the appservice, as when
	// a proxy in between answers 502.
	FailTransaction func(txnID string, attempt int) bool
	// BeforeRequest, when set, sees every client-API request (its route pattern and body) before the server
	// handles it; a test may block in it to hold a request, as a slow homeserver would.
	BeforeRequest func(route string, body []byte)
	// FailRequest, when set, sees every client-API request after BeforeRequest; when it returns true the server
	// answers 500 M_UNKNOWN without handling the request, as a homeserver failing for a moment does.
	FailRequest func(route string, body []byte) bool
	// Clock, when set, gives the time events are stamped with (origin_server_ts); time.Now otherwise. A test
	// may run it ahead, as for a room whose history spans hours.
	Clock func() time.Time
}

// now is the time events are stamped with.
func (s *Server) now() time.Time {
	if s.opts.Clock != nil {
		return s.opts.Clock()
	}
	return time.Now()
}

// Server is a running fake homeserver. Create it with New and Close it when done.
type Server struct {
	// URL is the base URL of the client-server API, e.g. http://127.0.0.1:40123.
	URL string

	// OnSend, when set before traffic starts, is called (outside the server's lock) for every new event created
	// through the send or redact endpoints (not for deduplicated retries). It must be safe for concurrent use.
	OnSend func(SentEvent)
	// OnTransaction, when set before traffic starts, is called after the appservice acknowledged a transaction.
	OnTransaction func(TxnResult)

	opts   Options
	srv    *httptest.Server
	client *http.Client
	// counts is filled while routes are registered in New and only read afterwards.
	counts  map[string]*atomic.Int64
	closing chan struct{}
	closed  atomic.Bool

	// guards the following fields
	mu           sync.Mutex
	accounts     map[id.UserID]*account
	syncCalls    []SyncCall // every /sync, in order (SyncCalls)
	tokens       map[string]session
	rooms        map[id.RoomID]*room
	txns         map[string]id.EventID
	eventIDs     map[id.EventID]struct{}
	unrecognized map[string]int64
	stream       int64 // position of the to-device and device-list stream
	keyChanges   []keyChange
	seq          int64
	claimMisses  int64
	typing       []Typing
	receipts     []Receipt
	nonces       map[string]struct{}
	// asListsPos is the stream position up to which TakeAppserviceTransaction reported device-list changes.
	asListsPos int64
	// roomLog holds the room events of rooms kept with Options.KeepTimeline, at their stream positions, for the
	// /sync of a user without a device (roomsync.go); roomNotify is closed (and replaced) when one is added.
	roomLog    []loggedEvent
	roomNotify chan struct{}

	as asSender

	// pushUsers (guarded by mu) are the appservice users whose devices changed since the last pushed transaction
	// (PushEncryption).
	pushUsers map[id.UserID]struct{}
	// waiting (guarded by mu) are the devices a /sync is waiting on (their notify channel is open), so that a key
	// change wakes those instead of walking every device of every account, as a homeserver wakes only the
	// connected syncers.
	waiting map[*device]struct{}
	// memberRooms (guarded by mu) indexes the rooms each user is joined to or invited into.
	memberRooms map[id.UserID]map[id.RoomID]*room
}

// session is who an access token belongs to.
type session struct {
	user   id.UserID
	device id.DeviceID
}

type account struct {
	id          id.UserID
	password    string
	admin       bool
	displayname string
	avatarURL   string
	devices     map[id.DeviceID]*device
	// deactivated accounts cannot log in (POST /account/deactivate)
	deactivated bool
	// cross-signing keys as uploaded (signatures merged in by /keys/signatures/upload)
	master, selfSigning, userSigning map[string]any
	accountData                      map[string]json.RawMessage
}

type device struct {
	id          id.DeviceID
	displayName string
	keys        map[string]any // device_keys as uploaded, nil before the first upload
	otks        []keyEntry     // one-time keys in upload order
	fallback    []keyEntry
	inbox       []queuedToDevice
	// otkDirty: a key was claimed since the last /sync answer, so the next one reports the new count.
	otkDirty bool
	// notify, made when a /sync waits on the device (Server.notifyLocked), is closed and cleared whenever
	// something a waiter cares about happens (Server.wakeLocked).
	notify chan struct{}
}

type keyEntry struct {
	id  string
	raw json.RawMessage
}

type queuedToDevice struct {
	pos int64
	raw json.RawMessage
}

type keyChange struct {
	pos  int64
	user id.UserID
}

// SentEvent is an event created through the send or redact endpoints, as passed to Server.OnSend.
type SentEvent struct {
	RoomID   id.RoomID
	Sender   id.UserID
	Type     string
	TxnID    string
	EventID  id.EventID
	Content  json.RawMessage
	Redacts  id.EventID
	Received time.Time // when the request reached the server
}

// New starts a fake homeserver on a loopback port.
func New(opts Options) *Server {
	if opts.Domain == "" {
		opts.Domain = DefaultDomain
	}
	if opts.MaxTxnEvents <= 0 {
		opts.MaxTxnEvents = 100
	}
	s := &Server{
		opts:         opts,
		counts:       make(map[string]*atomic.Int64),
		closing:      make(chan struct{}),
		accounts:     make(map[id.UserID]*account),
		tokens:       make(map[string]session),
		rooms:        make(map[id.RoomID]*room),
		txns:         make(map[string]id.EventID),
		eventIDs:     make(map[id.EventID]struct{}),
		unrecognized: make(map[string]int64),
		nonces:       make(map[string]struct{}),
		waiting:      make(map[*device]struct{}),
		memberRooms:  make(map[id.UserID]map[id.RoomID]*room),
	}
	mux := http.NewServeMux()
	s.routes(mux)
	s.srv = httptest.NewServer(mux)
	s.URL = s.srv.URL
	s.client = &http.Client{Transport: &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256, IdleConnTimeout: time.Minute}}
	if opts.ASToken != "" {
		s.getOrCreateAccount(s.BotID())
		s.as.init(s, opts.AppserviceURL)
	}
	return s
}

// Close stops the server, its appservice sender and every waiting /sync.
func (s *Server) Close() {
	if !s.closed.CompareAndSwap(false, true) {
		return
	}
	close(s.closing)
	s.as.stop()
	s.srv.Close()
	s.client.CloseIdleConnections()
}

// Domain is the server name.
func (s *Server) Domain() string { return s.opts.Domain }

// BotID is the appservice bot's user ID (empty without an appservice).
func (s *Server) BotID() id.UserID {
	if s.opts.ASToken == "" {
		return ""
	}
	return id.NewUserID(s.opts.ASBotLocalpart, s.opts.Domain)
}

// Client returns an HTTP client suited to many concurrent requests to this server (Go's default transport
// keeps only two idle connections per host).
func (s *Server) Client() *http.Client { return s.client }

// Counts returns how many requests each endpoint received since the start or the last ResetCounts, keyed by
// route pattern (e.g. "PUT /_matrix/client/v3/rooms/{roomID}/send/{type}/{txnID}"). Requests no route matched
// are counted under "unrecognized <method> <path>".
func (s *Server) Counts() map[string]int64 {
	out := make(map[string]int64)
	for k, v := range s.counts {
		if n := v.Load(); n > 0 {
			out[k] = n
		}
	}
	s.mu.Lock()
	for k, v := range s.unrecognized {
		out["unrecognized "+k] = v
	}
	s.mu.Unlock()
	return out
}

// ResetCounts zeroes the request counters.
func (s *Server) ResetCounts() {
	for _, v := range s.counts {
		v.Store(0)
	}
	s.mu.Lock()
	clear(s.unrecognized)
	s.mu.Unlock()
}

// ClaimMisses counts one-time key claims that found neither a one-time nor a fallback key.
func (s *Server) ClaimMisses() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.claimMisses
}

// handle registers a counted route.
func (s *Server) handle(mux *http.ServeMux, pattern string, fn http.HandlerFunc) {
	c := s.counts[pattern]
	if c == nil {
		c = new(atomic.Int64)
		s.counts[pattern] = c
	}
	mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		c.Add(1)
		if s.opts.Latency > 0 {
			time.Sleep(s.opts.Latency)
		}
		if s.opts.BeforeRequest != nil || s.opts.FailRequest != nil {
			body, _ := io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(body))
			if s.opts.BeforeRequest != nil {
				s.opts.BeforeRequest(pattern, body)
			}
			if s.opts.FailRequest != nil && s.opts.FailRequest(pattern, body) {
				writeError(w, http.StatusInternalServerError, "M_UNKNOWN", "Failing for a moment")
				return
			}
		}
		fn(w, r)
	})
}

func (s *Server) routes(mux *http.ServeMux) {
	const c = "/_matrix/client/v3"
	h := func(pattern string, fn http.HandlerFunc) { s.handle(mux, pattern, fn) }
	h("GET /_matrix/client/versions", s.getVersions)
	h("GET "+c+"/account/whoami", s.authed(s.getWhoami))
	h("POST "+c+"/register", s.postRegister)
	h("GET "+c+"/login", s.getLogin)
	h("POST "+c+"/login", s.postLogin)
	h("POST "+c+"/logout", s.authed(s.postLogout))
	h("PUT "+c+"/devices/{deviceID}", s.authed(s.putDevice))
	h("GET "+c+"/devices", s.authed(s.getDevices))
	h("DELETE "+c+"/devices/{deviceID}", s.authed(s.deleteDevice))
	h("POST /_matrix/client/v1/appservice/{asID}/ping", s.authed(s.postPing))
	h("POST "+c+"/user/{userID}/filter", s.authed(s.postFilter))
	h("GET "+c+"/user/{userID}/filter/{filterID}", s.authed(s.getFilter))
	h("GET "+c+"/user/{userID}/account_data/{type}", s.authed(s.getAccountData))
	h("PUT "+c+"/user/{userID}/account_data/{type}", s.authed(s.putAccountData))
	h("GET "+c+"/profile/{userID}", s.getProfile)
	h("GET "+c+"/profile/{userID}/{field}", s.getProfileField)
	h("PUT "+c+"/profile/{userID}/{field}", s.authed(s.putProfileField))

	h("POST "+c+"/createRoom", s.authed(s.postCreateRoom))
	h("POST "+c+"/rooms/{roomID}/join", s.authed(s.postJoin))
	h("POST "+c+"/join/{roomID}", s.authed(s.postJoin))
	h("POST "+c+"/rooms/{roomID}/invite", s.authed(s.postInvite))
	h("POST "+c+"/rooms/{roomID}/leave", s.authed(s.postLeave))
	h("GET "+c+"/rooms/{roomID}/members", s.authed(s.getMembers))
	h("GET "+c+"/rooms/{roomID}/joined_members", s.authed(s.getJoinedMembers))
	h("GET "+c+"/rooms/{roomID}/state", s.authed(s.getState))
	h("GET "+c+"/rooms/{roomID}/messages", s.authed(s.getMessages))
	h("GET "+c+"/rooms/{roomID}/state/{type}", s.authed(s.getStateEvent))
	h("GET "+c+"/rooms/{roomID}/state/{type}/{stateKey...}", s.authed(s.getStateEvent))
	h("PUT "+c+"/rooms/{roomID}/state/{type}", s.authed(s.putStateEvent))
	h("PUT "+c+"/rooms/{roomID}/state/{type}/{stateKey...}", s.authed(s.putStateEvent))
	h("PUT "+c+"/rooms/{roomID}/send/{type}/{txnID}", s.authed(s.putSend))
	h("PUT "+c+"/rooms/{roomID}/redact/{eventID}/{txnID}", s.authed(s.putRedact))
	h("PUT "+c+"/rooms/{roomID}/typing/{userID}", s.authed(s.putTyping))
	h("POST "+c+"/rooms/{roomID}/receipt/{type}/{eventID}", s.authed(s.postReceipt))

	h("POST "+c+"/keys/upload", s.authed(s.postKeysUpload))
	h("POST "+c+"/keys/query", s.authed(s.postKeysQuery))
	h("POST "+c+"/keys/claim", s.authed(s.postKeysClaim))
	h("GET "+c+"/keys/changes", s.authed(s.getKeysChanges))
	h("POST "+c+"/keys/device_signing/upload", s.authed(s.postDeviceSigningUpload))
	h("POST "+c+"/keys/signatures/upload", s.authed(s.postSignaturesUpload))
	h("PUT "+c+"/sendToDevice/{type}/{txnID}", s.authed(s.putSendToDevice))
	h("GET "+c+"/sync", s.authed(s.getSync))
	s.adminRoutes(h)

	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.unrecognized[r.Method+" "+r.URL.Path]++
		s.mu.Unlock()
		writeError(w, http.StatusNotFound, "M_UNRECOGNIZED", "Unrecognized request")
	})
}

// caller is the authenticated user of a request.
// SyncCall is one /sync request: who made it, as which device, with the appservice's token or a device's own, and
// its filter.
type SyncCall struct {
	User       id.UserID
	Device     id.DeviceID
	Appservice bool
	Filter     string
	Since      string
}

// SyncCalls returns every /sync request so far, in order.
func (s *Server) SyncCalls() []SyncCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.syncCalls)
}

type caller struct {
	user       id.UserID
	device     id.DeviceID
	token      string
	appservice bool
}

type authedHandler func(w http.ResponseWriter, r *http.Request, c caller)

// authed resolves the access token (Authorization header or access_token parameter). The appservice token may
// act as the bot or, with ?user_id=, as any registered user of its namespace, and with ?device_id= or
// ?org.matrix.msc3202.device_id= as one of that user's devices.
func (s *Server) authed(next authedHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		token := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if token == "" {
			token = r.URL.Query().Get("access_token")
		}
		if token == "" {
			writeError(w, http.StatusUnauthorized, "M_MISSING_TOKEN", "Missing access token")
			return
		}
		q := r.URL.Query()
		if s.opts.ASToken != "" && token == s.opts.ASToken {
			user := id.UserID(q.Get("user_id"))
			if user == "" {
				user = s.BotID()
			}
			if !s.isASUser(user) {
				writeError(w, http.StatusForbidden, "M_EXCLUSIVE", "Application service cannot masquerade as this user")
				return
			}
			s.mu.Lock()
			acc := s.accounts[user]
			s.mu.Unlock()
			if acc == nil && !isRegisterPath(r) {
				writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Application service has not registered this user")
				return
			}
			dev := id.DeviceID(q.Get("org.matrix.msc3202.device_id"))
			if dev == "" {
				dev = id.DeviceID(q.Get("device_id"))
			}
			next(w, r, caller{user: user, device: dev, token: token, appservice: true})
			return
		}
		s.mu.Lock()
		sess, ok := s.tokens[token]
		s.mu.Unlock()
		if !ok {
			writeError(w, http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "Unknown access token")
			return
		}
		if u := q.Get("user_id"); u != "" && id.UserID(u) != sess.user {
			writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Only appservices may masquerade")
			return
		}
		next(w, r, caller{user: sess.user, device: sess.device, token: token})
	}
}

func isRegisterPath(r *http.Request) bool {
	return r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/register") ||
		r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/devices/")
}

// isASUser reports whether the appservice may act as user.
func (s *Server) isASUser(user id.UserID) bool {
	if s.opts.ASToken == "" {
		return false
	}
	if user == s.BotID() {
		return true
	}
	return s.opts.ASUsers != nil && s.opts.ASUsers.MatchString(string(user))
}

func (s *Server) getVersions(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"versions":          []string{"r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12"},
		"unstable_features": map[string]bool{},
	})
}

func (s *Server) getWhoami(w http.ResponseWriter, _ *http.Request, c caller) {
	resp := map[string]any{"user_id": c.user, "is_guest": false}
	if c.device != "" {
		resp["device_id"] = c.device
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) postRegister(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Type         string      `json:"type"`
		Username     string      `json:"username"`
		Password     string      `json:"password"`
		DeviceID     id.DeviceID `json:"device_id"`
		InhibitLogin bool        `json:"inhibit_login"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	if req.Username == "" {
		writeError(w, http.StatusBadRequest, "M_INVALID_USERNAME", "username is required")
		return
	}
	user := id.NewUserID(strings.ToLower(req.Username), s.opts.Domain)
	if req.Type == "m.login.application_service" {
		token := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if s.opts.ASToken == "" || token != s.opts.ASToken {
			writeError(w, http.StatusUnauthorized, "M_MISSING_TOKEN", "Appservice registration needs the as_token")
			return
		}
		if !s.isASUser(user) {
			writeError(w, http.StatusBadRequest, "M_EXCLUSIVE", "User ID is not in the appservice's namespace")
			return
		}
	} else if s.isASUser(user) {
		writeError(w, http.StatusBadRequest, "M_EXCLUSIVE", "User ID is reserved by an appservice")
		return
	}
	s.mu.Lock()
	if s.accounts[user] != nil {
		s.mu.Unlock()
		writeError(w, http.StatusBadRequest, "M_USER_IN_USE", "User ID already taken")
		return
	}
	acc := s.accountLocked(user)
	acc.password = req.Password
	resp := map[string]any{"user_id": user}
	if !req.InhibitLogin {
		dev, token := s.loginLocked(acc, req.DeviceID)
		resp["device_id"], resp["access_token"] = dev, token
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) getLogin(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"flows": []map[string]string{{"type": "m.login.password"}, {"type": "m.login.application_service"}}})
}

// postLogin accepts m.login.password (creating the account on first login unless it is an appservice user;
// a password set at registration must match) and m.login.application_service (with the as_token).
func (s *Server) postLogin(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Type       string `json:"type"`
		Identifier struct {
			Type string `json:"type"`
			User string `json:"user"`
		} `json:"identifier"`
		User     string      `json:"user"`
		Password string      `json:"password"`
		DeviceID id.DeviceID `json:"device_id"`
		Name     string      `json:"initial_device_display_name"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	name := req.Identifier.User
	if name == "" {
		name = req.User
	}
	user := id.UserID(name)
	if !strings.HasPrefix(name, "@") {
		user = id.NewUserID(strings.ToLower(name), s.opts.Domain)
	}
	switch req.Type {
	case "m.login.application_service":
		if s.opts.NoAppserviceLogin {
			writeError(w, http.StatusBadRequest, "M_UNKNOWN", "Unsupported login type")
			return
		}
		token := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if s.opts.ASToken == "" || token != s.opts.ASToken {
			writeError(w, http.StatusUnauthorized, "M_MISSING_TOKEN", "Appservice login needs the as_token")
			return
		}
		if !s.isASUser(user) {
			writeError(w, http.StatusForbidden, "M_EXCLUSIVE", "User ID is not in the appservice's namespace")
			return
		}
	case "m.login.password":
		if s.isASUser(user) {
			writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Appservice users cannot log in with a password")
			return
		}
	default:
		writeError(w, http.StatusBadRequest, "M_UNKNOWN", "Unsupported login type")
		return
	}
	s.mu.Lock()
	acc := s.accounts[user]
	if acc == nil && req.Type == "m.login.application_service" {
		s.mu.Unlock()
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Appservice user is not registered")
		return
	}
	if acc == nil {
		acc = s.accountLocked(user)
		acc.password = req.Password
	} else if req.Type == "m.login.password" && acc.password != "" && acc.password != req.Password {
		s.mu.Unlock()
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Invalid password")
		return
	} else if acc.deactivated {
		s.mu.Unlock()
		writeError(w, http.StatusForbidden, "M_USER_DEACTIVATED", "This account has been deactivated")
		return
	}
	dev, token := s.loginLocked(acc, req.DeviceID)
	if req.Name != "" {
		acc.devices[dev].displayName = req.Name
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"user_id": user, "access_token": token, "device_id": dev, "home_server": s.opts.Domain})
}

// postLogout invalidates the token and, as the spec says, deletes its device.
func (s *Server) postLogout(w http.ResponseWriter, _ *http.Request, c caller) {
	if !c.appservice {
		s.mu.Lock()
		delete(s.tokens, c.token)
		s.mu.Unlock()
		if c.device != "" {
			s.DeleteDevice(c.user, c.device)
		}
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// deleteDevice deletes a device: with the as_token for an appservice user (MSC4190), without UIA. Others would
// need UIA, which the fake does not offer.
func (s *Server) deleteDevice(w http.ResponseWriter, r *http.Request, c caller) {
	if !c.appservice || s.opts.NoMSC4190 {
		writeJSON(w, http.StatusUnauthorized, map[string]any{"flows": []any{map[string]any{"stages": []string{"m.login.password"}}}, "session": randomHex(8)})
		return
	}
	// Synapse 1.163.2 wants a JSON object here even without UIA: an empty body is refused (M_BAD_JSON).
	body, _ := io.ReadAll(io.LimitReader(r.Body, maxBody))
	var obj map[string]any
	if json.Unmarshal(body, &obj) != nil || obj == nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "Content must be a JSON object.")
		return
	}
	devID := id.DeviceID(r.PathValue("deviceID"))
	s.mu.Lock()
	acc := s.accounts[c.user]
	_, ok := acc.devices[devID]
	s.mu.Unlock()
	if acc == nil || !ok {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Unknown device")
		return
	}
	s.DeleteDevice(c.user, devID)
	writeJSON(w, http.StatusOK, struct{}{})
}

// putDevice creates a device for an appservice user (MSC4190) or renames an existing one.
func (s *Server) putDevice(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		DisplayName string `json:"display_name"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	devID := id.DeviceID(r.PathValue("deviceID"))
	s.mu.Lock()
	defer s.mu.Unlock()
	acc := s.accountLocked(c.user)
	dev := acc.devices[devID]
	if dev == nil {
		if !c.appservice {
			writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Unknown device")
			return
		}
		if s.opts.NoMSC4190 {
			switch {
			case s.opts.NoMSC4190Status == 0:
				writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Unknown device")
			case s.opts.NoMSC4190Code == "":
				http.Error(w, http.StatusText(s.opts.NoMSC4190Status), s.opts.NoMSC4190Status)
			default:
				writeError(w, s.opts.NoMSC4190Status, s.opts.NoMSC4190Code, "refused")
			}
			return
		}
		dev = newDevice(devID)
		acc.devices[devID] = dev
	}
	if req.DisplayName != "" {
		dev.displayName = req.DisplayName
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) getDevices(w http.ResponseWriter, _ *http.Request, c caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	list := []map[string]any{}
	if acc := s.accounts[c.user]; acc != nil {
		for _, d := range acc.devices {
			list = append(list, map[string]any{"device_id": d.id, "display_name": d.displayName})
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"devices": list})
}

func (s *Server) postFilter(w http.ResponseWriter, r *http.Request, _ caller) {
	_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, maxBody))
	writeJSON(w, http.StatusOK, map[string]string{"filter_id": "0"})
}

func (s *Server) getFilter(w http.ResponseWriter, _ *http.Request, _ caller) {
	writeJSON(w, http.StatusOK, map[string]any{})
}

func (s *Server) getAccountData(w http.ResponseWriter, r *http.Request, c caller) {
	if id.UserID(r.PathValue("userID")) != c.user {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Cannot read another user's account data")
		return
	}
	s.mu.Lock()
	data := s.accountLocked(c.user).accountData[r.PathValue("type")]
	s.mu.Unlock()
	if data == nil {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Account data not found")
		return
	}
	writeRaw(w, http.StatusOK, data)
}

func (s *Server) putAccountData(w http.ResponseWriter, r *http.Request, c caller) {
	if id.UserID(r.PathValue("userID")) != c.user {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Cannot write another user's account data")
		return
	}
	var raw json.RawMessage
	if !readJSON(w, r, &raw) {
		return
	}
	s.mu.Lock()
	s.accountLocked(c.user).accountData[r.PathValue("type")] = raw
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) getProfile(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	acc := s.accounts[id.UserID(r.PathValue("userID"))]
	var resp map[string]any
	if acc != nil {
		resp = map[string]any{}
		if acc.displayname != "" {
			resp["displayname"] = acc.displayname
		}
		if acc.avatarURL != "" {
			resp["avatar_url"] = acc.avatarURL
		}
	}
	s.mu.Unlock()
	if resp == nil {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Profile not found")
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) getProfileField(w http.ResponseWriter, r *http.Request) {
	field := r.PathValue("field")
	s.mu.Lock()
	acc := s.accounts[id.UserID(r.PathValue("userID"))]
	value := ""
	if acc != nil {
		switch field {
		case "displayname":
			value = acc.displayname
		case "avatar_url":
			value = acc.avatarURL
		}
	}
	s.mu.Unlock()
	if value == "" {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Profile field not set")
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{field: value})
}

func (s *Server) putProfileField(w http.ResponseWriter, r *http.Request, c caller) {
	if id.UserID(r.PathValue("userID")) != c.user {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Cannot change another user's profile")
		return
	}
	var body map[string]any
	if !readJSON(w, r, &body) {
		return
	}
	field := r.PathValue("field")
	value, _ := body[field].(string)
	s.mu.Lock()
	acc := s.accountLocked(c.user)
	switch field {
	case "displayname":
		acc.displayname = value
	case "avatar_url":
		acc.avatarURL = value
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) postPing(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		TxnID string `json:"transaction_id"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	if !c.appservice || r.PathValue("asID") != s.opts.ASID {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Not this appservice's token")
		return
	}
	start := time.Now()
	if err := s.as.ping(r, req.TxnID); err != nil {
		writeError(w, http.StatusBadGateway, "M_CONNECTION_FAILED", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]int64{"duration_ms": time.Since(start).Milliseconds()})
}

// accountLocked returns the account of user, creating it. s.mu must be held.
func (s *Server) accountLocked(user id.UserID) *account {
	acc := s.accounts[user]
	if acc == nil {
		acc = &account{id: user, devices: make(map[id.DeviceID]*device), accountData: make(map[string]json.RawMessage)}
		s.accounts[user] = acc
	}
	return acc
}

func (s *Server) getOrCreateAccount(user id.UserID) {
	s.mu.Lock()
	s.accountLocked(user)
	s.mu.Unlock()
}

// loginLocked creates (or reuses) a device and a fresh access token for it. s.mu must be held.
func (s *Server) loginLocked(acc *account, devID id.DeviceID) (id.DeviceID, string) {
	if devID == "" {
		s.seq++
		devID = id.DeviceID(fmt.Sprintf("FAKE%06d", s.seq))
	}
	if acc.devices[devID] == nil {
		acc.devices[devID] = newDevice(devID)
	}
	token := "fakehs_" + randomHex(16)
	s.tokens[token] = session{user: acc.id, device: devID}
	return devID, token
}

func newDevice(devID id.DeviceID) *device {
	return &device{id: devID}
}

// notifyLocked is the channel a /sync of d waits on: closed when something changes for d. s.mu must be held.
func (s *Server) notifyLocked(d *device) <-chan struct{} {
	if d.notify == nil {
		d.notify = make(chan struct{})
		s.waiting[d] = struct{}{}
	}
	return d.notify
}

// wakeLocked tells /sync waiters of a device that something changed. s.mu must be held.
func (s *Server) wakeLocked(d *device) {
	if d.notify == nil {
		return
	}
	close(d.notify)
	d.notify = nil
	delete(s.waiting, d)
}

// EventID derives a deterministic room-version-4 style event ID from its parts.
func EventID(parts ...string) id.EventID {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return id.EventID("$" + base64.RawURLEncoding.EncodeToString(sum[:]))
}

// wireEvent is a client-format event as the server stores and sends it.
type wireEvent struct {
	ID       id.EventID      `json:"event_id"`
	RoomID   id.RoomID       `json:"room_id"`
	Sender   id.UserID       `json:"sender"`
	Type     string          `json:"type"`
	StateKey *string         `json:"state_key,omitempty"`
	Redacts  id.EventID      `json:"redacts,omitempty"`
	TS       int64           `json:"origin_server_ts"`
	Content  json.RawMessage `json:"content"`
	Unsigned map[string]any  `json:"unsigned,omitempty"`
}

// MakeEvent builds a client-format event in room from sender without recording it anywhere, e.g. to deliver
// it to the appservice with Deliver as if a user of another server had sent it. content may be a
// json.RawMessage or anything json.Marshal accepts.
func MakeEvent(evtID id.EventID, room id.RoomID, sender id.UserID, evtType string, content any, ts time.Time) (json.RawMessage, error) {
	raw, ok := content.(json.RawMessage)
	if !ok {
		var err error
		if raw, err = json.Marshal(content); err != nil {
			return nil, err
		}
	}
	return json.Marshal(&wireEvent{ID: evtID, RoomID: room, Sender: sender, Type: evtType, TS: ts.UnixMilli(), Content: raw, Unsigned: map[string]any{}})
}

// TakeToDevice removes and returns the to-device events queued for a device, parsed as mautrix would after
// /sync, for test clients that do not run a sync loop.
func (s *Server) TakeToDevice(user id.UserID, devID id.DeviceID) []*event.Event {
	return s.toDevice(user, devID, true)
}

// PeekToDevice returns the to-device events queued for a device like TakeToDevice, but leaves them queued (as
// Synapse keeps what it pushed to an appservice in the device's inbox).
func (s *Server) PeekToDevice(user id.UserID, devID id.DeviceID) []*event.Event {
	return s.toDevice(user, devID, false)
}

func (s *Server) toDevice(user id.UserID, devID id.DeviceID, take bool) []*event.Event {
	s.mu.Lock()
	var raws []json.RawMessage
	if acc := s.accounts[user]; acc != nil {
		if dev := acc.devices[devID]; dev != nil {
			for _, q := range dev.inbox {
				raws = append(raws, q.raw)
			}
			if take {
				dev.inbox = nil
			}
		}
	}
	s.mu.Unlock()
	out := make([]*event.Event, 0, len(raws))
	for _, raw := range raws {
		var evt event.Event
		if err := json.Unmarshal(raw, &evt); err != nil {
			continue
		}
		evt.Type.Class = event.ToDeviceEventType
		if err := evt.Content.ParseRaw(evt.Type); err != nil && !errors.Is(err, event.ErrUnsupportedContentType) {
			continue
		}
		out = append(out, &evt)
	}
	return out
}

// takeDevicePushes moves the to-device events queued for u's devices into toDevice (with to_user_id and
// to_device_id, as pushed to appservices) and records those devices' one-time key counts and fallback key types.
// The caller holds s.mu.
func takeDevicePushes(u id.UserID, acc *account, toDevice []map[string]any, counts map[id.UserID]map[id.DeviceID]map[string]int, fallback map[id.UserID]map[id.DeviceID][]string) []map[string]any {
	for _, dev := range acc.devices {
		for _, q := range dev.inbox {
			var evt map[string]any
			if json.Unmarshal(q.raw, &evt) != nil {
				continue
			}
			evt["to_user_id"], evt["to_device_id"] = u, dev.id
			toDevice = append(toDevice, evt)
		}
		dev.inbox = nil
		if dev.keys == nil {
			continue
		}
		if counts[u] == nil {
			counts[u], fallback[u] = map[id.DeviceID]map[string]int{}, map[id.DeviceID][]string{}
		}
		counts[u][dev.id] = otkCounts(dev)
		types := []string{}
		for _, k := range dev.fallback {
			alg, _, _ := strings.Cut(k.id, ":")
			types = append(types, alg)
		}
		fallback[u][dev.id] = types
		dev.otkDirty = false
	}
	return toDevice
}

// TakeAppserviceTransaction removes the to-device events queued for the devices of the appservice's users and
// returns them, with those devices' one-time key counts and the device-list changes since the previous call, as
// the body of one appservice transaction under the unstable field names Synapse pushes (MSC2409 to-device events
// with to_user_id and to_device_id, MSC3202 device lists and key counts). Tests hand it to the appservice in
// place of /sync.
func (s *Server) TakeAppserviceTransaction() json.RawMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	toDevice := []map[string]any{}
	counts := map[id.UserID]map[id.DeviceID]map[string]int{}
	fallback := map[id.UserID]map[id.DeviceID][]string{}
	users := make([]id.UserID, 0, len(s.accounts))
	for u := range s.accounts {
		users = append(users, u)
	}
	sort.Slice(users, func(i, j int) bool { return users[i] < users[j] })
	var changed []id.UserID
	for _, u := range users {
		if !s.isASUser(u) {
			continue
		}
		acc := s.accounts[u]
		toDevice = takeDevicePushes(u, acc, toDevice, counts, fallback)
		for _, c := range s.changedSinceLocked(u, s.asListsPos, s.stream) {
			if !contains(changed, c) {
				changed = append(changed, c)
			}
		}
	}
	s.asListsPos = s.stream
	if changed == nil {
		changed = []id.UserID{}
	}
	return mustJSON(map[string]any{
		"events":                                              []any{},
		"de.sorunome.msc2409.to_device":                       toDevice,
		"org.matrix.msc3202.device_lists":                     map[string]any{"changed": changed, "left": []id.UserID{}},
		"org.matrix.msc3202.device_one_time_keys_count":       counts,
		"org.matrix.msc3202.device_unused_fallback_key_types": fallback,
	})
}

// OTKCount is how many unclaimed signed_curve25519 one-time keys a device has.
func (s *Server) OTKCount(user id.UserID, devID id.DeviceID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if acc := s.accounts[user]; acc != nil {
		if dev := acc.devices[devID]; dev != nil {
			return countOTKs(dev, "signed_curve25519")
		}
	}
	return 0
}

// Devices lists a user's device IDs, sorted.
func (s *Server) Devices(user id.UserID) []id.DeviceID {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []id.DeviceID
	if acc := s.accounts[user]; acc != nil {
		for d := range acc.devices {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// DeleteDevice removes a user's device with its keys and access tokens, as an admin deleting it would.
func (s *Server) DeleteDevice(user id.UserID, deviceID id.DeviceID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if acc := s.accounts[user]; acc != nil {
		delete(acc.devices, deviceID)
	}
	for token, sess := range s.tokens {
		if sess.user == user && sess.device == deviceID {
			delete(s.tokens, token)
		}
	}
	s.keyChangedLocked(user)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_UNKNOWN", "Failed to read body")
		return false
	}
	if len(body) == 0 {
		body = []byte("{}")
	}
	if err = json.Unmarshal(body, v); err != nil {
		writeError(w, http.StatusBadRequest, "M_NOT_JSON", "Body is not valid JSON")
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		status, data = http.StatusInternalServerError, []byte(`{"errcode":"M_UNKNOWN","error":"marshal failed"}`)
	}
	writeRaw(w, status, data)
}

func writeRaw(w http.ResponseWriter, status int, data []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(data)
}

func writeError(w http.ResponseWriter, status int, errcode, msg string) {
	writeJSON(w, status, map[string]string{"errcode": errcode, "error": msg})
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
