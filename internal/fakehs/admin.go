package fakehs

import (
	"crypto/hmac"
	"crypto/sha1" //nolint:gosec // the shared-secret registration API is defined with HMAC-SHA1
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strings"

	"maunium.net/go/mautrix/id"
)

// Dendrite-like administration: shared-secret registration (Synapse's API, which Dendrite implements), Dendrite's
// password reset, and password UIA before cross-signing uploads (Options.CrossSigningUIA).

func (s *Server) adminRoutes(h func(string, http.HandlerFunc)) {
	h("GET /_synapse/admin/v1/register", s.getSharedSecretNonce)
	h("POST /_synapse/admin/v1/register", s.postSharedSecretRegister)
	h("POST /_dendrite/admin/resetPassword/{userID}", s.authed(s.postResetPassword))
	h("POST /_matrix/client/v3/account/deactivate", s.authed(s.postDeactivate))
}

// postDeactivate deactivates the caller's account after password UIA: its devices and tokens go, and it can
// no longer log in.
func (s *Server) postDeactivate(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		Auth json.RawMessage `json:"auth"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	if !s.checkPasswordUIA(w, req.Auth, c) {
		s.mu.Unlock()
		return
	}
	acc := s.accounts[c.user]
	acc.deactivated = true
	var devices []id.DeviceID
	for d := range acc.devices {
		devices = append(devices, d)
	}
	for token, t := range s.tokens {
		if t.user == c.user {
			delete(s.tokens, token)
		}
	}
	s.mu.Unlock()
	for _, d := range devices {
		s.DeleteDevice(c.user, d)
	}
	writeJSON(w, http.StatusOK, map[string]string{"id_server_unbind_result": "no-support"})
}

// Deactivated tells whether an account was deactivated.
func (s *Server) Deactivated(user id.UserID) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	acc := s.accounts[user]
	return acc != nil && acc.deactivated
}

func (s *Server) getSharedSecretNonce(w http.ResponseWriter, _ *http.Request) {
	if s.opts.SharedSecret == "" {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Shared secret registration is disabled")
		return
	}
	nonce := randomHex(16)
	s.mu.Lock()
	s.nonces[nonce] = struct{}{}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]string{"nonce": nonce})
}

// postSharedSecretRegister creates an account with a password when the MAC (HMAC-SHA1 of nonce, username,
// password and "admin"/"notadmin", NUL-separated) matches. Localparts starting with '_' are refused, as Dendrite
// and Synapse do outside appservice registration.
func (s *Server) postSharedSecretRegister(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Nonce    string `json:"nonce"`
		Username string `json:"username"`
		Password string `json:"password"`
		Admin    bool   `json:"admin"`
		MAC      string `json:"mac"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	if s.opts.SharedSecret == "" {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Shared secret registration is disabled")
		return
	}
	adminStr := "notadmin"
	if req.Admin {
		adminStr = "admin"
	}
	mac := hmac.New(sha1.New, []byte(s.opts.SharedSecret))
	mac.Write([]byte(strings.Join([]string{req.Nonce, req.Username, req.Password, adminStr}, "\x00")))
	want := hex.EncodeToString(mac.Sum(nil))
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.nonces[req.Nonce]; !ok {
		writeError(w, http.StatusBadRequest, "M_UNKNOWN", "Unrecognised nonce")
		return
	}
	delete(s.nonces, req.Nonce)
	if subtle.ConstantTimeCompare([]byte(want), []byte(req.MAC)) != 1 {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "HMAC incorrect")
		return
	}
	localpart := strings.ToLower(req.Username)
	if localpart == "" || strings.HasPrefix(localpart, "_") {
		writeError(w, http.StatusBadRequest, "M_INVALID_USERNAME", "Invalid username")
		return
	}
	user := id.NewUserID(localpart, s.opts.Domain)
	if s.accounts[user] != nil {
		writeError(w, http.StatusBadRequest, "M_USER_IN_USE", "User ID already taken")
		return
	}
	acc := s.accountLocked(user)
	acc.password, acc.admin = req.Password, req.Admin
	dev, token := s.loginLocked(acc, "")
	writeJSON(w, http.StatusOK, map[string]any{"user_id": user, "access_token": token, "device_id": dev, "home_server": s.opts.Domain})
}

func (s *Server) postResetPassword(w http.ResponseWriter, r *http.Request, c caller) {
	var req struct {
		Password string `json:"password"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if acc := s.accounts[c.user]; acc == nil || !acc.admin {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Admin only")
		return
	}
	acc := s.accounts[id.UserID(r.PathValue("userID"))]
	if acc == nil {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Unknown user")
		return
	}
	acc.password = req.Password
	writeJSON(w, http.StatusOK, map[string]bool{"password_updated": true})
}

// checkPasswordUIA answers true when the request's auth proves the caller's password (m.login.password);
// otherwise it writes the 401 that starts (or fails) user-interactive auth. s.mu must be held.
func (s *Server) checkPasswordUIA(w http.ResponseWriter, auth json.RawMessage, c caller) bool {
	var a struct {
		Type       string `json:"type"`
		Session    string `json:"session"`
		Password   string `json:"password"`
		Identifier struct {
			User string `json:"user"`
		} `json:"identifier"`
		User string `json:"user"`
	}
	_ = json.Unmarshal(auth, &a)
	challenge := map[string]any{
		"flows":   []map[string]any{{"stages": []string{"m.login.password"}}},
		"params":  map[string]any{},
		"session": randomHex(8),
	}
	if a.Type == "" || (s.opts.UIASessionRequired && a.Session == "") {
		writeJSON(w, http.StatusUnauthorized, challenge)
		return false
	}
	acc := s.accounts[c.user]
	name := a.Identifier.User
	if name == "" {
		name = a.User
	}
	sameUser := name == string(c.user) || name == c.user.Localpart()
	if a.Type != "m.login.password" || acc == nil || acc.password == "" || !sameUser ||
		subtle.ConstantTimeCompare([]byte(a.Password), []byte(acc.password)) != 1 {
		challenge["errcode"], challenge["error"] = "M_FORBIDDEN", "Invalid password"
		writeJSON(w, http.StatusUnauthorized, challenge)
		return false
	}
	return true
}
