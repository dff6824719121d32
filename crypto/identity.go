package crypto

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/id"
)

// secretPublishedMaster is the master public key ferry last published for the account, so a restart after a
// failed upload publishes again instead of signing with keys the server does not know.
const secretPublishedMaster id.Secret = "im.ferry.cross_signing_published"

// secretPublishedWithoutUIA marks an account whose identity the homeserver accepted without a password.
const secretPublishedWithoutUIA id.Secret = "im.ferry.cross_signing_without_uia"

// crossSign gives d's user a cross-signing identity (master, self-signing and user-signing keys, generated once
// and kept encrypted in the crypto store) and signs d's device with it. With ssss (the bot), the private keys
// are also put in the account's secret storage, and the storage's recovery key is kept for the admin command.
// serverMaster, when known, is the master key the homeserver currently publishes for the user: a mismatch means
// the identity must be published again.
func (m *Machine) crossSign(ctx context.Context, d *device, sec *secretCache, ssss bool, serverMaster id.Ed25519) error {
	// A new account's keys, stored with it (holdWithAccount), or the stored ones, or new ones.
	keys, err := d.newKeys, error(nil)
	d.newKeys = nil
	if keys != nil {
		// The machine is new with the account and has no cross-signing keys of its own yet: these are used as
		// made, without the import's decoding of what was just generated.
		d.mach.CrossSigningKeys = keys
	} else {
		if keys, err = loadSeeds(ctx, sec); err != nil {
			return err
		} else if keys == nil {
			if keys, err = d.mach.GenerateCrossSigningKeys(); err != nil {
				return fmt.Errorf("failed to generate cross-signing keys: %w", err)
			}
			// Stored before publishing, so a retry publishes the same identity.
			if err = storeSeeds(ctx, sec, keys); err != nil {
				return err
			}
		}
		if err = d.mach.ImportCrossSigningKeys(keys.Seeds()); err != nil {
			return fmt.Errorf("failed to load cross-signing keys: %w", err)
		}
	}
	master := keys.MasterKey.PublicKey()
	published, err := sec.GetSecret(ctx, secretPublishedMaster)
	if err != nil {
		return fmt.Errorf("failed to read the publication marker: %w", err)
	}
	// The steps' signatures and the markers of the steps done are stored in one statement (one transaction on
	// SQLite), whether or not a later step failed: a marker is only ever written with or after what it stands for.
	bctx, batch := withTrustBatch(ctx)
	var markers []id.Secret
	var values []string
	settle := func(err error) error {
		var rows []*RowInsert
		if len(markers) > 0 {
			if markerRows, rowsErr := sec.rows(markers, values); rowsErr != nil {
				// The signatures are still stored; without markers the steps are done again.
				markers = nil
				err = errors.Join(err, fmt.Errorf("failed to store the identity's markers: %w", rowsErr))
			} else {
				rows = append(rows, markerRows)
			}
		}
		// A new account as its upload left it, held back for this statement (olmStore.holdUploaded).
		uploaded := d.olm.uploaded.Swap(nil)
		if uploaded != nil {
			rows = append(rows, uploaded)
		}
		carried, flushErr := batch.finishWith(ctx, rows...)
		if uploaded != nil && (!carried || flushErr != nil) {
			d.olm.uploaded.CompareAndSwap(nil, uploaded) // loadGhost writes it (writeUploaded)
		}
		if flushErr != nil {
			return errors.Join(err, flushErr)
		}
		if carried {
			sec.stored(markers, values)
		} else if len(markers) > 0 {
			if putErr := sec.PutSecrets(ctx, markers, values); putErr != nil {
				return errors.Join(err, fmt.Errorf("failed to store the identity's markers: %w", putErr))
			}
		}
		return err
	}
	if published != master.String() || (serverMaster != "" && serverMaster != master) {
		withoutUIA, err := m.publishIdentity(bctx, d, sec, keys)
		if err != nil {
			return settle(err)
		}
		// A device signed by the identity this replaces is signed again (before the new marker is written).
		if err = sec.DeleteSecret(ctx, secretSignedDevice); err != nil {
			return settle(fmt.Errorf("failed to forget the device signature marker: %w", err))
		}
		markers, values = append(markers, secretPublishedMaster), append(values, master.String())
		if withoutUIA {
			markers, values = append(markers, secretPublishedWithoutUIA), append(values, "yes")
		}
	}
	if ssss {
		if err = m.ensureSecretStorage(ctx, d, sec, keys); err != nil {
			return settle(err)
		}
	}
	signed, err := sec.GetSecret(ctx, secretSignedDevice)
	if err != nil {
		return settle(fmt.Errorf("failed to read the device signature marker: %w", err))
	} else if signed == string(d.client.DeviceID) {
		return settle(nil)
	}
	if err = signDevice(bctx, d); err != nil {
		return settle(err)
	}
	markers, values = append(markers, secretSignedDevice), append(values, string(d.client.DeviceID))
	if err = settle(nil); err != nil {
		return err
	}
	if !m.asMode.Load() {
		// Devices made through the appservice (MSC4190: Synapse) are on a homeserver that stores signatures
		// before it answers their upload; Dendrite, the login path, applies them later.
		m.waitSignatureServed(ctx, d)
	}
	return nil
}

// signDevice signs d's device with the self-signing key and the master key with the device, uploads both in one
// request and stores both (in ctx's trust batch, if any). The device's keys are the ones its account uploaded
// (mautrix's device upload: its Curve25519 and Ed25519 keys, Megolm and Olm), so they are built here instead of
// read back from the homeserver: a signature is made only over keys ferry holds.
func signDevice(ctx context.Context, d *device) error {
	keys, account := d.mach.CrossSigningKeys, d.mach.GetAccount()
	if keys == nil || keys.SelfSigningKey == nil || keys.MasterKey == nil {
		return fmt.Errorf("failed to sign the device: %w", crypto.ErrSelfSigningKeyNotCached)
	} else if account == nil {
		return fmt.Errorf("failed to sign the device: %w", crypto.ErrOlmAccountNotLoaded)
	}
	user, dev := d.client.UserID, d.client.DeviceID
	deviceKeys := mautrix.ReqKeysSignatures{
		UserID:     user,
		DeviceID:   dev,
		Algorithms: []id.Algorithm{id.AlgorithmMegolmV1, id.AlgorithmOlmV1},
		Keys: map[id.KeyID]string{
			id.NewKeyID(id.KeyAlgorithmCurve25519, dev.String()): account.IdentityKey().String(),
			id.NewKeyID(id.KeyAlgorithmEd25519, dev.String()):    account.SigningKey().String(),
		},
	}
	selfSigning, master := keys.SelfSigningKey.PublicKey(), keys.MasterKey.PublicKey()
	deviceSig, err := keys.SelfSigningKey.SignJSON(deviceKeys)
	if err != nil {
		return fmt.Errorf("failed to sign the device with the self-signing key: %w", err)
	}
	deviceKeys.Signatures = signatures.NewSingleSignature(user, id.KeyAlgorithmEd25519, selfSigning.String(), deviceSig)
	masterKey := mautrix.ReqKeysSignatures{
		UserID: user,
		Usage:  []id.CrossSigningUsage{id.XSUsageMaster},
		Keys:   map[id.KeyID]string{id.NewKeyID(id.KeyAlgorithmEd25519, master.String()): master.String()},
	}
	masterSig, err := account.SignJSON(masterKey)
	if err != nil {
		return fmt.Errorf("failed to sign the master key with the device: %w", err)
	}
	masterKey.Signatures = signatures.NewSingleSignature(user, id.KeyAlgorithmEd25519, dev.String(), masterSig)
	resp, err := d.client.UploadSignatures(ctx, &mautrix.ReqUploadSignatures{
		user: {dev.String(): deviceKeys, master.String(): masterKey},
	})
	if err != nil {
		return fmt.Errorf("failed to upload the device's cross-signing signatures: %w", err)
	} else if len(resp.Failures) > 0 {
		return fmt.Errorf("failed to upload the device's cross-signing signatures: %w: %+v", crypto.ErrSignatureUploadFail, resp.Failures)
	}
	for _, sig := range []madeSignature{{account.SigningKey(), selfSigning, deviceSig}, {master, account.SigningKey(), masterSig}} {
		if err = d.mach.CryptoStore.PutSignature(ctx, user, sig.signed, user, sig.signer, sig.signature); err != nil {
			return fmt.Errorf("failed to store the device's cross-signing signature: %w", err)
		}
	}
	// (Written with ctx's trust batch; a device whose batch fails is not used.)
	d.olm.ownSig.Store(&ownSignature{device: account.SigningKey(), selfSigning: selfSigning, signature: deviceSig})
	return nil
}

// madeSignature is a signature ferry made of one of its user's keys (signed) by another (signer), for the store.
type madeSignature struct {
	signed, signer id.Ed25519
	signature      string
}

// signatureServeWait bounds how long a freshly signed device waits for the homeserver to serve its signature.
const signatureServeWait = 10 * time.Second

// waitSignatureServed waits until the homeserver's key query returns the device with its cross-signing
// signature. Dendrite applies signature uploads asynchronously: a client that queries the device in between
// caches it as unsigned and, when it excludes insecure devices, refuses the device's first messages.
func (m *Machine) waitSignatureServed(ctx context.Context, d *device) {
	user, dev := d.client.UserID, d.client.DeviceID
	deadline := time.Now().Add(signatureServeWait)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		resp, err := d.client.QueryKeys(ctx, &mautrix.ReqQueryKeys{DeviceKeys: map[id.UserID]mautrix.DeviceIDList{user: {dev}}})
		if err == nil {
			// The device's own key signs it once; the self-signing key adds the second signature.
			if keys, ok := resp.DeviceKeys[user][dev]; ok && len(keys.Signatures[user]) >= 2 {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	m.log.Warn().Stringer("user_id", user).Stringer("device_id", dev).Msg("The homeserver does not serve the new device's cross-signing signature yet")
}

// publishIdentity uploads the public cross-signing keys. Homeservers that implement MSC4190 or spec v1.17 let
// appservice users do this without UIA; Dendrite 0.13.8 asks for the account password, which ferry knows only
// for accounts it registered through the shared-secret API.
func (m *Machine) publishIdentity(ctx context.Context, d *device, sec *secretCache, keys *crypto.CrossSigningKeysCache) (withoutUIA bool, err error) {
	password, err := sec.GetSecret(ctx, secretPassword)
	if err != nil {
		return false, fmt.Errorf("failed to read the account password: %w", err)
	}
	if password != "" {
		err = publishWithPassword(ctx, d, keys, password)
	} else {
		err = d.mach.PublishCrossSigningKeys(ctx, keys, passwordUIA(d.userID, password))
	}
	if err == nil && password == "" {
		// Published without any password: the homeserver lets a user set up cross-signing the first time
		// without UIA (Synapse), or lets the appservice skip it (MSC4190). Remembered (the caller stores the
		// marker), so a restart knows it.
		m.publishedWithoutUIA.Store(true)
		return true, nil
	}
	var httpErr mautrix.HTTPError
	if err != nil && password == "" && errors.As(err, &httpErr) && httpErr.IsStatus(http.StatusUnauthorized) {
		// The server wants the password, and the account has none ferry knows: set one, then try again.
		if password, err = m.provisionPassword(ctx, d.userID, sec); err != nil {
			return false, err
		}
		err = publishWithPassword(ctx, d, keys, password)
	}
	if err != nil {
		return false, fmt.Errorf("failed to publish cross-signing keys: %w", err)
	}
	return false, nil
}

// publishWithPassword publishes keys as mautrix's PublishCrossSigningKeys does (the master key signed by the
// device, the other two by the master key; the three signatures stored once the homeserver took them), but sends
// the password with the first upload: a homeserver that asks for it (Dendrite 0.13.8) takes the keys in one
// request instead of answering the first with its challenge. One that wants the password only within the
// session of a challenge answers with one, and the upload is sent again in it.
func publishWithPassword(ctx context.Context, d *device, keys *crypto.CrossSigningKeysCache, password string) error {
	account := d.mach.GetAccount()
	if account == nil {
		return crypto.ErrOlmAccountNotLoaded
	}
	user, master := d.userID, keys.MasterKey.PublicKey()
	signed := func(usage id.CrossSigningUsage, key id.Ed25519) mautrix.CrossSigningKeys {
		return mautrix.CrossSigningKeys{UserID: user, Usage: []id.CrossSigningUsage{usage}, Keys: map[id.KeyID]id.Ed25519{id.NewKeyID(id.KeyAlgorithmEd25519, key.String()): key}}
	}
	req := &mautrix.UploadCrossSigningKeysReq[any]{
		Master:      signed(id.XSUsageMaster, master),
		SelfSigning: signed(id.XSUsageSelfSigning, keys.SelfSigningKey.PublicKey()),
		UserSigning: signed(id.XSUsageUserSigning, keys.UserSigningKey.PublicKey()),
		Auth:        &uiaPassword{Type: mautrix.AuthTypePassword, Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(user)}, Password: password},
	}
	masterSig, err := account.SignJSON(req.Master)
	if err != nil {
		return fmt.Errorf("failed to sign the master key: %w", err)
	}
	req.Master.Signatures = signatures.NewSingleSignature(user, id.KeyAlgorithmEd25519, d.client.DeviceID.String(), masterSig)
	stores := []madeSignature{{master, account.SigningKey(), masterSig}}
	for _, k := range []*mautrix.CrossSigningKeys{&req.SelfSigning, &req.UserSigning} {
		sig, err := keys.MasterKey.SignJSON(*k)
		if err != nil {
			return fmt.Errorf("failed to sign the %s key: %w", k.Usage[0], err)
		}
		k.Signatures = signatures.NewSingleSignature(user, id.KeyAlgorithmEd25519, master.String(), sig)
		stores = append(stores, madeSignature{k.FirstKey(), master, sig})
	}
	if err = d.client.UploadCrossSigningKeys(ctx, req, passwordUIA(user, password)); err != nil {
		return err
	}
	for _, sig := range stores {
		if err = d.mach.CryptoStore.PutSignature(ctx, user, sig.signed, user, sig.signer, sig.signature); err != nil {
			return fmt.Errorf("failed to store a signature of the new identity: %w", err)
		}
	}
	d.mach.CrossSigningKeys = keys
	return nil
}

// ensureSecretStorage puts the cross-signing private keys into the account's secret storage (SSSS) under a
// fresh default key, once, and keeps that key's recovery key (encrypted) for the recovery-key command.
func (m *Machine) ensureSecretStorage(ctx context.Context, d *device, sec *secretCache, keys *crypto.CrossSigningKeysCache) error {
	existing, err := sec.GetSecret(ctx, secretRecoveryKey)
	if err != nil {
		return fmt.Errorf("failed to read the recovery key: %w", err)
	} else if existing != "" {
		return nil
	}
	key, err := d.mach.SSSS.GenerateAndUploadKey(ctx, "")
	if err != nil {
		return fmt.Errorf("failed to create the secret storage key: %w", err)
	}
	if err = d.mach.UploadCrossSigningKeysToSSSS(ctx, key, keys); err != nil {
		return fmt.Errorf("failed to put the cross-signing keys in secret storage: %w", err)
	}
	if err = d.mach.SSSS.SetDefaultKeyID(ctx, key.ID); err != nil {
		return fmt.Errorf("failed to make the secret storage key the default: %w", err)
	}
	if err = sec.PutSecret(ctx, secretRecoveryKey, key.RecoveryKey()); err != nil {
		return fmt.Errorf("failed to store the recovery key: %w", err)
	}
	return nil
}

var seedNames = [3]id.Secret{id.SecretXSMaster, id.SecretXSSelfSigning, id.SecretXSUserSigning}

// loadSeeds reads the account's cross-signing private keys; nil when it has none.
func loadSeeds(ctx context.Context, sec *secretCache) (*crypto.CrossSigningKeysCache, error) {
	var raw [3][]byte
	for i, name := range seedNames {
		v, err := sec.GetSecret(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("failed to read cross-signing key %s: %w", name, err)
		} else if v == "" {
			return nil, nil
		}
		if raw[i], err = base64.RawStdEncoding.DecodeString(v); err != nil {
			return nil, fmt.Errorf("stored cross-signing key %s is corrupt: %w", name, err)
		}
	}
	seeds := crypto.CrossSigningSeeds{MasterKey: raw[0], SelfSigningKey: raw[1], UserSigningKey: raw[2]}
	keys, err := seeds.Decode()
	if err != nil {
		return nil, fmt.Errorf("stored cross-signing keys are corrupt: %w", err)
	}
	return &keys, nil
}

// storeSeeds stores the account's cross-signing private keys, all three in one statement.
func storeSeeds(ctx context.Context, sec *secretCache, keys *crypto.CrossSigningKeysCache) error {
	if err := sec.PutSecrets(ctx, seedNames[:], seedValues(keys)); err != nil {
		return fmt.Errorf("failed to store the cross-signing keys: %w", err)
	}
	return nil
}

// seedValues are the secrets that store keys' private keys, in seedNames' order.
func seedValues(keys *crypto.CrossSigningKeysCache) []string {
	seeds := keys.Seeds()
	values := make([]string, 0, len(seedNames))
	for _, seed := range [3][]byte{seeds.MasterKey, seeds.SelfSigningKey, seeds.UserSigningKey} {
		values = append(values, base64.RawStdEncoding.EncodeToString(seed))
	}
	return values
}

// heldValues are secrets a new ghost got before its account exists, for holdWithAccount.
type heldValues struct {
	names  []id.Secret
	values []string
}

func (h *heldValues) add(name id.Secret, value string) {
	h.names, h.values = append(h.names, name), append(h.values, value)
}

// holdWithAccount hands secrets to the first write of d's new account (olmStore.PutAccount, before any upload),
// which stores them in its own statement: held (a password and an access token on the login path) and the
// account's new cross-signing keys, generated here unless it has some stored. One write each less for a new ghost,
// and all still stored before anything is published. Once that write committed, crossSign takes the keys from
// d.newKeys; a write without the own device leaves them to olmStore.writeHeld.
func holdWithAccount(ctx context.Context, d *device, sec *secretCache, held heldValues) error {
	stored, err := sec.GetSecret(ctx, seedNames[0])
	if err != nil {
		return err
	}
	var keys *crypto.CrossSigningKeysCache
	if stored == "" {
		if keys, err = d.mach.GenerateCrossSigningKeys(); err != nil {
			return fmt.Errorf("failed to generate cross-signing keys: %w", err)
		}
		for i, value := range seedValues(keys) {
			held.add(seedNames[i], value)
		}
	}
	if len(held.names) == 0 {
		return nil
	}
	rows, err := sec.rows(held.names, held.values)
	if err != nil {
		return err
	}
	d.olm.withAccount.Store(&heldSecrets{rows: rows, stored: func() {
		sec.stored(held.names, held.values)
		if keys != nil {
			d.newKeys = keys
		}
	}})
	return nil
}

// RecoveryKey returns the recovery key of the bot's secret storage, which holds the bot's cross-signing keys;
// "" while the bot's identity is not set up. Only the recovery-key admin command should call it.
func (m *Machine) RecoveryKey(ctx context.Context) (string, error) {
	if m.bot == nil {
		return "", nil
	}
	return m.bot.store.GetSecret(ctx, secretRecoveryKey)
}
