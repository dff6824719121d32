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
	signedUser id.UserID
	signedKey  id.Ed25519
	signerUser id.UserID
	signerKey  id.Ed25519
	signature  string
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
	last := make(map[signatureRow]int, len(sigs))
	for i, sig := range sigs {
		last[signatureRow{sig.signedUser, signatureKey{sig.signedKey, sig.signerUser, sig.signerKey}}] = i
	}
	var args []any
	users := map[id.UserID][]batchedSignature{}
	for i, sig := range sigs {
		if last[signatureRow{sig.signedUser, signatureKey{sig.signedKey, sig.signerUser, sig.signerKey}}] != i {
			continue
		}
		args = append(args, sig.signedUser, sig.signedKey, sig.signerUser, sig.signerKey, sig.signature)
		users[sig.signedUser] = append(users[sig.signedUser], sig)
	}
	rows := len(args) / sqlPutSignaturesRowWidth
	since := s.c.trustWrite()
	_, err := s.DB.Exec(ctx, sqlPutSignatures(rows), args...)
	done := err == nil && s.committed(ctx)
	for user, userSigs := range users {
		s.c.trustWritten(user, since, done, func(t *cachedTrust) {
			if t.signedBy == nil {
				t.signedBy = make(map[signatureKey]bool)
			}
			for _, sig := range userSigs {
				t.signedBy[signatureKey{sig.signedKey, sig.signerUser, sig.signerKey}] = true
			}
		})
	}
	if err != nil {
		return fmt.Errorf("failed to store %d cross-signing signatures: %w", rows, err)
	}
	return nil
}

// signatureRow is a row's key in crypto_cross_signing_signatures.
type signatureRow struct {
	signedUser id.UserID
	signatureKey
}
