package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/appservice"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/internal/config"
	"go.ferry.im/ferry/internal/faultproxy"
)

// TestCheckHomeserverRetriesUntilReachable: while the homeserver answers 502, ferry keeps retrying with backoff and
// says why in its log; once it answers, the bot is registered and whoami is checked.
func TestCheckHomeserverRetriesUntilReachable(t *testing.T) {
	quickStartupRetries(t)
	var versionCalls, registered atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case strings.HasSuffix(r.URL.Path, "/versions"):
			if versionCalls.Add(1) <= 2 {
				w.WriteHeader(http.StatusBadGateway)
				_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN","error":"starting"}`))
				return
			}
			_, _ = w.Write([]byte(`{"versions":["v1.11"]}`))
		case strings.HasSuffix(r.URL.Path, "/register"):
			registered.Add(1)
			_, _ = w.Write([]byte(`{"user_id":"@ferrybot:test.org"}`))
		case strings.HasSuffix(r.URL.Path, "/whoami"):
			_, _ = w.Write([]byte(`{"user_id":"@ferrybot:test.org"}`))
		default:
			_, _ = w.Write([]byte(`{}`))
		}
	}))
	defer srv.Close()
	cfg, as := appserviceFor(t, srv.URL)
	var logBuf bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	path, err := checkHomeserver(ctx, cfg, as, zerolog.New(&logBuf))
	if err != nil {
		t.Fatalf("checkHomeserver: %v", err)
	}
	if versionCalls.Load() != 3 || registered.Load() != 1 {
		t.Fatalf("versions called %d times, register %d; want 3 and 1", versionCalls.Load(), registered.Load())
	}
	if n := strings.Count(logBuf.String(), "Homeserver unreachable, retrying"); n != 2 {
		t.Fatalf("logged %d retries, want 2: %s", n, logBuf.String())
	}
	if !strings.Contains(path, "/sync") {
		t.Fatalf("encryption path %q: a homeserver without appservice mode uses login + /sync", path)
	}
}

// TestCheckHomeserverWrongToken: a homeserver that does not know ferry's as_token stops start-up with a reason.
func TestCheckHomeserverWrongToken(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if strings.HasSuffix(r.URL.Path, "/versions") {
			_, _ = w.Write([]byte(`{"versions":["v1.11"]}`))
			return
		}
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN_TOKEN","error":"unknown token"}`))
	}))
	defer srv.Close()
	cfg, as := appserviceFor(t, srv.URL)
	_, err := checkHomeserver(context.Background(), cfg, as, zerolog.Nop())
	if err == nil || !strings.Contains(err.Error(), "does not know ferry's as_token") || !strings.Contains(err.Error(), "registration") {
		t.Fatalf("err = %v, want one naming the as_token and the registration", err)
	}
}

// appserviceFor loads the test config pointed at a homeserver URL and builds ferry's appservice for it.
func appserviceFor(t *testing.T, hsURL string) (*config.Config, *appservice.AppService) {
	t.Helper()
	cfg, err := config.Load(writeConfig(t, strings.Replace(validConfig, "https://matrix.test.org", hsURL, 1)))
	if err != nil {
		t.Fatal(err)
	}
	as := appservice.Create()
	as.HomeserverDomain = cfg.Homeserver.Domain
	as.Registration = registrationFor(cfg)
	if err = as.SetHomeserverURL(hsURL); err != nil {
		t.Fatal(err)
	}
	return cfg, as
}

// fakeStartupHS answers the requests of ferry's start-up check for @ferrybot:test.org, with ping support, and
// counts them by path suffix.
func fakeStartupHS(t *testing.T, whoami func(w http.ResponseWriter) bool) (*httptest.Server, *sync.Map) {
	counts := &sync.Map{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := counts.LoadOrStore(path.Base(r.URL.Path), new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
		w.Header().Set("Content-Type", "application/json")
		switch {
		case strings.HasSuffix(r.URL.Path, "/versions"):
			_, _ = w.Write([]byte(`{"versions":["v1.11"]}`))
		case strings.HasSuffix(r.URL.Path, "/register"):
			_, _ = w.Write([]byte(`{"user_id":"@ferrybot:test.org"}`))
		case strings.HasSuffix(r.URL.Path, "/whoami"):
			if whoami == nil || !whoami(w) {
				_, _ = w.Write([]byte(`{"user_id":"@ferrybot:test.org"}`))
			}
		case strings.HasSuffix(r.URL.Path, "/ping"):
			_, _ = w.Write([]byte(`{"duration_ms":1}`))
		default:
			_, _ = w.Write([]byte(`{}`))
		}
	}))
	t.Cleanup(srv.Close)
	return srv, counts
}

// quickStartupRetries makes start-up's retries wait 10 ms at first instead of a second, for the test.
func quickStartupRetries(t *testing.T) {
	old := startupBackoff
	startupBackoff = 10 * time.Millisecond
	t.Cleanup(func() { startupBackoff = old })
}

// TestCheckHomeserverRetriesTransientAnswers: a rate limit (either form), a server or gateway error, or a reset
// connection at any step of the start-up check is retried with backoff until the step succeeds; none of them is
// reported as a rejected as_token.
func TestCheckHomeserverRetriesTransientAnswers(t *testing.T) {
	quickStartupRetries(t)
	for _, step := range []string{"register", "whoami", "ping"} {
		for _, kind := range []faultproxy.Kind{faultproxy.RateLimit, faultproxy.RateLimitHeader, faultproxy.Status500, faultproxy.Status502, faultproxy.Status503, faultproxy.Status504, faultproxy.ResetBefore, faultproxy.GatewayAfter} {
			t.Run(step+"/"+string(kind), func(t *testing.T) {
				srv, counts := fakeStartupHS(t, nil)
				var hit atomic.Int32
				p, err := faultproxy.New(faultproxy.Config{Target: srv.URL, Rate: 1, Mix: map[faultproxy.Kind]int{kind: 1}, RetryAfter: 100 * time.Millisecond,
					// The first two requests of the step meet the fault.
					Eligible: func(r *http.Request) bool { return path.Base(r.URL.Path) == step && hit.Add(1) <= 2 }})
				if err != nil {
					t.Fatal(err)
				}
				front := httptest.NewServer(p)
				t.Cleanup(front.Close)
				cfg, as := appserviceFor(t, front.URL)
				as.DefaultHTTPRetries = 0 // as bridge.New sets it: ferry's own loops retry
				var logBuf bytes.Buffer
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				if _, err = checkHomeserver(ctx, cfg, as, zerolog.New(&logBuf)); err != nil {
					t.Fatalf("checkHomeserver: %v\n%s", err, logBuf.String())
				}
				if n, _ := counts.Load(step); n == nil || n.(*atomic.Int32).Load() < 1 {
					t.Fatalf("%s never reached the homeserver", step)
				}
				if p.Tallies().Faults[kind] != 2 {
					t.Fatalf("tallies %v, want 2 faults", p.Tallies())
				}
				if !strings.Contains(logBuf.String(), "retrying") {
					t.Fatalf("the log does not say why start-up waits:\n%s", logBuf.String())
				}
			})
		}
	}
}

// TestCheckHomeserverDefiniteRejections: whoami answering M_UNKNOWN_TOKEN or M_FORBIDDEN stops start-up at once
// with a message naming the real cause.
func TestCheckHomeserverDefiniteRejections(t *testing.T) {
	for _, tc := range []struct {
		status  int
		errcode string
		want    string
	}{
		{401, "M_UNKNOWN_TOKEN", "does not know ferry's as_token"},
		{403, "M_FORBIDDEN", "users namespace must cover appservice.bot.username"},
	} {
		t.Run(tc.errcode, func(t *testing.T) {
			var calls atomic.Int32
			srv, _ := fakeStartupHS(t, func(w http.ResponseWriter) bool {
				calls.Add(1)
				w.WriteHeader(tc.status)
				_, _ = fmt.Fprintf(w, `{"errcode":%q,"error":"no"}`, tc.errcode)
				return true
			})
			cfg, as := appserviceFor(t, srv.URL)
			as.DefaultHTTPRetries = 0
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := checkHomeserver(ctx, cfg, as, zerolog.Nop())
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.errcode) {
				t.Fatalf("err = %v, want one naming %s (%q)", err, tc.errcode, tc.want)
			}
			if calls.Load() != 1 {
				t.Fatalf("whoami asked %d times; a definite rejection is not retried", calls.Load())
			}
		})
	}
}

// TestPingRetriesWhatMayPass: a ping the homeserver could not deliver for a moment (502 M_CONNECTION_FAILED, as
// Synapse has answered while ferry was listening) is tried again; a refused ping (M_FORBIDDEN: wrong token or
// appservice ID) is not.
func TestPingRetriesWhatMayPass(t *testing.T) {
	for name, tc := range map[string]struct {
		failures int
		errcode  string
		status   int
		wantErr  bool
		wantPing int32
	}{
		"transient failures, then reached": {failures: 2, errcode: "M_CONNECTION_FAILED", status: http.StatusBadGateway, wantPing: 3},
		"refused at once":                  {failures: 9, errcode: "M_FORBIDDEN", status: http.StatusForbidden, wantErr: true, wantPing: 1},
	} {
		t.Run(name, func(t *testing.T) {
			quickStartupRetries(t)
			var pings atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				if strings.HasSuffix(r.URL.Path, "/ping") && int(pings.Add(1)) <= tc.failures {
					w.WriteHeader(tc.status)
					_, _ = w.Write([]byte(`{"errcode":"` + tc.errcode + `","error":"no"}`))
					return
				}
				_, _ = w.Write([]byte(`{"duration_ms":1}`))
			}))
			defer srv.Close()
			_, as := appserviceFor(t, srv.URL)
			err := pingUntilReached(context.Background(), as, zerolog.Nop())
			if (err != nil) != tc.wantErr || pings.Load() != tc.wantPing {
				t.Fatalf("err = %v after %d pings; want error %v after %d", err, pings.Load(), tc.wantErr, tc.wantPing)
			}
		})
	}
}

// TestLostProbeKeepsProvenAppserviceMode: a push probe lost at a start (the homeserver was down, or dropped it
// while it counted ferry as down) keeps appservice mode when the homeserver proved before that it pushes; only a
// homeserver that never did is taken for one without the feature.
func TestLostProbeKeepsProvenAppserviceMode(t *testing.T) {
	for _, tc := range []struct {
		err    error
		proven bool
		keep   bool
	}{
		{crypto.ErrNoToDevicePushes, true, true},
		{crypto.ErrNoKeyCountPushes, true, true},
		{crypto.ErrNoToDevicePushes, false, false},
		{errors.New("failed to send the push probe"), true, false},
		{nil, true, false},
	} {
		if got := keepAppserviceMode(tc.err, tc.proven); got != tc.keep {
			t.Errorf("keepAppserviceMode(%v, proven %v) = %v, want %v", tc.err, tc.proven, got, tc.keep)
		}
	}
}
