package fakehs

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"

	"maunium.net/go/mautrix/crypto/canonicaljson"
	"maunium.net/go/mautrix/id"
)

// What this file adds serves benchmarks at scale: a per-request latency (Options.Latency), appservice
// transactions that carry encryption data by themselves (Options.PushEncryption), and accounts seeded in bulk
// (CloneAccounts).

// markPushLocked records, with Options.PushEncryption, that something the appservice's devices must learn
// changed (a to-device message queued for user, a one-time key of user's claimed or uploaded, or anyone's keys
// changed when user is empty), and makes the next transaction carry it. s.mu must be held.
func (s *Server) markPushLocked(user id.UserID) {
	if !s.opts.PushEncryption || s.opts.ASToken == "" {
		return
	}
	if user != "" {
		if !s.isASUser(user) {
			return
		}
		if s.pushUsers == nil {
			s.pushUsers = make(map[id.UserID]struct{})
		}
		s.pushUsers[user] = struct{}{}
	}
	a := &s.as
	a.mu.Lock()
	a.pending = true
	a.signalLocked()
	a.mu.Unlock()
}

// takePushed returns the encryption fields of the next transaction, as Synapse names them (MSC2409 to-device
// events with to_user_id and to_device_id, MSC3202 device lists and key counts): what changed for the
// appservice's users since the previous call.
func (s *Server) takePushed() map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	toDevice := []map[string]any{}
	counts := map[id.UserID]map[id.DeviceID]map[string]int{}
	fallback := map[id.UserID]map[id.DeviceID][]string{}
	for u := range s.pushUsers {
		acc := s.accounts[u]
		if acc == nil {
			continue
		}
		toDevice = takeDevicePushes(u, acc, toDevice, counts, fallback)
	}
	clear(s.pushUsers)
	changed := []id.UserID{}
	seen := map[id.UserID]bool{}
	for _, kc := range s.keyChangesAfterLocked(s.asListsPos) {
		if !seen[kc.user] {
			seen[kc.user] = true
			changed = append(changed, kc.user)
		}
	}
	s.asListsPos = s.stream
	return map[string]any{
		"de.sorunome.msc2409.to_device":                       toDevice,
		"org.matrix.msc3202.device_lists":                     map[string]any{"changed": changed, "left": []id.UserID{}},
		"org.matrix.msc3202.device_one_time_keys_count":       counts,
		"org.matrix.msc3202.device_unused_fallback_key_types": fallback,
	}
}

// CloneAccounts creates an account for each of users with a copy of template's device deviceID (its device keys
// as uploaded, no one-time keys) and, when tokens is not nil, tokens[i] as an access token of users[i]'s copy.
// Benchmarks use it to seed many accounts at once next to database rows copied the same way; the copied device
// keys still name the template, so key queries for the copies are not meaningful.
func (s *Server) CloneAccounts(template id.UserID, deviceID id.DeviceID, users []id.UserID, tokens []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	tmpl := s.accounts[template]
	if tmpl == nil || tmpl.devices[deviceID] == nil {
		return fmt.Errorf("fakehs: no device %s of %s to clone", deviceID, template)
	}
	src := tmpl.devices[deviceID]
	for i, u := range users {
		acc := s.accountLocked(u)
		acc.displayname, acc.password = tmpl.displayname, tmpl.password
		acc.master, acc.selfSigning, acc.userSigning = tmpl.master, tmpl.selfSigning, tmpl.userSigning
		dev := newDevice(deviceID)
		dev.displayName, dev.keys, dev.fallback = src.displayName, src.keys, src.fallback
		acc.devices[deviceID] = dev
		if tokens != nil {
			s.tokens[tokens[i]] = session{user: u, device: deviceID}
		}
	}
	return nil
}

// SetPushEncryption turns Options.PushEncryption on or off while the server runs (a benchmark sets up its data
// with one appservice and then measures another that expects pushes).
func (s *Server) SetPushEncryption(on bool) {
	s.mu.Lock()
	s.opts.PushEncryption = on
	s.mu.Unlock()
}

// SeededUser is the public keys and signatures of a user SeedUsers created, for a benchmark that writes them
// into a client's store as that client would have after querying them.
type SeededUser struct {
	User                            id.UserID
	Device                          id.DeviceID
	IdentityKey                     id.Curve25519
	SigningKey, Master, SelfSigning id.Ed25519
	// The device's signature of its own keys, the master key's of the self-signing key, the self-signing key's
	// of the device.
	DeviceSelfSig, SelfSigningSig, DeviceSig string
}

// SeedUsers creates accounts for users, each with one device whose keys are its own (ed25519 and curve25519,
// self-signed) and a cross-signing identity (master, self-signing and user-signing keys, the device signed by
// the self-signing key), as a client would have uploaded them: key queries for them verify. They have no
// one-time keys and cannot log in. Benchmarks use it for members that never act but whose device lists are read.
func (s *Server) SeedUsers(users []id.UserID) ([]SeededUser, error) {
	type seeded struct {
		dev                        id.DeviceID
		keys, master, self, usersg map[string]any
	}
	out := make([]seeded, len(users))
	seed := make([]SeededUser, len(users))
	for i, u := range users {
		devID := id.DeviceID(fmt.Sprintf("SEED%06d", i))
		b64 := base64.RawStdEncoding.EncodeToString
		devPub, devPriv, _ := ed25519.GenerateKey(rand.Reader)
		var curve [32]byte
		_, _ = rand.Read(curve[:])
		curvePub, err := ecdh.X25519().NewPrivateKey(curve[:])
		if err != nil {
			return nil, err
		}
		keys := map[string]any{
			"user_id": u, "device_id": devID, "algorithms": []string{"m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"},
			"keys": map[string]any{"curve25519:" + string(devID): b64(curvePub.PublicKey().Bytes()), "ed25519:" + string(devID): b64(devPub)},
		}
		if err = signJSON(keys, u, "ed25519:"+string(devID), devPriv); err != nil {
			return nil, err
		}
		crossKey := func(usage string) (map[string]any, ed25519.PrivateKey, string) {
			pub, priv, _ := ed25519.GenerateKey(rand.Reader)
			return map[string]any{"user_id": u, "usage": []string{usage}, "keys": map[string]any{"ed25519:" + b64(pub): b64(pub)}}, priv, "ed25519:" + b64(pub)
		}
		selfSig := keys["signatures"].(map[string]any)[string(u)].(map[string]any)["ed25519:"+string(devID)].(string)
		master, masterPriv, masterID := crossKey("master")
		self, selfPriv, selfID := crossKey("self_signing")
		usersg, _, _ := crossKey("user_signing")
		if err = signJSON(self, u, masterID, masterPriv); err != nil {
			return nil, err
		}
		if err = signJSON(usersg, u, masterID, masterPriv); err != nil {
			return nil, err
		}
		if err = signJSON(keys, u, selfID, selfPriv); err != nil {
			return nil, err
		}
		seed[i] = SeededUser{User: u, Device: devID, IdentityKey: id.Curve25519(b64(curvePub.PublicKey().Bytes())), SigningKey: id.Ed25519(b64(devPub)),
			Master: id.Ed25519(strings.TrimPrefix(masterID, "ed25519:")), SelfSigning: id.Ed25519(strings.TrimPrefix(selfID, "ed25519:")),
			DeviceSelfSig:  selfSig,
			SelfSigningSig: self["signatures"].(map[string]any)[string(u)].(map[string]any)[masterID].(string),
			DeviceSig:      keys["signatures"].(map[string]any)[string(u)].(map[string]any)[selfID].(string)}
		// Round-tripped through JSON, so they look like what an upload leaves.
		for _, m := range []*map[string]any{&keys, &master, &self, &usersg} {
			var v map[string]any
			if err = json.Unmarshal(mustJSON(*m), &v); err != nil {
				return nil, err
			}
			*m = v
		}
		out[i] = seeded{dev: devID, keys: keys, master: master, self: self, usersg: usersg}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, u := range users {
		acc := s.accountLocked(u)
		dev := newDevice(out[i].dev)
		dev.keys = out[i].keys
		acc.devices[out[i].dev] = dev
		acc.master, acc.selfSigning, acc.userSigning = out[i].master, out[i].self, out[i].usersg
	}
	return seed, nil
}

// signJSON adds signer's signature of obj (its canonical JSON without signatures and unsigned) under user and
// keyID.
func signJSON(obj map[string]any, user id.UserID, keyID string, priv ed25519.PrivateKey) error {
	sigs, _ := obj["signatures"].(map[string]any)
	unsigned, hasUnsigned := obj["unsigned"]
	delete(obj, "signatures")
	delete(obj, "unsigned")
	raw, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	sig := base64.RawStdEncoding.EncodeToString(ed25519.Sign(priv, canonicaljson.CanonicalJSONAssumeValid(raw)))
	if sigs == nil {
		sigs = map[string]any{}
	}
	mine, _ := sigs[string(user)].(map[string]any)
	if mine == nil {
		mine = map[string]any{}
	}
	mine[keyID] = sig
	sigs[string(user)] = mine
	obj["signatures"] = sigs
	if hasUnsigned {
		obj["unsigned"] = unsigned
	}
	return nil
}
