package crypto

import (
	"context"
	"strings"
	"testing"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestDrainIdleGhost: on the login + /sync path, a ghost's device that is not loaded (an idle ghost, or any ghost
// after a restart) is drained with its stored tokens alone: the member's room key queued for it is fetched and
// acknowledged without loading the device, and a room key request for the ghost's session loads the device, which
// answers it.
func TestDrainIdleGhost(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := startASRig(ctx, t, fakehs.Options{NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"}, "asmode-secret")
	defer r.m.Stop()
	sent := r.sendAs(t, r.ghost, "the ghost has a device")
	r.memberReads(t, sent, "the ghost has a device")
	// The member's client shares its room key with every device in the room: the ghost's gets one too.
	r.memberSends(t, "a room key for every device")
	r.m.forgetGhost(r.ghost)

	loaded := func() bool {
		r.m.ghostsLock.Lock()
		defer r.m.ghostsLock.Unlock()
		return r.m.ghosts[r.ghost] != nil
	}
	stats, err := r.m.drainGhost(ctx, r.ghost)
	if err != nil {
		t.Fatal(err)
	}
	if stats == nil || stats.Events == 0 || stats.KeyRequest != 0 {
		t.Fatalf("the drain did not fetch the queued room key: %+v", stats)
	}
	if loaded() {
		t.Error("draining an idle ghost loaded its device")
	}
	if stats, err = r.m.drainGhost(ctx, r.ghost); err != nil || stats == nil || stats.Events != 0 {
		for _, e := range r.srv.TakeToDevice(r.ghost, r.srv.Devices(r.ghost)[0]) {
			t.Logf("queued: %s from %s", e.Type.Type, e.Sender)
		}
		t.Fatalf("a second drain fetched again (the first did not acknowledge): %+v, %v", stats, err)
	}

	// The member asks the ghost's device for the ghost's session.
	enc := sent.Content.AsEncrypted()
	ghostDevice := r.srv.Devices(r.ghost)
	if len(ghostDevice) != 1 {
		t.Fatalf("the ghost has %d devices", len(ghostDevice))
	}
	if err = r.member.Machine.SendRoomKeyRequest(ctx, r.room, enc.SenderKey, enc.SessionID, "req1",
		map[id.UserID][]id.DeviceID{r.ghost: ghostDevice}); err != nil {
		t.Fatal(err)
	}
	if stats, err = r.m.drainGhost(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	if stats == nil || stats.KeyRequest != 1 {
		t.Fatalf("the drain did not see the key request: %+v", stats)
	}
	if !loaded() {
		t.Error("a key request did not load the ghost's device to answer it")
	}
	var forwarded bool
	for _, evt := range r.srv.TakeToDevice(r.member.ID, r.member.DeviceID) {
		if evt.Type == event.ToDeviceEncrypted && evt.Sender == r.ghost {
			forwarded = true
		}
	}
	if !forwarded {
		t.Error("the ghost's device did not answer the key request")
	}
}

// TestDrainSchedule: ghosts a member's room key pointed at come first, then those that sent recently, then the
// backstop's oldest; the backstop of ghosts listed at a start is spread over its interval instead of all due at
// once.
func TestDrainSchedule(t *testing.T) {
	m := &Machine{ghosts: map[id.UserID]*ghostState{}, drained: map[id.UserID]time.Time{}, lastSent: map[id.UserID]time.Time{}}
	now := time.Now()
	var ghosts []id.UserID
	for _, g := range []string{"a", "b", "c", "d", "e"} {
		ghosts = append(ghosts, id.UserID("@ghost_"+g+":x"))
	}
	m.spreadDrains(ghosts, now)
	backstop := backstopInterval(len(ghosts))
	listed := map[id.UserID]bool{}
	for _, g := range ghosts {
		listed[g] = true
	}
	if due := m.dueDrains(ghosts, listed, now, 10); len(due) != 0 {
		t.Fatalf("ghosts due right after the start: %v", due)
	}
	if due := m.dueDrains(ghosts, listed, now.Add(backstop/2-time.Second), 10); len(due) != 2 {
		t.Fatalf("half an interval after the start %d ghosts are due, want 2 of 5: %v", len(due), due)
	}
	m.lastSent[ghosts[3]] = now
	m.drained[ghosts[3]] = now.Add(-activeDrainInterval)
	m.drainSoon = map[id.UserID]bool{ghosts[4]: true}
	due := m.dueDrains(ghosts, listed, now.Add(time.Second), 10)
	if len(due) != 2 || due[0] != ghosts[4] || due[1] != ghosts[3] {
		t.Fatalf("due %v, want the room key's ghost then the active one", due)
	}
	if due = m.dueDrains(ghosts, listed, now.Add(backstop), 3); len(due) != 3 || due[0] != ghosts[4] {
		t.Fatalf("a full batch %v does not start with the room key's ghost", due)
	}
}

// TestBackstopInterval: a few idle ghosts are drained every minute (a late key request to one is answered soon);
// many are drained at two a second in all, never less often than hourly.
func TestBackstopInterval(t *testing.T) {
	for n, want := range map[int]time.Duration{1: time.Minute, 120: time.Minute, 1000: 500 * time.Second, 7200: time.Hour, 50000: time.Hour} {
		if got := backstopInterval(n); got != want {
			t.Errorf("backstopInterval(%d) = %s, want %s", n, got, want)
		}
	}
}

// TestNewGhostDrainsWithoutReadingItsToken: a ghost device this process just created has no to-device token yet,
// and its first drain knows that without reading its account (the bot's own /sync, running beside, reads what it
// reads); what the drain fetched (a member's room key) is
// acknowledged, so the next drain fetches nothing again.
func TestNewGhostDrainsWithoutReadingItsToken(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log := startASRigLogged(ctx, t, devicePaths()["login"])
	defer r.m.Stop()
	sent := r.sendAs(t, r.ghost, "the ghost has a device")
	r.memberReads(t, sent, "the ghost has a device")
	r.memberSends(t, "a room key for every device")
	log.takeReads("")
	stats, err := r.m.DrainGhost(ctx, r.ghost)
	if err != nil || stats == nil || stats.Events == 0 {
		t.Fatalf("the drain did not fetch the queued room key: %+v, %v", stats, err)
	}
	if reads := log.takeReads("crypto_account"); len(reads) != 0 {
		t.Errorf("the new device's first drain read its account %d times, want none:\n%s", len(reads), strings.Join(reads, "\n"))
	}
	if stats, err = r.m.DrainGhost(ctx, r.ghost); err != nil || stats == nil || stats.Events != 0 {
		t.Fatalf("a second drain fetched again (the first did not acknowledge): %+v, %v", stats, err)
	}
}
