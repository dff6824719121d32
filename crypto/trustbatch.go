package crypto

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// A trustBatch collects the device lists, cross-signing keys and signatures that mautrix stores one statement and
// commit at a time, so that a step's are written together when it is over:
//   - while an account publishes its identity or signs its device (three signatures, then two), where nothing
//     reads them back in between and a step that stops half-way leaves no marker, so it is done again;
//   - while members' keys are fetched and a sender's trust resolved, where mautrix stores a member's device list,
//     two keys and four signatures and reads them back. A read through the batch's context that depends on what
//     waits (signatures, or the devices of a user with a list waiting) writes the batch first; a read of a user's
//     cross-signing keys is answered from the trust cache with the batch's keys applied, as the store would answer
//     after the writes (or writes the batch first when the cache does not hold the user).
//
// What a flush writes is written all or nothing: a fetch whose writes fail leaves no device list behind without
// its owner's keys and signatures (which would never be fetched again: the device is known), and the step fails,
// so that it is done again. On Postgres a flush is one statement.
//
// Only writes through a context from withTrustBatch are collected, and only the cachedStore that first added to
// a batch writes it.
type trustBatch struct {
	lock    sync.Mutex
	store   *cachedStore
	devices []batchedDevices
	keys    []batchedKey
	sigs    []batchedSignature
	closed  bool  // finished: later writes through the context are the callers' own
	err     error // the first failed flush's
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

// batchedDevices is one PutDevices.
type batchedDevices struct {
	user    id.UserID
	devices map[id.DeviceID]*id.Device
}

type trustBatchKey struct{}

// withTrustBatch returns a context whose trust writes through a cachedStore wait for the batch's flush (or
// finish).
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

// add runs keep under the batch's lock when s may add to it; false when the caller must write itself.
func (b *trustBatch) add(s *cachedStore, keep func()) bool {
	b.lock.Lock()
	defer b.lock.Unlock()
	if !b.joinLocked(s) {
		return false
	}
	keep()
	return true
}

// addSignature keeps a signature for flush; false when the caller must write it itself.
func (b *trustBatch) addSignature(s *cachedStore, sig batchedSignature) bool {
	return b.add(s, func() { b.sigs = append(b.sigs, sig) })
}

// addKey keeps a cross-signing key for flush; false when the caller must write it itself.
func (b *trustBatch) addKey(s *cachedStore, k batchedKey) bool {
	return b.add(s, func() { b.keys = append(b.keys, k) })
}

// addDevices keeps a copy of user's device list for flush; false when the caller must write it itself.
func (b *trustBatch) addDevices(s *cachedStore, user id.UserID, devices map[id.DeviceID]*id.Device) bool {
	return b.add(s, func() {
		cp := make(map[id.DeviceID]*id.Device, len(devices))
		for k, d := range devices {
			dev := *d
			cp[k] = &dev
		}
		b.devices = append(b.devices, batchedDevices{user, cp})
	})
}

// holds reports whether the batch has anything for s to write.
func (b *trustBatch) holds(s *cachedStore) bool {
	b.lock.Lock()
	defer b.lock.Unlock()
	return b.store == s && len(b.devices)+len(b.keys)+len(b.sigs) > 0
}

// holdsDevicesOf reports whether the batch holds a device list for s of one of users (of anyone, with none given).
func (b *trustBatch) holdsDevicesOf(s *cachedStore, users ...id.UserID) bool {
	b.lock.Lock()
	defer b.lock.Unlock()
	if b.store != s {
		return false
	}
	for _, d := range b.devices {
		if len(users) == 0 || slices.Contains(users, d.user) {
			return true
		}
	}
	return false
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

// flush writes what the batch holds (see trustBatch) and applies it to the trust cache as cachedStore's single
// writes do. ctx is the caller's. A failure is also kept for finish.
func (b *trustBatch) flush(ctx context.Context) error {
	_, err := b.flushWith(ctx)
	return err
}

// flushWith is flush with rows (of another table) written in the same statement or transaction, when the batch
// holds anything: carried tells whether it did (and so whether rows were written, when err is nil).
func (b *trustBatch) flushWith(ctx context.Context, rows ...*RowInsert) (carried bool, err error) {
	b.lock.Lock()
	s, devices, keys, sigs := b.store, b.devices, b.keys, b.sigs
	b.devices, b.keys, b.sigs = nil, nil, nil
	b.lock.Unlock()
	if len(devices)+len(keys)+len(sigs) == 0 {
		return false, nil
	}
	err = s.writeTrust(ctx, devices, keys, sigs, rows)
	if err != nil {
		b.lock.Lock()
		if b.err == nil {
			b.err = err
		}
		b.lock.Unlock()
	}
	return len(rows) > 0, err
}

// finish writes what the batch holds and closes it: a write through its context after this (by something the
// step left running) is written at once, as without a batch. It returns the error of any flush that failed, as
// what that flush held is not stored (a read that wrote the batch may have had its error swallowed by mautrix).
func (b *trustBatch) finish(ctx context.Context) error {
	_, err := b.finishWith(ctx)
	return err
}

// finishWith is finish with rows (of other tables: a step's markers, an account) written all or nothing with what
// the batch still holds, in its statement or transaction. carried tells whether they were part of that write; when
// the batch held nothing more, the caller writes them itself.
func (b *trustBatch) finishWith(ctx context.Context, rows ...*RowInsert) (carried bool, err error) {
	b.lock.Lock()
	b.closed = true
	b.lock.Unlock()
	carried, _ = b.flushWith(ctx, rows...)
	b.lock.Lock()
	defer b.lock.Unlock()
	return carried, b.err
}

// flushFor writes ctx's batch, if s has one there, before a read or write that depends on it.
func (s *cachedStore) flushFor(ctx context.Context) error {
	if b := trustBatchFrom(ctx); b != nil && b.holds(s) {
		return b.flush(ctx)
	}
	return nil
}

// flushForDevicesOf writes ctx's batch before a read or write about the devices of users (of anyone, with none
// given) when it holds a device list of one of them.
func (s *cachedStore) flushForDevicesOf(ctx context.Context, users ...id.UserID) error {
	if b := trustBatchFrom(ctx); b != nil && b.holdsDevicesOf(s, users...) {
		return b.flush(ctx)
	}
	return nil
}

// maxPutDevices bounds the devices of one user that writeTrust writes in its one statement (mautrix writes 100 a
// statement); a longer list goes through mautrix's transaction.
const maxPutDevices = 100

// userTrustWrite is what one write of a batch changed about one user, for the trust cache.
type userTrustWrite struct {
	devices bool         // a device list was written
	stored  []*id.Device // the rows it stored, when known (exact)
	exact   bool
	keys    []batchedKey
	sigs    []signatureKey
}

// writeTrust writes device lists, cross-signing keys and signatures all or nothing: on Postgres in one statement,
// otherwise (or when a user or a key's usage comes twice, or the lists are long) in one transaction of the
// store's own statements. One device list per user in the batch replaces it as mautrix's PutDevices does; of two
// signatures with the same signer and signed key the last wins; the first key seen for a usage stays. extra is
// written with them (rows of other tables: trustBatch.finishWith).
func (s *cachedStore) writeTrust(ctx context.Context, devices []batchedDevices, keys []batchedKey, sigs []batchedSignature, extra []*RowInsert) error {
	writes := make(map[id.UserID]*userTrustWrite)
	of := func(user id.UserID) *userTrustWrite {
		if writes[user] == nil {
			writes[user] = &userTrustWrite{}
		}
		return writes[user]
	}
	// One row per signed key and signer, the last written, in the order first written.
	var order []signatureRow
	latest := make(map[signatureRow]string, len(sigs))
	for _, sig := range sigs {
		if _, ok := latest[sig.row]; !ok {
			order = append(order, sig.row)
			of(sig.row.signedUser).sigs = append(of(sig.row.signedUser).sigs, sig.row.signatureKey)
		}
		latest[sig.row] = sig.signature
	}
	type slot struct {
		user  id.UserID
		usage id.CrossSigningUsage
	}
	seen := make(map[slot]bool, len(keys))
	keysTwice := false
	for _, k := range keys {
		keysTwice = keysTwice || seen[slot{k.user, k.usage}]
		seen[slot{k.user, k.usage}] = true
		of(k.user).keys = append(of(k.user).keys, k)
	}
	single := s.DB.Dialect == dbutil.Postgres && !keysTwice
	rows := 0
	for _, d := range devices {
		w := of(d.user)
		single = single && !w.devices && len(d.devices) <= maxPutDevices
		w.devices = true
		rows += len(d.devices)
	}
	single = single && rows <= 10*maxPutDevices

	since := s.c.trustWrite()
	var err error
	if single {
		var stored []*id.Device
		stored, err = s.writeTrustStatement(ctx, devices, keys, order, latest, extra)
		for _, d := range stored {
			w := writes[d.UserID]
			w.stored, w.exact = append(w.stored, d), true
		}
		for _, d := range devices {
			writes[d.user].exact = true // a list whose devices were all deleted stored no row
		}
	} else {
		// The store's statements: a transaction when there is more than one.
		var steps []func(context.Context) error
		for _, d := range devices {
			steps = append(steps, func(ctx context.Context) error { return s.SQLCryptoStore.PutDevices(ctx, d.user, d.devices) })
		}
		if keysTwice { // one by one, so that the first key seen for a usage stays first
			for _, k := range keys {
				steps = append(steps, func(ctx context.Context) error {
					return s.SQLCryptoStore.PutCrossSigningKey(ctx, k.user, k.usage, k.key)
				})
			}
		} else if len(keys) > 0 {
			args := make([]any, 0, len(keys)*4)
			for _, k := range keys {
				args = append(args, k.user, k.usage, k.key, k.key)
			}
			query := sqlPutCrossSigningKeysHead + placeholders(1, len(keys), 4) + sqlPutCrossSigningKeysTail
			steps = append(steps, func(ctx context.Context) error { _, err := s.DB.Exec(ctx, query, args...); return err })
		}
		if len(order) > 0 {
			args := make([]any, 0, len(order)*sqlPutSignaturesRowWidth)
			for _, r := range order {
				args = append(args, r.signedUser, r.key, r.signer, r.sKey, latest[r])
			}
			steps = append(steps, func(ctx context.Context) error {
				_, err := s.DB.Exec(ctx, sqlPutSignatures(len(order)), args...)
				return err
			})
		}
		for _, rows := range extra {
			steps = append(steps, func(ctx context.Context) error {
				_, err := s.DB.Exec(ctx, rows.statement(1), rows.Args...)
				return err
			})
		}
		if len(steps) == 1 && len(devices) == 0 {
			err = steps[0](ctx)
		} else {
			err = s.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
				for _, step := range steps {
					if err := step(ctx); err != nil {
						return err
					}
				}
				return nil
			})
		}
	}
	s.c.batchWritten(since, err == nil && s.committed(ctx), writes)
	if err != nil {
		return fmt.Errorf("failed to store %d device lists, %d cross-signing keys and %d signatures: %w",
			len(devices), len(keys), len(order), err)
	}
	return nil
}

// writeTrustStatement is writeTrust's one statement (Postgres): the users' tracking, their devices no longer
// listed marked deleted, the keys, the signatures and extra in data-modifying WITH clauses, the listed devices
// upserted by the statement itself, which returns them as stored.
func (s *cachedStore) writeTrustStatement(ctx context.Context, devices []batchedDevices, keys []batchedKey, order []signatureRow, latest map[signatureRow]string, extra []*RowInsert) ([]*id.Device, error) {
	var sb strings.Builder
	var args []any
	arg := func(v any) string {
		args = append(args, v)
		return "$" + strconv.Itoa(len(args))
	}
	sep := func(i int) {
		if i > 0 {
			sb.WriteByte(',')
		}
	}
	clause := func(name string) {
		if sb.Len() == 0 {
			sb.WriteString("WITH ")
		} else {
			sb.WriteString(", ")
		}
		sb.WriteString(name + " AS (")
	}
	if len(devices) > 0 {
		now := arg(time.Now().Unix())
		clause("tracked")
		sb.WriteString(`INSERT INTO crypto_tracked_user (user_id, devices_outdated, last_attempt, error_count) VALUES `)
		users := make([]string, len(devices))
		for i, d := range devices {
			sep(i)
			users[i] = arg(d.user)
			sb.WriteString("(" + users[i] + ",false," + now + ",0)")
		}
		sb.WriteString(` ON CONFLICT (user_id) DO UPDATE SET devices_outdated=excluded.devices_outdated,
			last_attempt=excluded.last_attempt, error_count=excluded.error_count)`)
		clause("gone")
		sb.WriteString(`UPDATE crypto_device SET deleted=true WHERE `)
		for i, d := range devices {
			if i > 0 {
				sb.WriteString(" OR ")
			}
			sb.WriteString("(user_id=" + users[i])
			if len(d.devices) > 0 {
				sb.WriteString(" AND device_id NOT IN (")
				j := 0
				for devID := range d.devices {
					sep(j)
					sb.WriteString(arg(devID))
					j++
				}
				sb.WriteByte(')')
			}
			sb.WriteByte(')')
		}
		sb.WriteByte(')')
	}
	if len(keys) > 0 {
		clause("keys")
		sb.WriteString(sqlPutCrossSigningKeysHead)
		for i, k := range keys {
			sep(i)
			sb.WriteString("(" + arg(k.user) + "," + arg(k.usage) + "," + arg(k.key) + "," + arg(k.key) + ")")
		}
		sb.WriteString(sqlPutCrossSigningKeysTail + ")")
	}
	if len(order) > 0 {
		clause("sigs")
		sb.WriteString(sqlPutSignaturesHead)
		for i, r := range order {
			sep(i)
			sb.WriteString("(" + arg(r.signedUser) + "," + arg(r.key) + "," + arg(r.signer) + "," + arg(r.sKey) + "," + arg(latest[r]) + ")")
		}
		sb.WriteString(sqlPutSignaturesTail + ")")
	}
	for i, rows := range extra {
		clause("extra" + strconv.Itoa(i))
		sb.WriteString(rows.statement(len(args)+1) + ")")
		args = append(args, rows.Args...)
	}
	n := 0
	for _, d := range devices {
		n += len(d.devices)
	}
	if n == 0 {
		sb.WriteString(" SELECT 1")
		_, err := s.DB.Exec(ctx, sb.String(), args...)
		return nil, err
	}
	sb.WriteString(` INSERT INTO crypto_device (user_id, device_id, identity_key, signing_key, trust, deleted, name) VALUES `)
	i := 0
	for _, d := range devices {
		for _, dev := range d.devices {
			sep(i)
			sb.WriteString("(" + arg(d.user) + "," + arg(dev.DeviceID) + "," + arg(dev.IdentityKey) + "," + arg(dev.SigningKey) +
				"," + arg(dev.Trust) + "," + arg(dev.Deleted) + "," + arg(dev.Name) + ")")
			i++
		}
	}
	sb.WriteString(` ON CONFLICT (user_id, device_id) DO UPDATE SET identity_key=excluded.identity_key,
		deleted=excluded.deleted, trust=excluded.trust, name=excluded.name
		RETURNING user_id, device_id, identity_key, signing_key, trust, deleted, name`)
	rows, err := s.DB.Query(ctx, sb.String(), args...)
	return dbutil.NewRowIterWithError(rows, func(row dbutil.Scannable) (*id.Device, error) {
		d := &id.Device{}
		return d, row.Scan(&d.UserID, &d.DeviceID, &d.IdentityKey, &d.SigningKey, &d.Trust, &d.Deleted, &d.Name)
	}, err).AsList()
}

// batchWritten applies a batch's write that began at since to the trust cache, with one check per user: a write
// that did not commit on its own, or that another write about the user overlapped, drops the user's entry.
func (c *storeCache) batchWritten(since uint64, done bool, writes map[id.UserID]*userTrustWrite) {
	c.lock.Lock()
	defer c.lock.Unlock()
	for user, w := range writes {
		stale := !done || c.allGen > since || c.trustGen[user] > since
		c.writtenLocked(user)
		if stale {
			delete(c.trust, user)
			continue
		}
		t := c.entryLocked(user)
		if w.devices {
			if w.exact {
				t.devicesStored(w.stored)
			} else {
				t.devByKey = nil
			}
		}
		for _, k := range w.keys {
			t.keyWritten(k.usage, k.key)
		}
		for _, k := range w.sigs {
			t.signed(k)
		}
	}
}

// signatureRow is a row's key in crypto_cross_signing_signatures.
type signatureRow struct {
	signedUser id.UserID
	signatureKey
}
