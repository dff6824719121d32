package fakehs

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// loggedEvent is a room event at its position of the server's stream.
type loggedEvent struct {
	pos  int64
	room id.RoomID
	raw  json.RawMessage
}

// logRoomEventLocked adds a room event to the log the device-less /sync reads. s.mu must be held.
func (s *Server) logRoomEventLocked(room id.RoomID, raw json.RawMessage) {
	s.stream++
	s.roomLog = append(s.roomLog, loggedEvent{pos: s.stream, room: room, raw: raw})
	if s.roomNotify != nil {
		close(s.roomNotify)
		s.roomNotify = nil
	}
}

// roomSync answers a /sync of the appservice acting as a user without a device, as Synapse does: the timelines
// of the rooms the user is joined to (kept with Options.KeepTimeline), and nothing of a device: no to-device
// messages, device lists or key counts. The first /sync (no since) starts at the current position.
func (s *Server) roomSync(w http.ResponseWriter, r *http.Request, c caller, since int64, deadline time.Time) {
	if s.opts.RefuseRoomSync {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Appservices may not /sync as their users here")
		return
	}
	for {
		s.mu.Lock()
		join := make(map[id.RoomID][]json.RawMessage)
		next := s.stream
		if since > 0 {
			for _, e := range s.roomLog {
				if e.pos > since && s.rooms[e.room] != nil && s.rooms[e.room].members[c.user] == event.MembershipJoin {
					join[e.room] = append(join[e.room], e.raw)
				}
			}
		}
		if len(join) > 0 || since == 0 || !time.Now().Before(deadline) {
			s.mu.Unlock()
			rooms := make(map[id.RoomID]any, len(join))
			for room, evts := range join {
				rooms[room] = map[string]any{"timeline": map[string]any{"events": evts, "limited": false}}
			}
			writeJSON(w, http.StatusOK, map[string]any{"next_batch": fmt.Sprintf("s%d", next), "rooms": map[string]any{"join": rooms}})
			return
		}
		if s.roomNotify == nil {
			s.roomNotify = make(chan struct{})
		}
		notify := s.roomNotify
		s.mu.Unlock()
		if !s.waitSync(w, r, notify, deadline) {
			return
		}
	}
}
