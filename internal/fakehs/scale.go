package fakehs

import (
	"encoding/json"
	"fmt"
	"strings"

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
		for _, dev := range acc.devices {
			for _, q := range dev.inbox {
				var evt map[string]any
				if json.Unmarshal(q.raw, &evt) != nil {
					continue
				}
				evt["to_user_id"], evt["to_device_id"] = u, dev.id
				toDevice = append(toDevice, evt)
			}
			dev.inbox = nil
			if dev.keys == nil {
				continue
			}
			if counts[u] == nil {
				counts[u], fallback[u] = map[id.DeviceID]map[string]int{}, map[id.DeviceID][]string{}
			}
			counts[u][dev.id] = otkCounts(dev)
			types := []string{}
			for _, k := range dev.fallback {
				alg, _, _ := strings.Cut(k.id, ":")
				types = append(types, alg)
			}
			fallback[u][dev.id] = types
			dev.otkDirty = false
		}
	}
	clear(s.pushUsers)
	changed := []id.UserID{}
	seen := map[id.UserID]bool{}
	for _, kc := range s.keyChanges {
		if kc.pos > s.asListsPos && !seen[kc.user] {
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
