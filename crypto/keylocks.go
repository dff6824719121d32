package crypto

import (
	"slices"
	"sync"

	"go.mau.fi/util/exsync"
	"maunium.net/go/mautrix/id"
)

// keyLocks serialise device-list checks and fetches per user: key shares (device.devicesOf) and device-list
// changes from /sync (cryptoSyncer) and from appservice transactions (HandleTransactionCrypto). mautrix stores a
// fetched user's devices before their cross-signing keys and signatures, so a share that read the devices in
// between would judge them unsigned and withhold the room key; holding the users' locks across a check or a
// fetch prevents that. Only shares and fetches about the same user wait for each other: a share into one room
// does not wait for a slow fetch of a member of another.
type keyLocks struct {
	// all is held for reading by every per-user holder, and for writing by a check of every tracked user at once
	// (catchUpDeviceLists).
	all   sync.RWMutex
	users exsync.KeyedMutex[id.UserID]
}

// lock takes the locks of users (in a fixed order, so two holders of overlapping sets cannot deadlock) and
// returns the function that frees them.
func (l *keyLocks) lock(users []id.UserID) (unlock func()) {
	sorted := slices.Compact(slices.Sorted(slices.Values(users)))
	l.all.RLock()
	unlocks := make([]func(), len(sorted))
	for i, u := range sorted {
		unlocks[i] = l.users.WithLock(u)
	}
	return func() {
		for i := len(unlocks) - 1; i >= 0; i-- {
			unlocks[i]()
		}
		l.all.RUnlock()
	}
}

// lockAll takes the locks of every user at once and returns the function that frees them.
func (l *keyLocks) lockAll() (unlock func()) {
	l.all.Lock()
	return l.all.Unlock
}
