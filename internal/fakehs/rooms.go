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

type room struct {
	id       id.RoomID
	state    map[stateKey]json.RawMessage // full events
	members  map[id.UserID]event.Membership
	joinRule event.JoinRule
	events   int64
	timeline []json.RawMessage // with Options.KeepTimeline
}

type stateKey struct{ typ, key string }

// RoomOptions describe a room made with CreateRoom.
type RoomOptions struct {
	Name string
	// Encryption, when set, becomes the room's m.room.encryption state.
	Encryption *event.EncryptionEventContent
	// Public makes the join rule public (anyone may join); rooms are invite-only otherwise.
	Public bool
	// Members join the room right away, besides the creator.
	Members []id.UserID
	// Invite lists users invited right away.
	Invite []id.UserID
	// Predecessor, when set, names the room this one replaces (a room upgrade) in its create event.
	Predecessor id.RoomID
}

// CreateRoom makes a room as if it existed before the test: its state (create, power levels with the creator
// at 100, join rules, name, encryption, memberships) is recorded without being pushed to the appservice.
// Users are created if they do not exist.
func (s *Server) CreateRoom(creator id.UserID, opts RoomOptions) id.RoomID {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.newRoomLocked(creator)
	s.initRoomLocked(rm, creator, opts.Name, opts.Encryption, opts.Public, false)
	if opts.Predecessor != "" {
		s.stateEventLocked(rm, creator, event.StateCreate.Type, "", mustJSON(map[string]any{
			"creator": creator, "room_version": "10", "predecessor": map[string]any{"room_id": opts.Predecessor},
		}), false)
	}
	for _, u := range opts.Members {
		s.accountLocked(u)
		s.setMembershipLocked(rm, u, u, event.MembershipJoin, false)
	}
	for _, u := range opts.Invite {
		s.accountLocked(u)
		s.setMembershipLocked(rm, creator, u, event.MembershipInvite, false)
	}
	return rm.id
}

// Join makes user a member of room without pushing the event to the appservice.
func (s *Server) Join(room id.RoomID, user id.UserID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[room]
	if rm == nil {
		return fmt.Errorf("unknown room %s", room)
	}
	s.accountLocked(user)
	s.setMembershipLocked(rm, user, user, event.MembershipJoin, false)
	return nil
}

// SetState records a state event without pushing it to the appservice.
func (s *Server) SetState(room id.RoomID, sender id.UserID, evtType, key string, content any) error {
	raw, err := json.Marshal(content)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[room]
	if rm == nil {
		return fmt.Errorf("unknown room %s", room)
	}
	s.stateEventLocked(rm, sender, evtType, key, raw, false)
	return nil
}

// Membership returns a user's membership in a room ("" when none).
func (s *Server) Membership(room id.RoomID, user id.UserID) event.Membership {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rm := s.rooms[room]; rm != nil {
		return rm.members[user]
	}
	return ""
}

// Members lists the users with a given membership in a room, sorted.
func (s *Server) Members(room id.RoomID, membership event.Membership) []id.UserID {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []id.UserID
	if rm := s.rooms[room]; rm != nil {
		for u, m := range rm.members {
			if m == membership {
				out = append(out, u)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// StateEvent returns the full current state event of a room, or nil.
func (s *Server) StateEvent(room id.RoomID, evtType, key string) json.RawMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rm := s.rooms[room]; rm != nil {
		return rm.state[stateKey{evtType, key}]
	}
	return nil
}

// Timeline returns the events created in a room through the client API (Options.KeepTimeline only).
func (s *Server) Timeline(room id.RoomID) []json.RawMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rm := s.rooms[room]; rm != nil {
		return append([]json.RawMessage(nil), rm.timeline...)
	}
	return nil
}

func (s *Server) newRoomLocked(creator id.UserID) *room {
	s.seq++
	roomID := id.RoomID(fmt.Sprintf("!%s:%s", EventID(string(creator), fmt.Sprint(s.seq))[1:19], s.opts.Domain))
	rm := &room{id: roomID, state: make(map[stateKey]json.RawMessage), members: make(map[id.UserID]event.Membership), joinRule: event.JoinRuleInvite}
	s.rooms[roomID] = rm
	return rm
}

func (s *Server) initRoomLocked(rm *room, creator id.UserID, name string, enc *event.EncryptionEventContent, public, echo bool) {
	s.accountLocked(creator)
	s.stateEventLocked(rm, creator, event.StateCreate.Type, "", mustJSON(map[string]any{"creator": creator, "room_version": "10"}), echo)
	s.setMembershipLocked(rm, creator, creator, event.MembershipJoin, echo)
	s.stateEventLocked(rm, creator, event.StatePowerLevels.Type, "", mustJSON(map[string]any{
		"users": map[id.UserID]int{creator: 100}, "users_default": 0, "events_default": 0, "state_default": 50,
		"ban": 50, "kick": 50, "redact": 50, "invite": 0,
	}), echo)
	rule := event.JoinRuleInvite
	if public {
		rule = event.JoinRulePublic
	}
	s.stateEventLocked(rm, creator, event.StateJoinRules.Type, "", mustJSON(map[string]any{"join_rule": rule}), echo)
	s.stateEventLocked(rm, creator, event.StateHistoryVisibility.Type, "", mustJSON(map[string]any{"history_visibility": "shared"}), echo)
	if name != "" {
		s.stateEventLocked(rm, creator, event.StateRoomName.Type, "", mustJSON(map[string]any{"name": name}), echo)
	}
	if enc != nil {
		s.stateEventLocked(rm, creator, event.StateEncryption.Type, "", mustJSON(enc), echo)
	}
}

// stateEventLocked records a state event, applying memberships and join rules. s.mu must be held.
func (s *Server) stateEventLocked(rm *room, sender id.UserID, evtType, key string, content json.RawMessage, echo bool) (id.EventID, json.RawMessage) {
	rm.events++
	evtID := EventID(string(rm.id), string(sender), evtType, key, fmt.Sprint(rm.events))
	raw := mustJSON(&wireEvent{ID: evtID, RoomID: rm.id, Sender: sender, Type: evtType, StateKey: &key, TS: s.now().UnixMilli(), Content: content, Unsigned: map[string]any{}})
	rm.state[stateKey{evtType, key}] = raw
	switch evtType {
	case event.StateMember.Type:
		var m struct {
			Membership event.Membership `json:"membership"`
		}
		_ = json.Unmarshal(content, &m)
		user := id.UserID(key)
		if m.Membership == event.MembershipLeave {
			delete(rm.members, user)
		} else {
			rm.members[user] = m.Membership
		}
		if inRoom(m.Membership) {
			if s.memberRooms[user] == nil {
				s.memberRooms[user] = make(map[id.RoomID]*room)
			}
			s.memberRooms[user][rm.id] = rm
		} else {
			delete(s.memberRooms[user], rm.id)
		}
	case event.StateJoinRules.Type:
		var jr struct {
			JoinRule event.JoinRule `json:"join_rule"`
		}
		_ = json.Unmarshal(content, &jr)
		rm.joinRule = jr.JoinRule
	}
	s.recordLocked(rm, evtID, sender, &key, raw, echo)
	return evtID, raw
}

func (s *Server) setMembershipLocked(rm *room, sender, target id.UserID, membership event.Membership, echo bool) id.EventID {
	content := map[string]any{"membership": membership}
	if acc := s.accounts[target]; acc != nil && membership == event.MembershipJoin {
		if acc.displayname != "" {
			content["displayname"] = acc.displayname
		}
		if acc.avatarURL != "" {
			content["avatar_url"] = acc.avatarURL
		}
	}
	evtID, _ := s.stateEventLocked(rm, sender, event.StateMember.Type, string(target), mustJSON(content), echo)
	return evtID
}

// recordLocked keeps the timeline (if asked) and pushes the event to the appservice when it is interested.
func (s *Server) recordLocked(rm *room, evtID id.EventID, sender id.UserID, stateKey *string, raw json.RawMessage, echo bool) {
	if s.opts.KeepTimeline {
		rm.timeline = append(rm.timeline, raw)
		s.logRoomEventLocked(rm.id, raw)
	}
	if !echo || s.opts.NoEcho || s.opts.ASToken == "" {
		return
	}
	interested := s.isASUser(sender) || stateKey != nil && s.isASUser(id.UserID(*stateKey))
	if !interested {
		for u, m := range rm.members {
			if (m == event.MembershipJoin || m == event.MembershipInvite) && s.isASUser(u) {
				interested = true
				break
			}
		}
	}
	if interested {
		s.as.enqueue(evtID, raw)
	}
}

// joinedRoomFor is roomFor for a request only a joined member may make: nil (and the answer written) when the
// room is unknown or the caller is not joined. The caller holds s.mu.
func (s *Server) joinedRoomFor(w http.ResponseWriter, r *http.Request, c caller) *room {
	rm := s.roomFor(w, r)
	if rm == nil {
		return nil
	}
	if rm.members[c.user] != event.MembershipJoin {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are not in this room")
		return nil
	}
	return rm
}

func (s *Server) roomFor(w http.ResponseWriter, r *http.Request) *room {
	rm := s.rooms[id.RoomID(r.PathValue("roomID"))]
	if rm == nil {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Unknown room")
	}
	return rm
}

func (s *Server) postCreateRoom(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		Name         string        `json:"name"`
		Preset       string        `json:"preset"`
		Invite       []id.UserID   `json:"invite"`
		InitialState []event.Event `json:"initial_state"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	rm := s.newRoomLocked(c.user)
	s.initRoomLocked(rm, c.user, req.Name, nil, req.Preset == "public_chat", true)
	for _, st := range req.InitialState {
		key := ""
		if st.StateKey != nil {
			key = *st.StateKey
		}
		content := st.Content.VeryRaw
		if content == nil {
			content = mustJSON(st.Content.Raw)
		}
		s.stateEventLocked(rm, c.user, st.Type.Type, key, content, true)
	}
	for _, u := range req.Invite {
		s.accountLocked(u)
		s.setMembershipLocked(rm, c.user, u, event.MembershipInvite, true)
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"room_id": rm.id})
}

// postJoin lets a user join a room they are invited to, already in, or that is public.
func (s *Server) postJoin(w http.ResponseWriter, r *http.Request, c caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	switch rm.members[c.user] {
	case event.MembershipJoin:
	case event.MembershipInvite:
		s.setMembershipLocked(rm, c.user, c.user, event.MembershipJoin, true)
	case event.MembershipBan:
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are banned from this room")
		return
	default:
		if rm.joinRule != event.JoinRulePublic {
			writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are not invited to this room")
			return
		}
		s.setMembershipLocked(rm, c.user, c.user, event.MembershipJoin, true)
	}
	writeJSON(w, http.StatusOK, map[string]any{"room_id": rm.id})
}

func (s *Server) postInvite(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		UserID id.UserID `json:"user_id"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.joinedRoomFor(w, r, c)
	if rm == nil {
		return
	}
	switch rm.members[req.UserID] {
	case event.MembershipJoin:
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "User is already in the room")
		return
	case event.MembershipBan:
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "User is banned")
		return
	}
	s.accountLocked(req.UserID)
	s.setMembershipLocked(rm, c.user, req.UserID, event.MembershipInvite, true)
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) postLeave(w http.ResponseWriter, r *http.Request, c caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	if m := rm.members[c.user]; m == event.MembershipJoin || m == event.MembershipInvite {
		s.setMembershipLocked(rm, c.user, c.user, event.MembershipLeave, true)
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) getMembers(w http.ResponseWriter, r *http.Request, _ caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	chunk := []json.RawMessage{}
	for k, raw := range rm.state {
		if k.typ == event.StateMember.Type {
			chunk = append(chunk, raw)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"chunk": chunk})
}

func (s *Server) getJoinedMembers(w http.ResponseWriter, r *http.Request, _ caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	joined := map[id.UserID]map[string]string{}
	for u, m := range rm.members {
		if m == event.MembershipJoin {
			joined[u] = map[string]string{}
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"joined": joined})
}

func (s *Server) getState(w http.ResponseWriter, r *http.Request, _ caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	all := make([]json.RawMessage, 0, len(rm.state))
	for _, raw := range rm.state {
		all = append(all, raw)
	}
	writeJSON(w, http.StatusOK, all)
}

func (s *Server) getStateEvent(w http.ResponseWriter, r *http.Request, _ caller) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	raw := rm.state[stateKey{r.PathValue("type"), r.PathValue("stateKey")}]
	if raw == nil {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Event not found")
		return
	}
	var evt struct {
		Content json.RawMessage `json:"content"`
	}
	_ = json.Unmarshal(raw, &evt)
	writeRaw(w, http.StatusOK, evt.Content)
}

// putStateEvent sets state. Membership of oneself follows the join rules; other state needs membership.
func (s *Server) putStateEvent(w http.ResponseWriter, r *http.Request, c caller) {
	var content json.RawMessage
	if !readJSON(w, r, &content) {
		return
	}
	evtType, key := r.PathValue("type"), r.PathValue("stateKey")
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	current := rm.members[c.user]
	if evtType == event.StateMember.Type && id.UserID(key) == c.user {
		var m struct {
			Membership event.Membership `json:"membership"`
		}
		_ = json.Unmarshal(content, &m)
		if m.Membership == event.MembershipJoin && current != event.MembershipJoin && current != event.MembershipInvite && rm.joinRule != event.JoinRulePublic {
			writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are not invited to this room")
			return
		}
	} else if current != event.MembershipJoin {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are not in this room")
		return
	}
	evtID, _ := s.stateEventLocked(rm, c.user, evtType, key, content, true)
	writeJSON(w, http.StatusOK, map[string]any{"event_id": evtID})
}

func (s *Server) putSend(w http.ResponseWriter, r *http.Request, c caller) {
	s.send(w, r, c, r.PathValue("type"), "")
}

func (s *Server) putRedact(w http.ResponseWriter, r *http.Request, c caller) {
	s.send(w, r, c, event.EventRedaction.Type, id.EventID(r.PathValue("eventID")))
}

// send creates a message event. Retries with the same access token and path return the first event's ID.
func (s *Server) send(w http.ResponseWriter, r *http.Request, c caller, evtType string, redacts id.EventID) {
	received := time.Now()
	var content json.RawMessage
	if !readJSON(w, r, &content) {
		return
	}
	txnID := r.PathValue("txnID")
	dedupe := c.token + "\x00" + r.URL.EscapedPath()
	s.mu.Lock()
	if evtID, ok := s.txns[dedupe]; ok {
		s.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{"event_id": evtID})
		return
	}
	rm := s.roomFor(w, r)
	if rm == nil {
		s.mu.Unlock()
		return
	}
	if rm.members[c.user] != event.MembershipJoin {
		s.mu.Unlock()
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are not in this room")
		return
	}
	rm.events++
	// Deterministic: the same sender, room, type and transaction ID give the same event ID (a different
	// device reusing a transaction ID gets a distinct one).
	evtID := EventID(string(rm.id), string(c.user), evtType, txnID)
	if _, taken := s.eventIDs[evtID]; taken {
		evtID = EventID(string(evtID), fmt.Sprint(rm.events))
	}
	s.eventIDs[evtID] = struct{}{}
	raw := mustJSON(&wireEvent{ID: evtID, RoomID: rm.id, Sender: c.user, Type: evtType, Redacts: redacts, TS: s.now().UnixMilli(), Content: content, Unsigned: map[string]any{"transaction_id": txnID}})
	s.txns[dedupe] = evtID
	s.recordLocked(rm, evtID, c.user, nil, raw, true)
	s.mu.Unlock()
	if s.OnSend != nil {
		s.OnSend(SentEvent{RoomID: rm.id, Sender: c.user, Type: evtType, TxnID: txnID, EventID: evtID, Content: content, Redacts: redacts, Received: received})
	}
	writeJSON(w, http.StatusOK, map[string]any{"event_id": evtID})
}

func mustJSON(v any) json.RawMessage {
	data, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return data
}

// getMessages answers /messages backwards from the newest event (dir=b only; from is the token of an earlier
// answer), from the timeline kept with Options.KeepTimeline. Without it the chunk is empty.
func (s *Server) getMessages(w http.ResponseWriter, r *http.Request, _ caller) {
	q := r.URL.Query()
	if d := q.Get("dir"); d != "b" {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "only dir=b is supported")
		return
	}
	limit := 10
	if l := q.Get("limit"); l != "" {
		if n, err := strconv.Atoi(l); err == nil && n > 0 {
			limit = n
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.roomFor(w, r)
	if rm == nil {
		return
	}
	end := len(rm.timeline)
	if from := q.Get("from"); from != "" {
		n, err := strconv.Atoi(strings.TrimPrefix(from, "t"))
		if err != nil || n < 0 || n > len(rm.timeline) {
			writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "bad from token")
			return
		}
		end = n
	}
	start := max(end-limit, 0)
	chunk := make([]json.RawMessage, 0, end-start)
	for i := end - 1; i >= start; i-- {
		chunk = append(chunk, rm.timeline[i])
	}
	resp := map[string]any{"chunk": chunk, "start": fmt.Sprintf("t%d", end)}
	if start > 0 {
		if s.opts.MessagesSkipAtPageEnd && end-start == limit {
			start-- // the next page starts one event further back
		}
		resp["end"] = fmt.Sprintf("t%d", start)
	}
	writeJSON(w, http.StatusOK, resp)
}
