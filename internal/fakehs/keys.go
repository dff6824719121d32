package fakehs

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// maxSyncToDevice bounds the to-device events of one /sync response (Synapse sends at most 100).
const maxSyncToDevice = 100

// deviceFor returns the caller's device, answering an error when the caller has none. s.mu must be held.
func (s *Server) deviceFor(w http.ResponseWriter, c caller) *device {
	if acc := s.accounts[c.user]; acc != nil && c.device != "" {
		if dev := acc.devices[c.device]; dev != nil {
			return dev
		}
	}
	writeError(w, http.StatusBadRequest, "M_UNKNOWN", "This request needs a device (log in, or create one with MSC4190)")
	return nil
}

// ReportKeyChange makes /sync report user's keys as changed although they did not change, as Dendrite 0.13.8
// does for a user's every key upload.
func (s *Server) ReportKeyChange(user id.UserID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keyChangedLocked(user)
}

// keyChangedLocked records that a user's device or cross-signing keys changed and wakes /sync waiters.
// s.mu must be held.
func (s *Server) keyChangedLocked(user id.UserID) {
	s.stream++
	s.keyChanges = append(s.keyChanges, keyChange{pos: s.stream, user: user})
	s.markPushLocked("")
	for dev := range s.waiting {
		s.wakeLocked(dev)
	}
}

func (s *Server) postKeysUpload(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		DeviceKeys      map[string]any             `json:"device_keys"`
		OneTimeKeys     map[string]json.RawMessage `json:"one_time_keys"`
		FallbackKeys    map[string]json.RawMessage `json:"fallback_keys"`
		FallbackKeysMSC map[string]json.RawMessage `json:"org.matrix.msc2732.fallback_keys"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	dev := s.deviceFor(w, c)
	if dev == nil {
		return
	}
	if req.DeviceKeys != nil {
		if req.DeviceKeys["user_id"] != string(c.user) || req.DeviceKeys["device_id"] != string(c.device) {
			writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "device_keys user_id/device_id do not match the caller")
			return
		}
		changed := dev.keys == nil || string(mustJSON(dev.keys["keys"])) != string(mustJSON(req.DeviceKeys["keys"]))
		dev.keys = req.DeviceKeys
		if changed {
			s.keyChangedLocked(c.user)
		}
	}
	have := make(map[string]bool, len(dev.otks))
	for _, k := range dev.otks {
		have[k.id] = true
	}
	ids := make([]string, 0, len(req.OneTimeKeys))
	for keyID := range req.OneTimeKeys {
		ids = append(ids, keyID)
	}
	sort.Strings(ids)
	for _, keyID := range ids {
		if !have[keyID] {
			dev.otks = append(dev.otks, keyEntry{id: keyID, raw: req.OneTimeKeys[keyID]})
		}
	}
	fallback := req.FallbackKeys
	if fallback == nil {
		fallback = req.FallbackKeysMSC
	}
	if fallback != nil {
		dev.fallback = dev.fallback[:0]
		for keyID, raw := range fallback {
			dev.fallback = append(dev.fallback, keyEntry{id: keyID, raw: raw})
		}
	}
	s.markPushLocked(c.user)
	writeJSON(w, http.StatusOK, map[string]any{"one_time_key_counts": otkCounts(dev)})
}

func otkCounts(dev *device) map[string]int {
	counts := map[string]int{"signed_curve25519": 0}
	for _, k := range dev.otks {
		alg, _, _ := strings.Cut(k.id, ":")
		counts[alg]++
	}
	return counts
}

func countOTKs(dev *device, alg string) int {
	n := 0
	for _, k := range dev.otks {
		if strings.HasPrefix(k.id, alg+":") {
			n++
		}
	}
	return n
}

func (s *Server) postKeysQuery(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		DeviceKeys map[id.UserID][]id.DeviceID `json:"device_keys"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	deviceKeys := map[id.UserID]map[id.DeviceID]map[string]any{}
	master, self, userSigning := map[id.UserID]any{}, map[id.UserID]any{}, map[id.UserID]any{}
	for user, wanted := range req.DeviceKeys {
		devs := map[id.DeviceID]map[string]any{}
		deviceKeys[user] = devs
		acc := s.accounts[user]
		if acc == nil {
			continue
		}
		for devID, dev := range acc.devices {
			if dev.keys == nil || len(wanted) > 0 && !contains(wanted, devID) {
				continue
			}
			devs[devID] = dev.keys
		}
		if acc.master != nil {
			master[user] = acc.master
		}
		if acc.selfSigning != nil {
			self[user] = acc.selfSigning
		}
		if acc.userSigning != nil && user == c.user {
			userSigning[user] = acc.userSigning
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"device_keys": deviceKeys, "master_keys": master, "self_signing_keys": self, "user_signing_keys": userSigning,
		"failures": map[string]any{},
	})
}

// postKeysClaim hands out one one-time key per requested device (removing it), or the device's fallback key.
func (s *Server) postKeysClaim(w http.ResponseWriter, r *http.Request, _ caller) {
	var req struct {
		OneTimeKeys map[id.UserID]map[id.DeviceID]string `json:"one_time_keys"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[id.UserID]map[id.DeviceID]map[string]json.RawMessage{}
	for user, devs := range req.OneTimeKeys {
		acc := s.accounts[user]
		for devID, alg := range devs {
			var dev *device
			if acc != nil {
				dev = acc.devices[devID]
			}
			if dev == nil {
				continue
			}
			key, ok := claimKey(dev, alg)
			if !ok {
				s.claimMisses++
				continue
			}
			if out[user] == nil {
				out[user] = map[id.DeviceID]map[string]json.RawMessage{}
			}
			out[user][devID] = map[string]json.RawMessage{key.id: key.raw}
			dev.otkDirty = true
			s.wakeLocked(dev)
			s.markPushLocked(user)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"one_time_keys": out, "failures": map[string]any{}})
}

func claimKey(dev *device, alg string) (keyEntry, bool) {
	for i, k := range dev.otks {
		if strings.HasPrefix(k.id, alg+":") {
			dev.otks = append(dev.otks[:i], dev.otks[i+1:]...)
			return k, true
		}
	}
	for _, k := range dev.fallback {
		if strings.HasPrefix(k.id, alg+":") {
			return k, true
		}
	}
	return keyEntry{}, false
}

func (s *Server) getKeysChanges(w http.ResponseWriter, r *http.Request, c caller) {
	from, to := parseSince(r.URL.Query().Get("from")), parseSince(r.URL.Query().Get("to"))
	s.mu.Lock()
	defer s.mu.Unlock()
	if to == 0 {
		to = s.stream
	}
	writeJSON(w, http.StatusOK, map[string]any{"changed": s.changedSinceLocked(c.user, from, to), "left": []id.UserID{}})
}

func (s *Server) postDeviceSigningUpload(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		Master      map[string]any  `json:"master_key"`
		SelfSigning map[string]any  `json:"self_signing_key"`
		UserSigning map[string]any  `json:"user_signing_key"`
		Auth        json.RawMessage `json:"auth"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// Homeservers with MSC4190 let the appservice upload its users' cross-signing keys without UIA.
	exempt := c.appservice && !s.opts.NoMSC4190
	if s.opts.CrossSigningUIA && !exempt && !s.checkPasswordUIA(w, req.Auth, c) {
		return
	}
	acc := s.accountLocked(c.user)
	if req.Master != nil {
		acc.master = req.Master
	}
	if req.SelfSigning != nil {
		acc.selfSigning = req.SelfSigning
	}
	if req.UserSigning != nil {
		acc.userSigning = req.UserSigning
	}
	s.keyChangedLocked(c.user)
	writeJSON(w, http.StatusOK, struct{}{})
}

// postSignaturesUpload merges uploaded signatures into the signed device or cross-signing key.
func (s *Server) postSignaturesUpload(w http.ResponseWriter, r *http.Request, _ caller) {
	var req map[id.UserID]map[string]map[string]any
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	failures := map[id.UserID]map[string]any{}
	for user, objs := range req {
		acc := s.accounts[user]
		for keyID, obj := range objs {
			var target map[string]any
			if acc != nil {
				if dev := acc.devices[id.DeviceID(keyID)]; dev != nil && dev.keys != nil {
					target = dev.keys
				} else {
					for _, ck := range []map[string]any{acc.master, acc.selfSigning, acc.userSigning} {
						if ck != nil && hasPublicKey(ck, keyID) {
							target = ck
						}
					}
				}
			}
			if target == nil {
				if failures[user] == nil {
					failures[user] = map[string]any{}
				}
				failures[user][keyID] = map[string]string{"errcode": "M_NOT_FOUND", "error": "Unknown key"}
				continue
			}
			mergeSignatures(target, obj)
		}
		if acc != nil {
			s.keyChangedLocked(user)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"failures": failures})
}

func hasPublicKey(ck map[string]any, pub string) bool {
	keys, _ := ck["keys"].(map[string]any)
	for _, v := range keys {
		if v == pub {
			return true
		}
	}
	return false
}

func mergeSignatures(target, signed map[string]any) {
	sigs, _ := signed["signatures"].(map[string]any)
	if len(sigs) == 0 {
		return
	}
	have, _ := target["signatures"].(map[string]any)
	if have == nil {
		have = map[string]any{}
		target["signatures"] = have
	}
	for signer, byKey := range sigs {
		m, _ := have[signer].(map[string]any)
		if m == nil {
			m = map[string]any{}
			have[signer] = m
		}
		if add, ok := byKey.(map[string]any); ok {
			for k, v := range add {
				m[k] = v
			}
		}
	}
}

// putSendToDevice queues to-device messages per target device ("*" means all of a user's devices).
func (s *Server) putSendToDevice(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	evtType := r.PathValue("type")
	dedupe := c.token + "\x00" + r.URL.EscapedPath()
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.txns[dedupe]; ok {
		writeJSON(w, http.StatusOK, struct{}{})
		return
	}
	s.txns[dedupe] = ""
	for user, devs := range req.Messages {
		acc := s.accounts[user]
		if acc == nil {
			continue
		}
		for devID, content := range devs {
			raw := mustJSON(map[string]any{"sender": c.user, "type": evtType, "content": content})
			targets := []*device{acc.devices[devID]}
			if devID == "*" {
				targets = targets[:0]
				for _, d := range acc.devices {
					targets = append(targets, d)
				}
			}
			for _, dev := range targets {
				if dev == nil {
					continue
				}
				s.stream++
				dev.inbox = append(dev.inbox, queuedToDevice{pos: s.stream, raw: raw})
				s.wakeLocked(dev)
				s.markPushLocked(user)
			}
		}
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// getSync answers a /sync limited to what E2EE needs: to-device events (acknowledged by the next since),
// one-time key counts, unused fallback key types and device-list changes of users sharing a room. It waits up
// to ?timeout= ms for something to report.
func (s *Server) getSync(w http.ResponseWriter, r *http.Request, c caller) {
	q := r.URL.Query()
	s.mu.Lock()
	s.syncCalls = append(s.syncCalls, SyncCall{User: c.user, Device: c.device, Appservice: c.appservice, Filter: q.Get("filter"), Since: q.Get("since")})
	s.mu.Unlock()
	since := parseSince(q.Get("since"))
	timeout, _ := strconv.Atoi(q.Get("timeout"))
	deadline := time.Now().Add(time.Duration(timeout) * time.Millisecond)
	if c.appservice && c.device == "" {
		s.roomSync(w, r, c, since, deadline)
		return
	}
	for {
		s.mu.Lock()
		dev := s.deviceFor(w, c)
		if dev == nil {
			s.mu.Unlock()
			return
		}
		// Everything up to since was delivered: drop it.
		keep := dev.inbox[:0]
		for _, e := range dev.inbox {
			if e.pos > since {
				keep = append(keep, e)
			}
		}
		clear(dev.inbox[len(keep):])
		dev.inbox = keep
		var changed []id.UserID
		if since > 0 {
			changed = s.changedSinceLocked(c.user, since, s.stream)
		}
		if len(dev.inbox) > 0 || len(changed) > 0 || dev.otkDirty || since == 0 || !time.Now().Before(deadline) {
			events := dev.inbox
			next := s.stream
			if len(events) > maxSyncToDevice {
				events = events[:maxSyncToDevice]
				next = events[len(events)-1].pos
			}
			raws := make([]json.RawMessage, len(events))
			for i, e := range events {
				raws[i] = e.raw
			}
			fallbackTypes := []string{}
			for _, k := range dev.fallback {
				alg, _, _ := strings.Cut(k.id, ":")
				fallbackTypes = append(fallbackTypes, alg)
			}
			if changed == nil {
				changed = []id.UserID{}
			}
			resp := map[string]any{
				"next_batch":                       fmt.Sprintf("s%d", next),
				"to_device":                        map[string]any{"events": raws},
				"device_one_time_keys_count":       otkCounts(dev),
				"device_unused_fallback_key_types": fallbackTypes,
				"device_lists":                     map[string]any{"changed": changed, "left": []id.UserID{}},
				"rooms":                            map[string]any{},
			}
			dev.otkDirty = false
			s.mu.Unlock()
			writeJSON(w, http.StatusOK, resp)
			return
		}
		notify := s.notifyLocked(dev)
		s.mu.Unlock()
		if !s.waitSync(w, r, notify, deadline) {
			return
		}
	}
}

// waitSync waits, for a /sync, until notify fires or the deadline passes: false when the request ended or the
// server is closing (then answered).
func (s *Server) waitSync(w http.ResponseWriter, r *http.Request, notify <-chan struct{}, deadline time.Time) bool {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-notify:
	case <-timer.C:
	case <-r.Context().Done():
		return false
	case <-s.closing:
		writeError(w, http.StatusServiceUnavailable, "M_UNKNOWN", "Server shutting down")
		return false
	}
	return true
}

// changedSinceLocked lists users whose keys changed in (from, to] and who share a room with user (or are
// user). s.mu must be held.
func (s *Server) changedSinceLocked(user id.UserID, from, to int64) []id.UserID {
	seen := map[id.UserID]bool{}
	var out []id.UserID
	for _, kc := range s.keyChangesAfterLocked(from) {
		if kc.pos > to {
			break
		}
		if seen[kc.user] {
			continue
		}
		seen[kc.user] = true
		if kc.user == user || s.shareRoomLocked(user, kc.user) {
			out = append(out, kc.user)
		}
	}
	return out
}

// shareRoomLocked tells whether a and b are both joined to or invited into one room, looking through the rooms
// of whichever has fewer (the bot of a bridge is in every linked room; a homeserver answers this from an index,
// not by a walk through all of them). s.mu must be held.
func (s *Server) shareRoomLocked(a, b id.UserID) bool {
	mine, theirs := s.memberRooms[a], s.memberRooms[b]
	if len(theirs) < len(mine) {
		mine, theirs = theirs, mine
	}
	for rid := range mine {
		if _, ok := theirs[rid]; ok {
			return true
		}
	}
	return false
}

// keyChangesAfterLocked returns the key changes after stream position pos (the list is in position order, so
// each /sync and push reads only what is new). s.mu must be held.
func (s *Server) keyChangesAfterLocked(pos int64) []keyChange {
	i := sort.Search(len(s.keyChanges), func(i int) bool { return s.keyChanges[i].pos > pos })
	return s.keyChanges[i:]
}

// inRoom tells whether a membership makes its user share the room's device-list updates (joined or invited).
func inRoom(m event.Membership) bool {
	return m == event.MembershipJoin || m == event.MembershipInvite
}

func parseSince(s string) int64 {
	n, _ := strconv.ParseInt(strings.TrimPrefix(s, "s"), 10, 64)
	return n
}

func contains[T comparable](list []T, v T) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}
