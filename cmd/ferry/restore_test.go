package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

type forgetRecorder struct{ calls atomic.Int32 }

func (f *forgetRecorder) ForgetCleanStop(context.Context) error { f.calls.Add(1); return nil }

// TestRestoreCheckRetriesARateLimit: a rate limit (then a server error) on reading the homeserver's store
// generation is retried as a start-up step, not taken as "cannot ask" (which would skip the restore check), so a
// restored database is still noticed.
func TestRestoreCheckRetriesARateLimit(t *testing.T) {
	quickStartupRetries(t)
	ctx := context.Background()
	db := database.New(dbtest.SQLite(t), dbutil.ZeroLogger(zerolog.Nop()))
	if err := db.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	// The database says generation 1; the homeserver saw generation 5 (this database is a restored backup).
	if err := db.KV.Set(ctx, storeGenerationKey, "1"); err != nil {
		t.Fatal(err)
	}
	var reads atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if !strings.Contains(r.URL.Path, "/account_data/") {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		if r.Method == http.MethodPut {
			_, _ = w.Write([]byte(`{}`))
			return
		}
		switch reads.Add(1) {
		case 1:
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = w.Write([]byte(`{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":20}`))
		case 2:
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN","error":"gateway"}`))
		default:
			_, _ = w.Write([]byte(`{"generation":5}`))
		}
	}))
	defer srv.Close()
	bot, err := mautrix.NewClient(srv.URL, "@ferrybot:test.org", "token")
	if err != nil {
		t.Fatal(err)
	}
	bot.DefaultHTTPRetries = 0
	var logBuf bytes.Buffer
	log := zerolog.New(&logBuf)
	forget := &forgetRecorder{}
	err = retryStartup(ctx, log, "check whether the database was restored from a backup", func() error {
		return checkRestored(ctx, db, bot, log, forget)
	})
	if err != nil {
		t.Fatalf("checkRestored: %v\n%s", err, logBuf.String())
	}
	if forget.calls.Load() != 1 {
		t.Fatalf("the restored database was not noticed (ForgetCleanStop called %d times); log:\n%s", forget.calls.Load(), logBuf.String())
	}
	if got, _ := db.KV.Get(ctx, storeGenerationKey); got != "6" {
		t.Fatalf("the database's generation is %q, want 6", got)
	}
}
