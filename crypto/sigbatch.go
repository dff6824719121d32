package crypto

import (
	"context"
	"fmt"
	"sync"

	"maunium.net/go/mautrix/id"
)

// A signatureBatch collects the cross-signing signatures that mautrix stores one statement at a time while an
// account publishes its identity or signs its device (three, then two, each its own commit), so that they are
// written in one statement when the step is over. Only writes through a context from withSignatureBatch are
// collected; nothing reads them in between (mautrix stores them after their upload and reads none back), and a
// step that stops half-way leaves no marker, so it is done again, signatures included.
type signatureBatch struct {
	lock  sync.Mutex
	store *cachedStore
	sigs  []batchedSignature
}

type batchedSignature struct {
	row       signatureRow
	signature string
}

type signatureBatchKey struct{}

// withSignatureBatch returns a context whose signature writes through a cachedStore wait for batch.flush.
func withSignatureBatch(ctx context.Context) (context.Context, *signatureBatch) {
	b := &signatureBatch{}
	return context.WithValue(ctx, signatureBatchKey{}, b), b
}

// add keeps a signature for flush when ctx carries a batch that s may join (a batch is written through the one
// store that first added to it); false when the caller must write it itself.
func (b *signatureBatch) add(s *cachedStore, sig batchedSignature) bool {
	b.lock.Lock()
	defer b.lock.Unlock()
	if b.store == nil {
		b.store = s
	} else if b.store != s {
		return false
	}
	b.sigs = append(b.sigs, sig)
	return true
}

func signatureBatchFrom(ctx context.Context) *signatureBatch {
	b, _ := ctx.Value(signatureBatchKey{}).(*signatureBatch)
	return b
}

// flush writes the collected signatures in one statement, as the same writes one by one would leave them (the
// last of two signatures with the same signer and signed key wins), and applies them to the trust cache as
// cachedStore.PutSignature does. ctx is the caller's own, without the batch.
func (b *signatureBatch) flush(ctx context.Context) error {
	b.lock.Lock()
	s, sigs := b.store, b.sigs
	b.sigs = nil
	b.lock.Unlock()
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

// signatureRow is a row's key in crypto_cross_signing_signatures.
type signatureRow struct {
	signedUser id.UserID
	signatureKey
}
