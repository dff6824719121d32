package fakehs

import (
	"net/http"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Typing is one typing notification a user sent.
type Typing struct {
	Room   id.RoomID
	User   id.UserID
	Typing bool
}

// Receipt is one read receipt a user sent.
type Receipt struct {
	Room   id.RoomID
	User   id.UserID
	Type   event.ReceiptType
	Event  id.EventID
	Thread string
}

// Ephemeral returns the typing notifications and read receipts sent so far, in order, and forgets them.
func (s *Server) Ephemeral() ([]Typing, []Receipt) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, r := s.typing, s.receipts
	s.typing, s.receipts = nil, nil
	return t, r
}

func (s *Server) putTyping(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		Typing bool `json:"typing"`
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
	if id.UserID(r.PathValue("userID")) != c.user {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are not in this room")
		return
	}
	s.typing = append(s.typing, Typing{Room: rm.id, User: c.user, Typing: req.Typing})
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) postReceipt(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		ThreadID string `json:"thread_id"`
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
	s.receipts = append(s.receipts, Receipt{Room: rm.id, User: c.user, Type: event.ReceiptType(r.PathValue("type")), Event: id.EventID(r.PathValue("eventID")), Thread: req.ThreadID})
	writeJSON(w, http.StatusOK, struct{}{})
}
