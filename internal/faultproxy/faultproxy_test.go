package faultproxy

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// upstream is a server that records the paths it was asked for and answers 200 {"event_id":"$e"}.
type upstream struct {
	*httptest.Server
	// guards the following fields
	lock  sync.Mutex
	paths []string
}

func newUpstream(t *testing.T) *upstream {
	u := &upstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		u.lock.Lock()
		u.paths = append(u.paths, r.URL.Path)
		u.lock.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"event_id":"$e"}`))
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) seen() []string {
	u.lock.Lock()
	defer u.lock.Unlock()
	return append([]string(nil), u.paths...)
}

func newProxy(t *testing.T, cfg Config) (*Proxy, *httptest.Server) {
	t.Helper()
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(p)
	t.Cleanup(func() { srv.Close(); p.Close() })
	return p, srv
}

// client does not retry and does not reuse connections, so each request meets the proxy on its own.
var client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}

const sendPath = "/_matrix/client/v3/rooms/!r:test/send/m.room.message/txn1"

func put(url string) (*http.Response, []byte, error) {
	req, _ := http.NewRequest(http.MethodPut, url+sendPath, strings.NewReader(`{"body":"x"}`))
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

// TestEachFault: with rate 1 and one kind, every request meets that fault; "before" faults never reach the
// upstream, "after" faults reach it once and keep its answer from the client.
func TestEachFault(t *testing.T) {
	for _, tc := range []struct {
		kind       Kind
		status     int // 0: the connection fails
		upstream   int
		retryAfter string
		retryMS    bool
	}{
		{RateLimit, 429, 0, "", true},
		{RateLimitHeader, 429, 0, "1", false},
		{Status500, 500, 0, "", false},
		{Status502, 502, 0, "", false},
		{Status503, 503, 0, "", false},
		{Status504, 504, 0, "", false},
		{ResetBefore, 0, 0, "", false},
		{ResetAfter, 0, 1, "", false},
		{LostAfter, 0, 1, "", false},
		{GatewayAfter, 504, 1, "", false},
		{Slow, 200, 1, "", false},
	} {
		t.Run(string(tc.kind), func(t *testing.T) {
			up := newUpstream(t)
			p, srv := newProxy(t, Config{Name: "test", Target: up.URL, Rate: 1, Mix: map[Kind]int{tc.kind: 1}, Hold: 50 * time.Millisecond, SlowMax: 50 * time.Millisecond})
			resp, body, err := put(srv.URL)
			switch {
			case tc.status == 0 && err == nil:
				t.Fatalf("got %d %s, want the connection to fail", resp.StatusCode, body)
			case tc.status != 0 && err != nil:
				t.Fatalf("request failed: %v, want %d", err, tc.status)
			case tc.status != 0 && resp.StatusCode != tc.status:
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if tc.status == 429 {
				if got := resp.Header.Get("Retry-After"); got != tc.retryAfter {
					t.Fatalf("Retry-After %q, want %q", got, tc.retryAfter)
				}
				var e map[string]any
				_ = json.Unmarshal(body, &e)
				if _, ok := e["retry_after_ms"]; ok != tc.retryMS || e["errcode"] != "M_LIMIT_EXCEEDED" {
					t.Fatalf("body %s: retry_after_ms present %v, want %v", body, ok, tc.retryMS)
				}
			}
			if got := len(up.seen()); got != tc.upstream {
				t.Fatalf("the upstream saw %d requests, want %d", got, tc.upstream)
			}
			if got := p.Tallies().Faults[tc.kind]; got != 1 {
				t.Fatalf("tallied %d %s faults, want 1", got, tc.kind)
			}
		})
	}
}

// TestForgetTxn: an "after" fault forwards a send under another transaction ID; other requests keep theirs.
func TestForgetTxn(t *testing.T) {
	up := newUpstream(t)
	p, srv := newProxy(t, Config{Target: up.URL, Rate: 1, Mix: map[Kind]int{GatewayAfter: 1}, ForgetTxn: true})
	if _, _, err := put(srv.URL); err != nil {
		t.Fatal(err)
	}
	seen := up.seen()
	if len(seen) != 1 || !strings.HasPrefix(seen[0], strings.TrimSuffix(sendPath, "txn1")) || strings.HasSuffix(seen[0], "/txn1") {
		t.Fatalf("upstream saw %v, want the send under another transaction ID", seen)
	}
	if p.Tallies().Forgotten != 1 {
		t.Fatalf("tallies %+v, want one forgotten transaction ID", p.Tallies())
	}
}

// TestSeedDecidesFaults: the same seed gives the same faults to the same sequence of requests; another seed
// gives others.
func TestSeedDecidesFaults(t *testing.T) {
	run := func(seed uint64) string {
		up := newUpstream(t)
		mix, _ := ParseMix("429,500,502,503,504,reset")
		_, srv := newProxy(t, Config{Target: up.URL, Seed: seed, Rate: 0.5, Mix: mix})
		var sb strings.Builder
		for range 60 {
			resp, _, err := put(srv.URL)
			if err != nil {
				sb.WriteString("x ")
			} else {
				sb.WriteString(resp.Status[:3] + " ")
			}
		}
		return sb.String()
	}
	a, b, c := run(7), run(7), run(8)
	if a != b {
		t.Fatalf("seed 7 gave two sequences:\n%s\n%s", a, b)
	}
	if a == c {
		t.Fatalf("seeds 7 and 8 gave the same sequence: %s", a)
	}
	if !strings.Contains(a, "200") || strings.Count(a, "200") == 60 {
		t.Fatalf("rate 0.5 gave %s", a)
	}
}

// TestSwitchAndTallies: switched off through its control path, the proxy forwards everything; switched on,
// faults resume; the tallies come back as JSON.
func TestSwitchAndTallies(t *testing.T) {
	up := newUpstream(t)
	_, srv := newProxy(t, Config{Name: "hs", Target: up.URL, Rate: 1, Mix: map[Kind]int{Status503: 1}})
	ctl := func(path string) Tallies { return control(t, srv, http.MethodPost, path) }
	if resp, _, _ := put(srv.URL); resp == nil || resp.StatusCode != 503 {
		t.Fatal("the proxy is not on from the start")
	}
	if tl := ctl("off"); tl.Enabled {
		t.Fatal("off did not switch it off")
	}
	for range 5 {
		if resp, _, err := put(srv.URL); err != nil || resp.StatusCode != 200 {
			t.Fatalf("switched off: %v %v", resp, err)
		}
	}
	ctl("on")
	if resp, _, _ := put(srv.URL); resp == nil || resp.StatusCode != 503 {
		t.Fatal("on did not switch it on again")
	}
	tl := ctl("tallies")
	if tl.Requests != 7 || tl.Faults[Status503] != 2 || tl.Forwarded != 5 || tl.Name != "hs" {
		t.Fatalf("tallies %+v", tl)
	}
	if s := tl.String(); !strings.Contains(s, "503=2") || !strings.Contains(s, "7 requests") {
		t.Fatalf("printed tallies %q", s)
	}
}

// TestUpstreamDown: while the upstream does not answer, the proxy answers 502 as a gateway does, and counts it.
func TestUpstreamDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	p, srv := newProxy(t, Config{Target: "http://" + addr})
	resp, _, err := put(srv.URL)
	if err != nil || resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("got %v %v, want 502", resp, err)
	}
	if p.Tallies().Unreachable != 1 {
		t.Fatalf("tallies %+v", p.Tallies())
	}
}

// TestResetIsAReset: a reset fault reaches the client as a connection reset, not a clean close.
func TestResetIsAReset(t *testing.T) {
	up := newUpstream(t)
	_, srv := newProxy(t, Config{Target: up.URL, Rate: 1, Mix: map[Kind]int{ResetBefore: 1}})
	_, _, err := put(srv.URL)
	if err == nil || !(errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || strings.Contains(err.Error(), "reset")) {
		t.Fatalf("err %v, want a reset connection", err)
	}
}

func TestParseMix(t *testing.T) {
	mix, err := ParseMix("429=2, 502,reset-after=3")
	if err != nil || mix[RateLimit] != 2 || mix[Status502] != 1 || mix[ResetAfter] != 3 || len(mix) != 3 {
		t.Fatalf("mix %v, err %v", mix, err)
	}
	if _, err = ParseMix("418"); err == nil {
		t.Fatal("an unknown fault was accepted")
	}
	if mix, _ = ParseMix("all"); len(mix) != len(AllKinds) {
		t.Fatalf("all gave %v", mix)
	}
}

// TestDropNext: an armed drop answers the first request whose body matches 200 {} without forwarding it, and only
// that one; requests that do not match, and the ones after it, go through.
func TestDropNext(t *testing.T) {
	up := newUpstream(t)
	_, srv := newProxy(t, Config{Name: "to-ferry", Target: up.URL})
	post := func(path, body string) *http.Response {
		t.Helper()
		resp, err := client.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		return resp
	}
	if resp := post(ControlPrefix+"drop-next?contains=m.megolm&contains=!a:test&without=m.olm", ""); resp.StatusCode != 200 {
		t.Fatalf("arming answered %d", resp.StatusCode)
	}
	post("/txn/1", `{"events":[{"room_id":"!b:test","algorithm":"m.megolm"}]}`)                                     // other room
	post("/txn/2", `{"events":[{"room_id":"!a:test","algorithm":"m.megolm"}],"to_device":[{"algorithm":"m.olm"}]}`) // carries a key
	if resp := post("/txn/3", `{"events":[{"room_id":"!a:test","algorithm":"m.megolm"}]}`); resp.StatusCode != 200 {
		t.Fatalf("the dropped request was answered %d", resp.StatusCode)
	}
	post("/txn/4", `{"events":[{"room_id":"!a:test","algorithm":"m.megolm"}]}`)
	if got := strings.Join(up.seen(), " "); got != "/txn/1 /txn/2 /txn/4" {
		t.Fatalf("the upstream got %s, want /txn/1 /txn/2 /txn/4", got)
	}
	if tl := control(t, srv, http.MethodGet, "tallies"); tl.Dropped != 1 || tl.Requests != 4 || !strings.Contains(tl.String(), "1 dropped as asked") {
		t.Fatalf("tallies %+v (%s)", tl, tl)
	}
	if resp := post(ControlPrefix+"drop-next", ""); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("drop-next without contains answered %d, want 400", resp.StatusCode)
	}
}

// control calls one of the proxy's control paths and returns the tallies it answers with.
func control(t *testing.T, srv *httptest.Server, method, path string) Tallies {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+ControlPrefix+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tl Tallies
	if err = json.NewDecoder(resp.Body).Decode(&tl); err != nil {
		t.Fatal(err)
	}
	return tl
}
