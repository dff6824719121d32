package crypto

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"
)

// catchUpChunk bounds the users of one /keys/query in the start-up catch-up of device lists, catchUpParallel
// the requests in flight at once.
const (
	catchUpChunk    = 1000
	catchUpParallel = 4
)

// storedIdentity is what the crypto store holds about one user's cross-signing: their keys by usage and the
// signatures on their keys made by their own keys (signed key → signer keys).
type storedIdentity struct {
	keys map[id.CrossSigningUsage]id.Ed25519
	sigs map[string]map[string]bool
}

// keysToRefetch asks the homeserver for users' keys (in requests of catchUpChunk users) and returns those whose
// answer holds anything the store does not: a device added, removed or with other keys, a cross-signing key
// added or changed, or a signature by the user's own keys that is not stored. Only those need mautrix's
// FetchKeys, which verifies and stores what changed; for every other user it would verify and write again
// exactly the rows the store holds (a transaction per user: minutes for tens of thousands of members). A user the
// answer leaves out, or one the server could not answer for, is returned too. before holds the stored devices.
func (m *Machine) keysToRefetch(ctx context.Context, users []id.UserID, before map[id.UserID]map[id.DeviceID]*id.Device) ([]id.UserID, error) {
	var (
		lock     sync.Mutex
		out      []id.UserID
		firstErr error
		wg       sync.WaitGroup
	)
	// A few requests at once, so the homeserver's work on one overlaps ferry's reading of another.
	sem := make(chan struct{}, catchUpParallel)
	for start := 0; start < len(users); start += catchUpChunk {
		chunk := users[start:min(start+catchUpChunk, len(users))]
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			diff, err := m.chunkToRefetch(ctx, chunk, before)
			lock.Lock()
			defer lock.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			out = append(out, diff...)
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	return out, nil
}

// chunkToRefetch is keysToRefetch for one request's users.
func (m *Machine) chunkToRefetch(ctx context.Context, chunk []id.UserID, before map[id.UserID]map[id.DeviceID]*id.Device) ([]id.UserID, error) {
	req := &mautrix.ReqQueryKeys{DeviceKeys: make(mautrix.DeviceKeysRequest, len(chunk))}
	for _, u := range chunk {
		req.DeviceKeys[u] = mautrix.DeviceIDList{}
	}
	resp, err := m.bot.client.QueryKeys(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("failed to query keys: %w", err)
	}
	stored, err := loadIdentities(ctx, m.db, chunk)
	if err != nil {
		return nil, err
	}
	var out []id.UserID
	for _, u := range chunk {
		if len(resp.Failures) > 0 && resp.Failures[u.Homeserver()] != nil || keysDiffer(u, before[u], stored[u], resp) {
			out = append(out, u)
		}
	}
	return out, nil
}

// keysDiffer tells whether a /keys/query answer about user holds anything beyond what the store holds.
func keysDiffer(user id.UserID, devices map[id.DeviceID]*id.Device, stored storedIdentity, resp *mautrix.RespQueryKeys) bool {
	answered, ok := resp.DeviceKeys[user]
	if !ok || len(answered) != len(devices) {
		return true
	}
	signerKey := func(keyID id.KeyID) string {
		_, name := keyID.Parse()
		if dk, ok := answered[id.DeviceID(name)]; ok {
			return dk.Keys[id.NewDeviceKeyID(id.KeyAlgorithmEd25519, id.DeviceID(name))]
		}
		return name
	}
	hasSigs := func(signed string, sigs map[id.KeyID]string) bool {
		for keyID := range sigs {
			signer := signerKey(keyID)
			if signer != signed && !stored.sigs[signed][signer] {
				return false
			}
		}
		return true
	}
	for devID, dk := range answered {
		dev := devices[devID]
		signing := dk.Keys[id.NewDeviceKeyID(id.KeyAlgorithmEd25519, devID)]
		if dev == nil || dk.UserID != user || dk.DeviceID != devID ||
			string(dev.IdentityKey) != dk.Keys[id.NewDeviceKeyID(id.KeyAlgorithmCurve25519, devID)] || string(dev.SigningKey) != signing ||
			!hasSigs(signing, dk.Signatures[user]) {
			return true
		}
	}
	for usage, keys := range map[id.CrossSigningUsage]map[id.UserID]mautrix.CrossSigningKeys{
		id.XSUsageMaster: resp.MasterKeys, id.XSUsageSelfSigning: resp.SelfSigningKeys,
	} {
		csk, ok := keys[user]
		if !ok {
			if stored.keys[usage] != "" {
				return true
			}
			continue
		}
		key := csk.FirstKey()
		if len(csk.Keys) != 1 || stored.keys[usage] != key || !hasSigs(string(key), csk.Signatures[user]) {
			return true
		}
	}
	return false
}

// loadIdentities reads the cross-signing keys of users and the signatures on their keys by their own keys.
func loadIdentities(ctx context.Context, db *dbutil.Database, users []id.UserID) (map[id.UserID]storedIdentity, error) {
	out := make(map[id.UserID]storedIdentity, len(users))
	get := func(u id.UserID) storedIdentity {
		st, ok := out[u]
		if !ok {
			st = storedIdentity{keys: map[id.CrossSigningUsage]id.Ed25519{}, sigs: map[string]map[string]bool{}}
			out[u] = st
		}
		return st
	}
	// "" is a user no row names: only the users' own signatures are read.
	err := readTrust(ctx, db, "", users, func(u id.UserID, usage id.CrossSigningUsage, key, _ id.Ed25519) {
		get(u).keys[usage] = key
	}, func(s signature) {
		st := get(s.signedUser)
		if st.sigs[string(s.signedKey)] == nil {
			st.sigs[string(s.signedKey)] = map[string]bool{}
		}
		st.sigs[string(s.signedKey)][strings.TrimPrefix(string(s.signerKey), "ed25519:")] = true
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
