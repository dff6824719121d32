package crypto

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestGhostDeviceUploadsFewOneTimeKeys: a ghost's new device uploads ghostOneTimeKeys one-time keys, on both
// device paths, and still works for what members do with it: their client opens an Olm channel to the ghost's
// device with one of those keys when it shares its own room key, and reads the ghost's message.
func TestGhostDeviceUploadsFewOneTimeKeys(t *testing.T) {
	for name, opts := range map[string]fakehs.Options{
		"appservice": {CrossSigningUIA: true},
		"login":      {NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"},
	} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r := startASRig(ctx, t, opts, opts.SharedSecret)
			defer r.m.Stop()
			if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
				t.Fatal(err)
			}
			devices := r.srv.Devices(r.ghost)
			if len(devices) != 1 {
				t.Fatalf("the ghost has devices %v, want one", devices)
			}
			if n := r.srv.OTKCount(r.ghost, devices[0]); n != ghostOneTimeKeys {
				t.Fatalf("the ghost's new device uploaded %d one-time keys, want %d", n, ghostOneTimeKeys)
			}
			// The member writes before the ghost ever did: its client has no Olm channel to the ghost's device yet
			// and claims one of its keys.
			r.memberSends(t, "a room key for every device")
			if n := r.srv.OTKCount(r.ghost, devices[0]); n != ghostOneTimeKeys-1 {
				t.Fatalf("after the member shared its room key the ghost's device has %d one-time keys, want %d (one claimed)", n, ghostOneTimeKeys-1)
			}
			sent := r.sendAs(t, r.ghost, "first words")
			r.memberReads(t, sent, "first words")
		})
	}
}

// TestGhostSetUpsAreBounded: when many new senders speak at once, at most ghostSetUpParallel of their ghosts'
// devices are set up side by side (the rest wait their turn), so that their requests and statements leave the
// established links' messages room; every one of them is set up in the end.
func TestGhostSetUpsAreBounded(t *testing.T) {
	for name, opts := range map[string]fakehs.Options{
		"appservice": {CrossSigningUIA: true},
		"login":      {NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"},
	} {
		t.Run(name, func(t *testing.T) { ghostSetUpsAreBounded(t, opts) })
	}
}

// ghostSetUpsAreBounded is TestGhostSetUpsAreBounded on one device path.
func ghostSetUpsAreBounded(t *testing.T, opts fakehs.Options) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	inFlight, most := 0, 0
	opts.BeforeRequest = func(route string, _ []byte) {
		if route != "POST /_matrix/client/v3/keys/upload" {
			return
		}
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		mu.Unlock()
		time.Sleep(50 * time.Millisecond) // a homeserver taking its time
		mu.Lock()
		inFlight--
		mu.Unlock()
	}
	r := startASRig(ctx, t, opts, opts.SharedSecret)
	defer r.m.Stop()
	const ghosts = 3 * ghostSetUpParallel
	var wg sync.WaitGroup
	errs := make(chan error, ghosts)
	for i := range ghosts {
		g := id.NewUserID(fmt.Sprintf("ghost_new%d", i), r.srv.Domain())
		if _, err := r.asClient(t, r.bot).MakeRequest(ctx, http.MethodPost, r.asClient(t, r.bot).BuildClientURL("v3", "register"),
			map[string]any{"type": mautrix.AuthTypeAppservice, "username": g.Localpart(), "inhibit_login": true}, nil); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.m.PrepareSender(ctx, g); err != nil {
				errs <- err
			} else if !r.m.SenderReady(g) {
				errs <- fmt.Errorf("%s is not ready after its set-up", g)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if most > ghostSetUpParallel {
		t.Errorf("%d ghost devices were set up side by side, want at most %d", most, ghostSetUpParallel)
	}
	if most < 2 {
		t.Errorf("ghost devices were set up one at a time (%d side by side)", most)
	}
}
