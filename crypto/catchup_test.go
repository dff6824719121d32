package crypto

import (
	"context"
	"testing"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestCatchUpRefetchesOnlyChanged: the start-up catch-up of device lists passes to mautrix's fetch only the users
// whose keys on the server differ from the stored ones: none right after a fetch stored them, a member who added
// a device, and none again once the catch-up stored that device (what the fetch stores is what the comparison
// expects, so an unchanged member is never fetched again at every start).
func TestCatchUpRefetchesOnlyChanged(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := startASRig(ctx, t, fakehs.Options{CrossSigningUIA: true}, "")
	defer r.m.Stop()
	r.sendAs(t, r.bot, "the member's devices are now tracked")
	members := []id.UserID{r.member.ID}
	refetch := func() []id.UserID {
		t.Helper()
		before, err := loadDevices(ctx, r.m.db, members)
		if err != nil {
			t.Fatal(err)
		}
		out, err := r.m.keysToRefetch(ctx, members, before)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	if got := refetch(); len(got) != 0 {
		t.Fatalf("an unchanged member is fetched again: %v", got)
	}
	if _, err := r.srv.NewUser(ctx, r.member.ID, fakehs.UserOptions{DeviceID: "SECONDDEVICE"}); err != nil {
		t.Fatal(err)
	}
	if got := refetch(); len(got) != 1 || got[0] != r.member.ID {
		t.Fatalf("a member with a new device is not fetched again: %v", got)
	}
	if err := r.m.catchUpDeviceLists(ctx); err != nil {
		t.Fatal(err)
	}
	devs, err := loadDevices(ctx, r.m.db, members)
	if err != nil {
		t.Fatal(err)
	}
	if devs[r.member.ID]["SECONDDEVICE"] == nil {
		t.Fatalf("the catch-up did not store the new device: %v", devs[r.member.ID])
	}
	if got := refetch(); len(got) != 0 {
		t.Fatalf("the member is fetched again after the catch-up stored their devices: %v", got)
	}
}
