package crypto

import (
	"context"
	"fmt"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

// userTrust is the cross-signing state of one user as ferry's crypto store knows it. It is computed once per
// user per key share, so a share to N devices costs N signature lookups rather than N full trust resolutions.
type userTrust struct {
	hasIdentity      bool
	selfSigning      id.Ed25519 // valid self-signing key (signed by the master key), or ""
	masterKeyChanged bool
	verifiedByFerry  bool
}

// trustResolver resolves the trust of other users' devices relative to ferry's bot identity: "verified" always
// means "the bot's user-signing key signed their master key", whichever of ferry's devices asks.
type trustResolver struct {
	store crypto.Store
	// bot is the bot's user ID; botUSK its user-signing public key ("" when the bot has no identity yet).
	bot    id.UserID
	botUSK func(ctx context.Context) id.Ed25519
	users  map[id.UserID]*userTrust
	// prefetched: the cross-signing keys and signatures of these users were loaded in bulk (see prefetch), and
	// signed holds every signature made by the user itself or by the bot over their keys.
	prefetched map[id.UserID]map[id.CrossSigningUsage]id.CrossSigningKey
	signed     map[signature]bool
	// cache (may be nil) answers prefetch for the users it knows whole (storeCache.knownTrust).
	cache *storeCache
}

// signature is one stored cross-signing signature (signed key, and the key that signed it).
type signature struct {
	signedUser id.UserID
	signedKey  id.Ed25519
	signerUser id.UserID
	signerKey  id.Ed25519
}

// isSigned answers from the prefetched signatures for prefetched users, from the store otherwise.
func (r *trustResolver) isSigned(ctx context.Context, s signature) (bool, error) {
	if _, ok := r.prefetched[s.signedUser]; ok {
		return r.signed[s], nil
	}
	return r.store.IsKeySignedBy(ctx, s.signedUser, s.signedKey, s.signerUser, s.signerKey)
}

func newTrustResolver(store crypto.Store, bot id.UserID, botUSK func(ctx context.Context) id.Ed25519) *trustResolver {
	return &trustResolver{store: store, bot: bot, botUSK: botUSK, users: make(map[id.UserID]*userTrust)}
}

func (r *trustResolver) user(ctx context.Context, userID id.UserID) (*userTrust, error) {
	if ut, ok := r.users[userID]; ok {
		return ut, nil
	}
	ut := &userTrust{}
	keys, ok := r.prefetched[userID]
	if !ok {
		var err error
		if keys, err = r.store.GetCrossSigningKeys(ctx, userID); err != nil {
			return nil, fmt.Errorf("failed to read cross-signing keys of %s: %w", userID, err)
		}
	}
	master, ok := keys[id.XSUsageMaster]
	if ok && master.Key != "" {
		ut.hasIdentity = true
		ut.masterKeyChanged = master.First != "" && master.First != master.Key
		if ssk, ok := keys[id.XSUsageSelfSigning]; ok && ssk.Key != "" {
			signed, err := r.isSigned(ctx, signature{userID, ssk.Key, userID, master.Key})
			if err != nil {
				return nil, fmt.Errorf("failed to check the self-signing key of %s: %w", userID, err)
			} else if signed {
				ut.selfSigning = ssk.Key
			}
		}
		if usk := r.botUSK(ctx); usk != "" {
			var err error
			ut.verifiedByFerry, err = r.isSigned(ctx, signature{userID, master.Key, r.bot, usk})
			if err != nil {
				return nil, fmt.Errorf("failed to check whether ferry verified %s: %w", userID, err)
			}
		}
	}
	r.users[userID] = ut
	return ut, nil
}

// device resolves one device's trust.
func (r *trustResolver) device(ctx context.Context, dev *id.Device) (deviceTrust, error) {
	ut, err := r.user(ctx, dev.UserID)
	if err != nil {
		return deviceTrust{}, err
	}
	t := deviceTrust{
		Blacklisted:      dev.Trust == id.TrustStateBlacklisted,
		KeyMismatch:      dev.Trust == id.TrustStateDeviceKeyMismatch,
		HasIdentity:      ut.hasIdentity,
		MasterKeyChanged: ut.masterKeyChanged,
		VerifiedByFerry:  ut.verifiedByFerry,
	}
	if ut.selfSigning != "" {
		t.SignedByOwner, err = r.isSigned(ctx, signature{dev.UserID, dev.SigningKey, dev.UserID, ut.selfSigning})
		if err != nil {
			return deviceTrust{}, fmt.Errorf("failed to check the signature of %s's device %s: %w", dev.UserID, dev.DeviceID, err)
		}
	}
	return t, nil
}
