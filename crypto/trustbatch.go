package crypto

import (
	"context"
	"fmt"
	"sync"

	"maunium.net/go/mautrix/id"
)

// A trustBatch collects the cross-signing keys and signatures that mautrix stores one statement and commit at a
// time, so that they are written in one statement each when a step is over:
//   - while an account publishes its identity or signs its device (three signatures, then two), where nothing
//     reads them back in between and a step that stops half-way leaves no marker, so it is done again;
//   - while a member's keys are fetched and their sender's trust resolved (two to six rows of each per member),
//     where mautrix reads them back: a read of signatures through the same context writes the batch first, and a
//     read of a user's cross-signing keys is answered from the trust cache with the batch's keys applied, as the
//     store would answer after the writes (or writes the batch first when the cache does not hold that user).
//
// Only writes through a context from withTrustBatch are collected, and only the cachedStore that first added to
// a batch writes it.
type trustBatch struct {
	lock   sync.Mutex
	store  *cachedStore
	sigs   []batchedSignature
	keys   []batchedKey
	closed bool // finished: later writes through the context are the callers' own
}

type batchedSignature struct {
	row       signatureRow
	signature string
}

// batchedKey is one PutCrossSigningKey.
type batchedKey struct {
	user  id.UserID
	usage id.CrossSigningUsage
	key   id.Ed25519
}

type trustBatchKey struct{}

// withTrustBatch returns a context whose cross-signing writes through a cachedStore wait for the batch's flush
// (or finish).
func withTrustBatch(ctx context.Context) (context.Context, *trustBatch) {
	b := &trustBatch{}
	return context.WithValue(ctx, trustBatchKey{}, b), b
}

func trustBatchFrom(ctx context.Context) *trustBatch {
	b, _ := ctx.Value(trustBatchKey{}).(*trustBatch)
	return b
}

// joinLocked reports whether s may add to the batch (the first store to add owns it, until the batch is
// finished). Callers hold b.lock.
func (b *trustBatch) joinLocked(s *cachedStore) bool {
	if b.closed {
		return false
	} else if b.store == nil {
		b.store = s
	}
	return b.store == s
}

// addSignature keeps a signature for flush; false when the caller must write it itself.
func (b *trustBatch) addSignature(s *cachedStore, sig batchedSignature) bool {
	b.lock.Lock()
	defer b.lock.Unlock()
	if !b.joinLocked(s) {
		return false
	}
	b.sigs = append(b.sigs, sig)
	return true
}

// addKey keeps a cross-signing key for flush; false when the caller must write it itself.
func (b *trustBatch) addKey(s *cachedStore, k batchedKey) bool {
	b.lock.Lock()
	defer b.lock.Unlock()
	if !b.joinLocked(s) {
		return false
	}
	b.keys = append(b.keys, k)
	return true
}

// holds reports whether the batch has anything for s to write.
func (b *trustBatch) holds(s *cachedStore) bool {
	b.lock.Lock()
	defer b.lock.Unlock()
	return b.store == s && len(b.sigs)+len(b.keys) > 0
}

// keysOf returns the batch's keys of user for s, in the order added.
func (b *trustBatch) keysOf(s *cachedStore, user id.UserID) []batchedKey {
	b.lock.Lock()
	defer b.lock.Unlock()
	if b.store != s {
		return nil
	}
	var out []batchedKey
	for _, k := range b.keys {
		if k.user == user {
			out = append(out, k)
		}
	}
	return out
}

// flush writes the collected keys and signatures, one statement each, as the same writes one by one would leave
// them (the last of two signatures with the same signer and signed key wins; the first key seen for a usage
// stays), and applies them to the trust cache as cachedStore's single writes do. ctx is the caller's.
func (b *trustBatch) flush(ctx context.Context) error {
	b.lock.Lock()
	s, sigs, keys := b.store, b.sigs, b.keys
	b.sigs, b.keys = nil, nil
	b.lock.Unlock()
	if len(keys) > 0 {
		if err := s.putCrossSigningKeys(ctx, keys); err != nil {
			return err
		}
	}
	if len(sigs) == 0 {
		return nil
	}
	// One row per signed key and signer, the last written, in the order first written.
	var order []signatureRow
	latest := make(map[signatureRow]string, len(sigs))
	for _, sig := range sigs {
		if _, ok := latest[sig.row]; !ok {
			order = append(order, sig.row)
		}
		latest[sig.row] = sig.signature
	}
	args := make([]any, 0, len(order)*sqlPutSignaturesRowWidth)
	for _, r := range order {
		args = append(args, r.signedUser, r.key, r.signer, r.sKey, latest[r])
	}
	since := s.c.trustWrite()
	_, err := s.DB.Exec(ctx, sqlPutSignatures(len(order)), args...)
	done := err == nil && s.committed(ctx)
	users := make(map[id.UserID][]signatureKey)
	for _, r := range order {
		users[r.signedUser] = append(users[r.signedUser], r.signatureKey)
	}
	for user, keys := range users {
		s.c.trustWritten(user, since, done, func(t *cachedTrust) {
			for _, k := range keys {
				t.signed(k)
			}
		})
	}
	if err != nil {
		return fmt.Errorf("failed to store %d cross-signing signatures: %w", len(order), err)
	}
	return nil
}

// finish writes what the batch holds and closes it: a write through its context after this (by something the
// step left running) is written at once, as without a batch.
func (b *trustBatch) finish(ctx context.Context) error {
	b.lock.Lock()
	b.closed = true
	b.lock.Unlock()
	return b.flush(ctx)
}

// flushFor writes ctx's batch, if s has one there, before a read or write that depends on it.
func (s *cachedStore) flushFor(ctx context.Context) error {
	if b := trustBatchFrom(ctx); b != nil && b.holds(s) {
		return b.flush(ctx)
	}
	return nil
}

// putCrossSigningKeys writes keys in one statement (one by one when a user's usage comes twice, as the first key
// seen for it is the first of them) and applies them to the trust cache as PutCrossSigningKey does.
func (s *cachedStore) putCrossSigningKeys(ctx context.Context, keys []batchedKey) error {
	type slot struct {
		user  id.UserID
		usage id.CrossSigningUsage
	}
	seen := make(map[slot]bool, len(keys))
	for _, k := range keys {
		if seen[slot{k.user, k.usage}] {
			for _, k := range keys {
				if err := s.putCrossSigningKey(ctx, k.user, k.usage, k.key); err != nil {
					return err
				}
			}
			return nil
		}
		seen[slot{k.user, k.usage}] = true
	}
	args := make([]any, 0, len(keys)*sqlPutCrossSigningKeysRowWidth)
	users := make(map[id.UserID][]batchedKey)
	for _, k := range keys {
		args = append(args, k.user, k.usage, k.key, k.key)
		users[k.user] = append(users[k.user], k)
	}
	since := s.c.trustWrite()
	_, err := s.DB.Exec(ctx, sqlPutCrossSigningKeys(len(keys)), args...)
	done := err == nil && s.committed(ctx)
	for user, keys := range users { // one write per user: two would make each other's order unknown
		s.c.trustWritten(user, since, done, func(t *cachedTrust) {
			for _, k := range keys {
				t.keyWritten(k.usage, k.key)
			}
		})
	}
	if err != nil {
		return fmt.Errorf("failed to store %d cross-signing keys: %w", len(keys), err)
	}
	return nil
}

// signatureRow is a row's key in crypto_cross_signing_signatures.
type signatureRow struct {
	signedUser id.UserID
	signatureKey
}
