package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestEndpoint(t *testing.T) {
	for path, want := range map[string]string{
		"/_matrix/client/v3/rooms/!abc:test.org/send/m.room.encrypted/ferry-1": "/_matrix/client/v3/rooms/{roomId}/send/{id}/{id}",
		"/_matrix/client/v3/rooms/!abc:test.org/redact/$evt/txn":               "/_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{id}",
		"/_matrix/client/v3/profile/@_ferry_x:test.org/displayname":            "/_matrix/client/v3/profile/{userId}/displayname",
		"/_matrix/client/v3/directory/room/#alias:test.org":                    "/_matrix/client/v3/directory/room/{alias}",
		"/_matrix/client/v3/sendToDevice/m.room.encrypted/42":                  "/_matrix/client/v3/sendToDevice/{id}/{id}",
		"/_matrix/client/v3/keys/claim":                                        "/_matrix/client/v3/keys/claim",
		"/_matrix/client/v1/appservice/ferry/ping":                             "/_matrix/client/v1/appservice/{id}/ping",
		"/_matrix/client/versions":                                             "/_matrix/client/versions",
		"":                                                                     "/",
	} {
		if got := Endpoint(path); got != want {
			t.Errorf("Endpoint(%q) = %q, want %q", path, got, want)
		}
	}
}

func TestEventType(t *testing.T) {
	for in, want := range map[string]string{"m.room.message": "m.room.message", "m.call.invite": "m.call.invite", "m.call.anything": "other", "com.evil.x": "other"} {
		if got := EventType(in); got != want {
			t.Errorf("EventType(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestTransport: each request is counted with its errcode, and an error answer stays readable for the caller.
func TestTransport(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/_matrix/client/v3/limited":
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = io.WriteString(w, `{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":10}`)
		case "/_matrix/client/v3/gateway":
			w.WriteHeader(http.StatusBadGateway)
			_, _ = io.WriteString(w, `<html>bad gateway</html>`)
		case "/_matrix/client/v3/odd":
			w.WriteHeader(http.StatusBadRequest)
			_, _ = io.WriteString(w, `{"errcode":"not a code"}`)
		default:
			_, _ = io.WriteString(w, `{}`)
		}
	}))
	defer srv.Close()
	client := &http.Client{Transport: Transport(http.DefaultTransport)}
	for path, tc := range map[string]struct {
		errcode, body string
	}{
		"/_matrix/client/v3/ok":      {ErrcodeNone, `{}`},
		"/_matrix/client/v3/limited": {"M_LIMIT_EXCEEDED", `{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":10}`},
		"/_matrix/client/v3/gateway": {"http_502", `<html>bad gateway</html>`},
		"/_matrix/client/v3/odd":     {ErrcodeOther, `{"errcode":"not a code"}`},
	} {
		counter := HomeserverRequests.WithLabelValues(http.MethodGet, Endpoint(path), tc.errcode)
		before := testutil.ToFloat64(counter)
		resp, err := client.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if string(body) != tc.body {
			t.Errorf("%s: body %q, want %q", path, body, tc.body)
		}
		if got := testutil.ToFloat64(counter) - before; got != 1 {
			t.Errorf("%s: counted %v times with errcode %s, want once", path, got, tc.errcode)
		}
	}
	network := HomeserverRequests.WithLabelValues(http.MethodGet, "/_matrix/client/versions", ErrcodeNetwork)
	before := testutil.ToFloat64(network)
	srv.Close()
	if _, err := client.Get(srv.URL + "/_matrix/client/versions"); err == nil {
		t.Fatal("no error from a closed server")
	}
	if got := testutil.ToFloat64(network) - before; got != 1 {
		t.Errorf("a refused connection counted %v times as network, want once", got)
	}
}

func TestStateCollector(t *testing.T) {
	now := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	snap := Snapshot{
		Inbox:        map[string]Backlog{"pending": {Count: 3, OldestSeen: now.Add(-90 * time.Second)}, "waiting_keys": {}},
		DisappearDue: 2, DisappearOldestDue: now.Add(-5 * time.Second),
	}
	var readErr error
	c := NewStateCollector(func(context.Context) (Snapshot, error) { return snap, readErr })
	c.now = func() time.Time { return now }
	want := `
# HELP ferry_database_up 1 when the last scrape could read the database, 0 when it could not.
# TYPE ferry_database_up gauge
ferry_database_up 1
# HELP ferry_disappear_redactions_due Redactions of disappearing messages whose deadline has passed.
# TYPE ferry_disappear_redactions_due gauge
ferry_disappear_redactions_due 2
# HELP ferry_disappear_redactions_overdue_seconds How far past its deadline the most overdue redaction is; 0 when none is due.
# TYPE ferry_disappear_redactions_overdue_seconds gauge
ferry_disappear_redactions_overdue_seconds 5
# HELP ferry_inbox_events Events waiting in the inbox, by state (pending: queued for their room's worker; waiting_keys: parked until their room key arrives).
# TYPE ferry_inbox_events gauge
ferry_inbox_events{state="pending"} 3
ferry_inbox_events{state="waiting_keys"} 0
# HELP ferry_inbox_oldest_pending_age_seconds Age of the oldest event waiting in each inbox state, since it was received; 0 when none waits.
# TYPE ferry_inbox_oldest_pending_age_seconds gauge
ferry_inbox_oldest_pending_age_seconds{state="pending"} 90
ferry_inbox_oldest_pending_age_seconds{state="waiting_keys"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	readErr = errors.New("database down")
	down := `
# HELP ferry_database_up 1 when the last scrape could read the database, 0 when it could not.
# TYPE ferry_database_up gauge
ferry_database_up 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(down)); err != nil {
		t.Error(err)
	}
}

// The instrumentation on the relay path, per call (go test -bench . ./internal/metrics).
func BenchmarkRelayed(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		Relayed("m.room.message", OutcomeSent)
	}
}

func BenchmarkObserveCommit(b *testing.B) {
	b.ReportAllocs()
	start := time.Now()
	for b.Loop() {
		ObserveCommit(CommitRelay, start)
	}
}

func BenchmarkHomeserverRequestCount(b *testing.B) {
	b.ReportAllocs()
	const path = "/_matrix/client/v3/rooms/!abcdefghijkl:example.org/send/m.room.encrypted/ferry-0123456789abcdef"
	for b.Loop() {
		HomeserverRequests.WithLabelValues("PUT", Endpoint(path), ErrcodeNone).Inc()
	}
}
