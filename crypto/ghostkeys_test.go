package crypto

import (
	"context"
	"testing"

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
