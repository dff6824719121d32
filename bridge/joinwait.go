package bridge

import (
	"context"
	"sync"
	"time"

	"maunium.net/go/mautrix/id"
)

// joinWaits holds back a ghost's first message into a room it has just joined, for bridge.ghost_join_wait after
// the join. Members' clients start fetching a user's keys (devices and cross-signing identity) when they see the
// user join a room they share; a room key and message that reach a client before that fetch answers are judged
// without the identity: the message shows as sent from a device its owner did not sign, and clients do not judge
// it again once the identity arrives (matrix-js-sdk with its Rust crypto, Element's stack, keeps the warning, or
// with "exclude insecure devices" never shows the message). Only the first message after a join waits; a ghost
// prepared ahead (prepareSenders) has usually waited its time out before the relay reaches its message.
type joinWaits struct {
	// guards the following field
	lock   sync.Mutex
	joined map[ghostRoom]time.Time
}

type ghostRoom struct {
	ghost id.UserID
	room  id.RoomID
}

// note records that ghost joined room at when. Joins older than any wait (MaxGhostJoinWait) are forgotten then:
// a ghost brought in whose message never went out (moderated, or failed for good) leaves no entry behind.
func (j *joinWaits) note(ghost id.UserID, room id.RoomID, when time.Time) {
	j.lock.Lock()
	defer j.lock.Unlock()
	if j.joined == nil {
		j.joined = make(map[ghostRoom]time.Time)
	}
	for key, at := range j.joined {
		if when.Sub(at) > MaxGhostJoinWait {
			delete(j.joined, key)
		}
	}
	j.joined[ghostRoom{ghost, room}] = when
}

// wait returns once ghost's join into room (if noted) is d old, then forgets it. It returns false when ctx
// ended first (the join is kept: the message that waited has not gone out).
func (j *joinWaits) wait(ctx context.Context, ghost id.UserID, room id.RoomID, d time.Duration) bool {
	key := ghostRoom{ghost, room}
	j.lock.Lock()
	when, ok := j.joined[key]
	j.lock.Unlock()
	if !ok {
		return true
	}
	if left := time.Until(when.Add(d)); left > 0 && !sleep(ctx, left) {
		return false
	}
	j.lock.Lock()
	if j.joined[key] == when {
		delete(j.joined, key)
	}
	j.lock.Unlock()
	return true
}

// pending counts the joins noted and not yet waited out by a message.
func (j *joinWaits) pending() int {
	j.lock.Lock()
	defer j.lock.Unlock()
	return len(j.joined)
}
