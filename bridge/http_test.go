package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

const testHSToken = "hs-token-for-tests"

// newTestBridge builds a bridge on a fresh database without starting workers.
func newTestBridge(t *testing.T, dbType string) *Bridge {
	t.Helper()
	return newTestBridgeOn(t, dbtest.Open(t, dbType))
}

// newTestBridgeOn is newTestBridge on the given database.
func newTestBridgeOn(t *testing.T, root *dbutil.Database) *Bridge {
	t.Helper()
	db := database.New(root, dbutil.NoopLogger)
	if err := db.Upgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	ss := sqlstatestore.NewSQLStateStore(root, dbutil.NoopLogger, false)
	if err := ss.Upgrade(context.Background()); err != nil {
		t.Fatal(err)
	}
	as := appservice.Create()
	as.HomeserverDomain = "ferry.test"
	as.Registration = &appservice.Registration{ID: "ferry", ServerToken: testHSToken, AppToken: "as", SenderLocalpart: "ferrybot"}
	as.StateStore = ss
	if err := as.SetHomeserverURL("http://127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	cfg := &Config{CommandPrefix: "!ferry", GhostPrefix: "_ferry_"}
	return New(zerolog.Nop(), cfg, Permissions{"*": LevelRelay}, db, as, ss, nil)
}

func doRequest(h http.Handler, method, path, auth, body string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

func errcode(t *testing.T, rec *httptest.ResponseRecorder) string {
	t.Helper()
	var body struct {
		ErrCode string `json:"errcode"`
	}
	_ = json.Unmarshal(rec.Body.Bytes(), &body)
	return body.ErrCode
}

const txnBody = `{"events":[
 {"event_id":"$e1","room_id":"!r:ferry.test","sender":"@alice:ferry.test","type":"m.room.encrypted","origin_server_ts":1,
  "content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"AwgA","session_id":"S1","sender_key":"k","device_id":"D"}},
 {"event_id":"$e2","room_id":"!r:ferry.test","sender":"@alice:ferry.test","type":"m.room.member","state_key":"@alice:ferry.test","origin_server_ts":2,
  "content":{"membership":"join"}}
]}`

func TestTransactionAuthAndErrors(t *testing.T) {
	b := newTestBridge(t, "sqlite3-fk-wal")
	h := b.Router(nil)
	cases := []struct {
		name, method, path, auth, body string
		status                         int
		errcode                        string
	}{
		{"missing token", "PUT", "/_matrix/app/v1/transactions/1", "", txnBody, 401, "M_MISSING_TOKEN"},
		{"wrong token", "PUT", "/_matrix/app/v1/transactions/1", "Bearer nope", txnBody, 403, "M_FORBIDDEN"},
		{"malformed JSON", "PUT", "/_matrix/app/v1/transactions/1", "Bearer " + testHSToken, `{"events":[`, 400, "M_NOT_JSON"},
		{"ping", "POST", "/_matrix/app/v1/ping", "Bearer " + testHSToken, `{"transaction_id":"x"}`, 200, ""},
		{"ping wrong token", "POST", "/_matrix/app/v1/ping", "Bearer nope", `{}`, 403, "M_FORBIDDEN"},
		{"user query for a ghost-shaped ID of another server", "GET", "/_matrix/app/v1/users/@someone:elsewhere", "Bearer " + testHSToken, "", 404, "M_NOT_FOUND"},
		{"unknown route", "GET", "/_matrix/app/v1/nothing", "Bearer " + testHSToken, "", 404, "M_UNRECOGNIZED"},
		{"liveness", "GET", "/_matrix/mau/live", "", "", 200, ""},
		{"readiness before start", "GET", "/_matrix/mau/ready", "", "", 503, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rec := doRequest(h, tc.method, tc.path, tc.auth, tc.body)
			if rec.Code != tc.status || errcode(t, rec) != tc.errcode {
				t.Fatalf("%s %s = %d %s (%s), want %d %s", tc.method, tc.path, rec.Code, errcode(t, rec), rec.Body.String(), tc.status, tc.errcode)
			}
		})
	}
	// Nothing was recorded by the refused requests.
	if n, _ := b.DB.Inbox.CountByState(context.Background(), ""); len(n) != 0 {
		t.Fatalf("refused transactions recorded events: %v", n)
	}
}

func TestTransactionIsRecordedDurablyAndOnce(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			b := newTestBridge(t, dialect)
			h := b.Router(nil)
			ctx := context.Background()
			rec := doRequest(h, "PUT", "/_matrix/app/v1/transactions/t1", "Bearer "+testHSToken, txnBody)
			if rec.Code != 200 {
				t.Fatalf("transaction = %d %s", rec.Code, rec.Body.String())
			}
			// Answered 200 means recorded: both events are in the inbox, in order, as received.
			rows, err := b.DB.Inbox.NextInRoom(ctx, "!r:ferry.test", 10)
			if err != nil || len(rows) != 2 || rows[0].EventID != "$e1" || rows[1].EventID != "$e2" {
				t.Fatalf("inbox after transaction = %v, %v", rows, err)
			}
			if rows[0].SessionID != "S1" || !strings.Contains(string(rows[0].Raw), `"ciphertext":"AwgA"`) {
				t.Fatalf("encrypted event not recorded as received: %+v", rows[0])
			}
			// The same transaction replayed, and the same events under a new transaction ID: not recorded twice.
			for _, txn := range []string{"t1", "t2"} {
				if rec = doRequest(h, "PUT", "/_matrix/app/v1/transactions/"+txn, "Bearer "+testHSToken, txnBody); rec.Code != 200 {
					t.Fatalf("replay %s = %d", txn, rec.Code)
				}
			}
			counts, err := b.DB.Inbox.CountByState(ctx, "")
			if err != nil || counts[database.InboxPending] != 2 {
				t.Fatalf("after replays: %v, %v; want 2 pending", counts, err)
			}
		})
	}
}

// TestTransactionNotAcknowledgedUntilDurable: while the database is away (PostgreSQL restarting), a transaction
// is answered with an error, never 200, so the homeserver keeps it and sends it again; once the database is
// back, the repeat is recorded.
func TestTransactionNotAcknowledgedUntilDurable(t *testing.T) {
	root, proxy := dbtest.PostgresThroughProxy(t)
	b := newTestBridgeOn(t, root)
	h := b.Router(nil)
	ctx := context.Background()
	// A connection is waited for (30 s by default) before the statement fails; the answer is the same sooner.
	defer dbtest.SetConnectWait(time.Second)()
	proxy.Down()
	if rec := doRequest(h, "PUT", "/_matrix/app/v1/transactions/t1", "Bearer "+testHSToken, txnBody); rec.Code == 200 {
		t.Fatal("a transaction was acknowledged while the database was away")
	}
	proxy.Up()
	if rec := doRequest(h, "PUT", "/_matrix/app/v1/transactions/t1", "Bearer "+testHSToken, txnBody); rec.Code != 200 {
		t.Fatalf("the repeat = %d %s", rec.Code, rec.Body.String())
	}
	if rows, err := b.DB.Inbox.NextInRoom(ctx, "!r:ferry.test", 10); err != nil || len(rows) != 2 {
		t.Fatalf("inbox after the repeat = %v, %v", rows, err)
	}
}

// TestIntakeSkipsOwnEchoes: the homeserver sends ferry's own messages back; they are not recorded (nothing
// would relay them), while state events from ferry's users are (the state store learns memberships from them).
func TestIntakeSkipsOwnEchoes(t *testing.T) {
	b := newTestBridge(t, "postgres")
	h := b.Router(nil)
	ctx := context.Background()
	body := `{"events":[
 {"event_id":"$ghostmsg","room_id":"!r:ferry.test","sender":"@_ferry_alice=3ax.y:ferry.test","type":"m.room.encrypted","origin_server_ts":1,"content":{}},
 {"event_id":"$botmsg","room_id":"!r:ferry.test","sender":"@ferrybot:ferry.test","type":"m.room.message","origin_server_ts":2,"content":{"msgtype":"m.notice","body":"x"}},
 {"event_id":"$ghostjoin","room_id":"!r:ferry.test","sender":"@_ferry_alice=3ax.y:ferry.test","type":"m.room.member","state_key":"@_ferry_alice=3ax.y:ferry.test","origin_server_ts":3,"content":{"membership":"join"}},
 {"event_id":"$real","room_id":"!r:ferry.test","sender":"@alice:ferry.test","type":"m.room.message","origin_server_ts":4,"content":{"msgtype":"m.text","body":"x"}}
]}`
	if rec := doRequest(h, "PUT", "/_matrix/app/v1/transactions/t1", "Bearer "+testHSToken, body); rec.Code != 200 {
		t.Fatalf("transaction = %d %s", rec.Code, rec.Body.String())
	}
	rows, err := b.DB.Inbox.NextInRoom(ctx, "!r:ferry.test", 10)
	if err != nil || len(rows) != 2 || rows[0].EventID != "$ghostjoin" || rows[1].EventID != "$real" {
		t.Fatalf("recorded %v, %v; want the ghost's join and the real user's message", rows, err)
	}
}

func TestParseEventHead(t *testing.T) {
	cases := []struct {
		raw     string
		ok      bool
		isState bool
		session string
	}{
		{`{"event_id":"$e","room_id":"!r","sender":"@a:x","type":"m.room.encrypted","content":{"session_id":"S"}}`, true, false, "S"},
		{`{"event_id":"$e","room_id":"!r","sender":"@a:x","type":"m.room.create","state_key":"","content":{}}`, true, true, ""},
		{`{"event_id":"$e","room_id":"!r","type":"m.room.message","state_key":null}`, true, false, ""},
		{`{"event_id":1,"room_id":"!r","type":"m.room.message"}`, false, false, ""},
		{`{"room_id":"!r","type":"m.room.message"}`, false, false, ""},
		{`["not an event"]`, false, false, ""},
	}
	for _, tc := range cases {
		head, ok := parseEventHead([]byte(tc.raw))
		if ok != tc.ok || (ok && (head.IsState != tc.isState || string(head.SessionID) != tc.session)) {
			t.Errorf("parseEventHead(%s) = %+v, %v", tc.raw, head, ok)
		}
	}
}

// TestTransactionBeforeStartIsRelayed: ferry takes transactions as soon as it listens, before the relay starts
// (the homeserver may push while ferry sets up encryption). Their rooms' workers start with the relay, so the
// events are handled and not left pending until the next restart.
func TestTransactionBeforeStartIsRelayed(t *testing.T) {
	b := newTestBridge(t, "postgres")
	h := b.Router(nil)
	ctx := context.Background()
	if rec := doRequest(h, "GET", "/health/ready", "", ""); rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("ready before Start = %d", rec.Code)
	}
	// A membership event of a room without a link: handled without the homeserver.
	body := `{"events":[{"event_id":"$early","room_id":"!early:ferry.test","sender":"@alice:ferry.test","type":"m.room.member",
		"state_key":"@alice:ferry.test","origin_server_ts":1,"content":{"membership":"join"}}]}`
	if rec := doRequest(h, "PUT", "/_matrix/app/v1/transactions/early", "Bearer "+testHSToken, body); rec.Code != 200 {
		t.Fatalf("transaction = %d %s", rec.Code, rec.Body.String())
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	if rec := doRequest(h, "GET", "/health/ready", "", ""); rec.Code != http.StatusOK {
		t.Fatalf("ready after Start = %d", rec.Code)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		row, err := b.DB.Inbox.Get(ctx, "$early")
		if err != nil {
			t.Fatal(err)
		}
		if row.State != database.InboxPending {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("an event taken before Start is still pending 10 s after it")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestNoWorkerAfterStop: a transaction that arrives while ferry stops (the HTTP server outlives the relay by
// a moment) records its events but starts no worker: Stop has waited for the workers it had.
func TestNoWorkerAfterStop(t *testing.T) {
	b := newTestBridge(t, "postgres")
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Stop()
	b.Notify("!late:ferry.test")
	b.workersLock.Lock()
	w := b.workers["!late:ferry.test"]
	b.workersLock.Unlock()
	if w == nil || w.running {
		t.Fatalf("a worker was started after Stop (%+v)", w)
	}
}

// A homeserver presenting a wrong hs_token (its installed registration is not ferry's) is refused every time, and
// the admin is told why once a minute, not once per request.
func TestWrongHSTokenIsLoggedOnceAMinute(t *testing.T) {
	b := newTestBridge(t, "sqlite3-fk-wal")
	var logBuf bytes.Buffer
	b.Log = zerolog.New(&logBuf)
	h := b.Router(nil)
	for range 5 {
		if rec := doRequest(h, "PUT", "/_matrix/app/v1/transactions/1", "Bearer nope", txnBody); rec.Code != 403 {
			t.Fatalf("answered %d", rec.Code)
		}
	}
	if n := strings.Count(logBuf.String(), "Refused a request with a wrong hs_token"); n != 1 {
		t.Fatalf("logged %d times for 5 refused requests, want once: %s", n, logBuf.String())
	}
	if !strings.Contains(logBuf.String(), "appservice.hs_token") {
		t.Fatal("the line does not name the config key to compare")
	}
}
