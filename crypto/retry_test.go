package crypto

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"go.ferry.im/ferry/internal/fakehs"
)

// failOnce answers the first request whose path ends with suffix with a 500, as a homeserver that is restarting.
type failOnce struct {
	next   http.RoundTripper
	suffix string
	done   atomic.Bool
}

func (f *failOnce) RoundTrip(req *http.Request) (*http.Response, error) {
	if strings.HasSuffix(req.URL.Path, f.suffix) && f.done.CompareAndSwap(false, true) {
		return &http.Response{StatusCode: 500, Header: http.Header{"Content-Type": {"application/json"}}, Request: req,
			Body: io.NopCloser(strings.NewReader(`{"errcode":"M_UNKNOWN","error":"restarting"}`))}, nil
	}
	return f.next.RoundTrip(req)
}

// TestInitRetriesAfterTransientFailure: ferry's start-up retries setting up encryption when the homeserver fails
// for a moment after the bot's device logged in; the retry logs in again with the appservice token, not with the
// device's own token that the first login left in the client.
func TestInitRetriesAfterTransientFailure(t *testing.T) {
	ctx := context.Background()
	r := newASRig(t, fakehs.Options{NoMSC4190: true}, "")
	r.m.cfg.Appservice = false            // m.login.application_service devices with /sync, as on Dendrite
	if err := r.m.Init(ctx); err != nil { // the bot's device exists from here on
		t.Fatal(err)
	}
	next := r.newMachine(t)
	next.cfg.Appservice = false
	next.client.Client = &http.Client{Transport: &failOnce{next: http.DefaultTransport, suffix: "/keys/query"}}
	if err := next.Init(ctx); err == nil {
		t.Fatal("the homeserver's failure did not reach Init")
	}
	if err := next.Init(ctx); err != nil {
		t.Fatalf("Init after a transient failure: %v", err)
	}
}
