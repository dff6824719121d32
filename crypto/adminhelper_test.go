package crypto

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestAdminHelperLeastPrivilege: on a Dendrite-like homeserver (no MSC4190, password UIA before cross-signing, a
// shared secret), ferry's admin helper sets the passwords its accounts need and is logged out after each use:
// it keeps no device and no live token. RemoveAdminHelper deactivates it, and ferry never creates it again (a
// ghost that then needs a password falls back to the bot's device).
func TestAdminHelperLeastPrivilege(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := newASRig(t, fakehs.Options{NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"}, "asmode-secret")
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	helper := r.m.adminUserID()
	status, err := r.m.AdminHelper(ctx)
	if err != nil || !status.Exists || !status.Possible || status.Removed || status.LoggedIn || status.UserID != helper {
		t.Fatalf("status after use = %+v, %v", status, err)
	}
	if devs := r.srv.Devices(helper); len(devs) != 0 {
		t.Fatalf("the admin helper still has devices %v after use: its token was not logged out", devs)
	}
	logins := r.srv.Counts()[routeLogin]

	existed, err := r.m.RemoveAdminHelper(ctx)
	if err != nil || !existed {
		t.Fatalf("RemoveAdminHelper = %t, %v", existed, err)
	}
	if !r.srv.Deactivated(helper) {
		t.Fatal("the admin helper was not deactivated on the homeserver")
	}
	if status, _ = r.m.AdminHelper(ctx); status.Exists || !status.Removed {
		t.Fatalf("status after removal = %+v", status)
	}
	registrations := r.srv.Counts()["POST /_synapse/admin/v1/register"]
	// A ghost that needs a password now gets none: ferry does not bring the helper back.
	other := id.NewUserID("ghost_bob", r.srv.Domain())
	if _, err = r.asClient(t, r.bot).MakeRequest(ctx, "POST", r.asClient(t, r.bot).BuildClientURL("v3", "register"),
		map[string]any{"type": "m.login.application_service", "username": other.Localpart(), "inhibit_login": true}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err = r.m.provisionPassword(ctx, other, r.m.storeFor(other)); !errors.Is(err, ErrNoPassword) || !errors.Is(err, ErrAdminHelperRemoved) {
		t.Fatalf("provisionPassword after removal = %v, want ErrNoPassword for a removed helper", err)
	}
	if got := r.srv.Counts()["POST /_synapse/admin/v1/register"]; got != registrations {
		t.Fatal("ferry registered the admin helper again after it was removed")
	}
	if devs := r.srv.Devices(helper); len(devs) != 0 || r.srv.Counts()[routeLogin] < logins {
		t.Fatalf("the removed helper has devices %v", devs)
	}
}

// TestAdminHelperServesOverlappingCalls: when several of ferry's accounts need a password at once (many new
// senders on Dendrite), the admin helper's one login serves every call that overlaps it, side by side, and is
// logged out when the last of them ends. Before, each call logged in and out on its own, one at a time, and new
// senders' ghosts queued behind each other's.
func TestAdminHelperServesOverlappingCalls(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const calls = 4
	var mu sync.Mutex
	counting, arrived, timedOut := false, 0, false
	all := make(chan struct{})
	opts := fakehs.Options{NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret", BeforeRequest: func(route string, _ []byte) {
		mu.Lock()
		if route != "POST /_dendrite/admin/resetPassword/{userID}" || !counting {
			mu.Unlock()
			return
		}
		arrived++
		if arrived == calls {
			close(all)
		}
		mu.Unlock()
		// Each password reset waits until all of them reached the homeserver (or 5 s: they did not overlap).
		select {
		case <-all:
		case <-time.After(5 * time.Second):
			mu.Lock()
			timedOut = true
			mu.Unlock()
		}
	}}
	r := newASRig(t, opts, "asmode-secret")
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer r.m.Stop()
	// The helper exists already (a first use), so that what follows are logins.
	if _, err := r.m.provisionPassword(ctx, r.ghost, r.m.storeFor(r.ghost)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	counting = true
	mu.Unlock()

	logins := r.srv.Counts()[routeLogin]
	var users []id.UserID
	for i := range calls {
		u := id.NewUserID(fmt.Sprintf("ghost_new%d", i), r.srv.Domain())
		if _, err := r.asClient(t, r.bot).MakeRequest(ctx, "POST", r.asClient(t, r.bot).BuildClientURL("v3", "register"),
			map[string]any{"type": "m.login.application_service", "username": u.Localpart(), "inhibit_login": true}, nil); err != nil {
			t.Fatal(err)
		}
		users = append(users, u)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, calls)
	for _, u := range users {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := r.m.provisionPassword(ctx, u, r.m.storeFor(u)); err != nil {
				errs <- fmt.Errorf("%s: %w", u, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	mu.Lock()
	if timedOut {
		t.Errorf("the %d password resets did not reach the homeserver side by side (took %s)", calls, time.Since(start).Round(time.Millisecond))
	}
	mu.Unlock()
	if n := r.srv.Counts()[routeLogin] - logins; n > 1 {
		t.Errorf("the admin helper logged in %d times for %d overlapping calls, want once", n, calls)
	}
	if devs := r.srv.Devices(r.m.adminUserID()); len(devs) != 0 {
		t.Errorf("the admin helper still has devices %v after the calls ended: its token was not logged out", devs)
	}
	for _, u := range users {
		if pw, err := r.m.storeFor(u).GetSecret(ctx, secretPassword); err != nil || pw == "" {
			t.Errorf("%s has no stored password (%v)", u, err)
		}
	}
}
