package crypto

// Test-only entry points: code that runs in production reaches these through other paths (deadcode found no
// caller outside tests), so they live here rather than in the package.

import (
	"context"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

// share is shareStamped with the room's current rotation stamp.
func (d *device) share(ctx context.Context, roomID id.RoomID, users []id.UserID, policy sharePolicy) (*ShareStats, error) {
	return d.shareStamped(ctx, roomID, users, policy, d.olm.c.stamp(roomID))
}

// peekNext returns k's successor without taking it (tests).
func (c *storeCache) peekNext(k outboundKey) *crypto.OutboundGroupSession {
	c.preLock.Lock()
	defer c.preLock.Unlock()
	return c.pre.next[k]
}
