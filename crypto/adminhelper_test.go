package crypto

import (
	"context"
	"errors"
	"testing"

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
