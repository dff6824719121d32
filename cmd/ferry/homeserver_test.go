package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/appservice"

	"go.ferry.im/ferry/internal/config"
)

// TestCheckHomeserverRetriesUntilReachable: while the homeserver answers 502, ferry keeps retrying with backoff and
// says why in its log; once it answers, the bot is registered and whoami is checked.
func TestCheckHomeserverRetriesUntilReachable(t *testing.T) {
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
