package bridge

import (
	"context"
	"sync"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// hotCache keeps in memory what every relayed message would otherwise read from the state store although it
// rarely changes: which rooms are encrypted, and which ghosts are already in a target room with an up-to-date
// name and avatar.
type hotCache struct {
	// encrypted holds rooms known to be encrypted. Matrix has no way to turn encryption off, so an entry never
	// goes stale; rooms not (yet) encrypted are not cached.
	encrypted sync.Map // id.RoomID → struct{}

	lock sync.Mutex
	// gen counts membership and room-name changes: an entry computed while one happened is not stored.
	gen uint64
	// ghosts holds (source room, real user, target room) whose ghost was in the target with the name and
	// avatar derived from the source the last time it was checked, and no member, name or alias event has been
	// handled since.
	ghosts map[ghostKey]struct{}
}

type ghostKey struct {
	source id.RoomID
	real   id.UserID
	target id.RoomID
}

func (h *hotCache) ghostReady(k ghostKey) bool {
	h.lock.Lock()
	defer h.lock.Unlock()
	_, ok := h.ghosts[k]
	return ok
}

func (h *hotCache) generation() uint64 {
	h.lock.Lock()
	defer h.lock.Unlock()
	return h.gen
}

func (h *hotCache) setGhostReady(k ghostKey, gen uint64) {
	h.lock.Lock()
	defer h.lock.Unlock()
	if h.gen != gen {
		return
	}
	if h.ghosts == nil || boundedCacheFull(len(h.ghosts)) {
		h.ghosts = make(map[ghostKey]struct{})
	}
	h.ghosts[k] = struct{}{}
}

// stateChanged forgets the ghost entries of room (as source or target) when a state event there that a ghost's
// membership or profile depends on is handled (a member leaving or being kicked, a profile change, a room rename
// used by the name template). Entries of other rooms cannot depend on it.
func (h *hotCache) stateChanged(t event.Type, room id.RoomID) {
	switch t {
	case event.StateMember, event.StateRoomName, event.StateCanonicalAlias:
	default:
		return
	}
	h.lock.Lock()
	defer h.lock.Unlock()
	h.gen++
	for k := range h.ghosts {
		if k.source == room || k.target == room {
			delete(h.ghosts, k)
		}
	}
}

// forgetGhost forgets one entry (a send as that ghost failed: its membership is checked again next time).
func (h *hotCache) forgetGhost(k ghostKey) {
	h.lock.Lock()
	defer h.lock.Unlock()
	h.gen++
	delete(h.ghosts, k)
}

// isEncrypted is StateStore.IsEncrypted, remembering rooms found encrypted.
func (b *Bridge) isEncrypted(ctx context.Context, room id.RoomID) (bool, error) {
	if _, ok := b.hot.encrypted.Load(room); ok {
		return true, nil
	}
	enc, err := b.StateStore.IsEncrypted(ctx, room)
	if err == nil && enc {
		b.hot.encrypted.Store(room, struct{}{})
	}
	return enc, err
}
