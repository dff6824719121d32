package crypto

// The admin helper. On Dendrite without appservice-mode encryption, cross-signing keys are uploaded only with the
// account's password, and ferry's accounts have none it knows; with homeserver.registration_shared_secret ferry
// creates one homeserver admin account (@<bot>-admin) and uses it only to set random passwords on its own
// accounts. Least privilege: the helper is logged in only while calls need it (calls that overlap share one
// login) and its access token is logged out as soon as the last of them ends (withAdmin), so no admin
// credential lives longer than the calls that need it. The admin-helper bot
// command shows it (AdminHelper) and can remove it (RemoveAdminHelper): ferry deactivates the account, forgets
// its password, and never creates it again; ghosts that then need a password fall back to single-device mode.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

// adminAccountID is the crypto store account that holds the admin helper's password.
const adminAccountID = "ferry-admin"

// adminLocalpartSuffix names ferry's admin helper account after the bot: @<bot>-admin.
const adminLocalpartSuffix = "-admin"

// secretAdminRemoved marks (in the admin helper's store account) that an admin removed the helper: ferry does
// not create it again.
const secretAdminRemoved id.Secret = "im.ferry.admin_helper_removed"

// adminLogoutTimeout bounds the logout after a call, which runs even when the call's context was cancelled.
const adminLogoutTimeout = 10 * time.Second

// ErrAdminHelperRemoved is returned when the admin helper is needed but an admin removed it. Callers treat it
// like a missing password (ErrNoPassword wraps it).
var ErrAdminHelperRemoved = errors.New("ferry's admin helper account was removed by an admin")

// AdminHelperStatus describes ferry's admin helper for the admin-helper command.
type AdminHelperStatus struct {
	UserID id.UserID
	// Possible: ferry could create the helper (a shared secret is configured and encryption does not go through
	// the appservice, which needs no passwords).
	Possible bool
	// Exists: ferry created the helper and holds its password.
	Exists bool
	// Removed: an admin removed it; ferry does not create it again.
	Removed bool
	// LoggedIn: calls are using it right now (its access token is live only while calls need it).
	LoggedIn bool
}

func (m *Machine) adminUserID() id.UserID {
	return id.NewUserID(m.client.UserID.Localpart()+adminLocalpartSuffix, m.client.UserID.Homeserver())
}

func (m *Machine) adminStore() *crypto.SQLCryptoStore {
	return crypto.NewSQLCryptoStore(m.db, m.dbLog, adminAccountID, "", []byte(m.cfg.PickleKey))
}

// adminSession is one login of the admin helper, shared by the calls that overlap it.
type adminSession struct {
	ready  chan struct{} // closed once the login ended, with client or err set
	client *mautrix.Client
	err    error
	users  int           // calls using it; guarded by Machine.adminLock
	gone   chan struct{} // closed once its logout ended
}

// withAdmin runs fn as ferry's admin helper, logged in while fn runs, creating the helper through the
// shared-secret API on first use. Calls that overlap share one login, side by side (many new senders' ghosts need
// passwords at once); its access token is logged out as soon as the last of them returns.
func (m *Machine) withAdmin(ctx context.Context, fn func(admin *mautrix.Client) error) error {
	m.adminGate.RLock()
	defer m.adminGate.RUnlock()
	m.adminLock.Lock()
	s := m.admin
	if s == nil {
		// The first call logs in, after the previous login's logout ended: a logout removes the device, which
		// the new login reuses.
		s = &adminSession{ready: make(chan struct{}), gone: make(chan struct{})}
		m.admin = s
		s.users++
		prev := m.adminGone
		m.adminGone = s.gone
		m.adminLock.Unlock()
		if prev != nil {
			<-prev
		}
		s.client, s.err = m.adminLogin(ctx)
		close(s.ready)
	} else {
		s.users++
		m.adminLock.Unlock()
		<-s.ready
	}
	defer m.adminDone(ctx, s)
	if s.err != nil {
		return s.err
	}
	return fn(s.client)
}

// adminDone ends one call's use of the admin login; the last call out logs it out.
func (m *Machine) adminDone(ctx context.Context, s *adminSession) {
	m.adminLock.Lock()
	s.users--
	last := s.users == 0
	if last && m.admin == s {
		m.admin = nil
	}
	m.adminLock.Unlock()
	if !last {
		return
	}
	if s.client != nil {
		m.adminLogout(ctx, s.client)
	}
	close(s.gone)
}

// adminLogin logs the helper in (or registers it), returning a client holding a fresh access token, unless an
// admin removed it.
func (m *Machine) adminLogin(ctx context.Context) (*mautrix.Client, error) {
	// Its state in one read, kept for the next logins (one login at a time: under adminLock's single login and
	// adminGate, nothing else writes it meanwhile).
	m.adminLock.Lock()
	store := m.adminSecrets
	if store == nil {
		store = newSecretCache(m.adminStore())
		m.adminSecrets = store
	}
	m.adminLock.Unlock()
	if removed, err := store.GetSecret(ctx, secretAdminRemoved); err != nil {
		return nil, fmt.Errorf("failed to read the admin helper's state: %w", err)
	} else if removed != "" {
		return nil, ErrAdminHelperRemoved
	}
	userID := m.adminUserID()
	password, err := store.GetSecret(ctx, secretPassword)
	if err != nil {
		return nil, fmt.Errorf("failed to read the admin helper's password: %w", err)
	}
	if password == "" {
		password = randomPassword()
		if err = store.PutSecret(ctx, secretPassword, password); err != nil {
			return nil, fmt.Errorf("failed to store the admin helper's password: %w", err)
		}
		resp, err := m.sharedSecretRegister(ctx, userID.Localpart(), password, true)
		if err != nil {
			_ = store.DeleteSecret(ctx, secretPassword)
			return nil, fmt.Errorf("failed to create the admin helper %s: %w", userID, err)
		}
		m.log.Warn().Stringer("user_id", userID).Msg("Created ferry's homeserver admin helper account (used only to set passwords on ferry's own accounts; logged in only while in use)")
		_ = store.PutSecret(ctx, secretAccessToken, string(resp.DeviceID))
		return m.userClient(userID, resp.DeviceID, resp.AccessToken), nil
	}
	// Log in on the same device each time, so the helper does not collect devices.
	deviceID, err := store.GetSecret(ctx, secretAccessToken)
	if err != nil {
		return nil, fmt.Errorf("failed to read the admin helper's device: %w", err)
	}
	resp, err := m.plainClient().Login(ctx, &mautrix.ReqLogin{
		Type:       mautrix.AuthTypePassword,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(userID)},
		Password:   password, DeviceID: id.DeviceID(deviceID), InitialDeviceDisplayName: "ferry admin helper",
	})
	if err != nil {
		return nil, fmt.Errorf("failed to log in the admin helper %s: %w", userID, err)
	}
	if resp.DeviceID != id.DeviceID(deviceID) {
		_ = store.PutSecret(ctx, secretAccessToken, string(resp.DeviceID))
	}
	return m.userClient(userID, resp.DeviceID, resp.AccessToken), nil
}

// adminLogout logs the helper's access token out. It runs on its own context: a cancelled call must not leave
// the token live.
func (m *Machine) adminLogout(ctx context.Context, admin *mautrix.Client) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), adminLogoutTimeout)
	defer cancel()
	if _, err := admin.Logout(ctx); errors.Is(err, mautrix.MUnknownToken) {
		return // already gone (the account was just deactivated)
	} else if err != nil {
		m.log.Warn().Err(err).Msg("Failed to log out ferry's admin helper after use")
		return
	}
	m.log.Debug().Msg("Logged out ferry's admin helper after use")
}

// AdminHelper describes ferry's admin helper account (the admin-helper command).
func (m *Machine) AdminHelper(ctx context.Context) (AdminHelperStatus, error) {
	s := AdminHelperStatus{UserID: m.adminUserID(), Possible: m.SharedSecret != "" && !m.asMode.Load()}
	store := m.adminStore()
	removed, err := store.GetSecret(ctx, secretAdminRemoved)
	if err != nil {
		return s, err
	}
	password, err := store.GetSecret(ctx, secretPassword)
	if err != nil {
		return s, err
	}
	s.Removed, s.Exists = removed != "", password != ""
	m.adminLock.Lock()
	s.LoggedIn = m.admin != nil
	m.adminLock.Unlock()
	return s, nil
}

// RemoveAdminHelper deactivates ferry's admin helper on the homeserver, forgets its password and records that
// ferry must not create it again. It reports whether there was one to remove.
func (m *Machine) RemoveAdminHelper(ctx context.Context) (bool, error) {
	store := m.adminStore()
	password, err := store.GetSecret(ctx, secretPassword)
	if err != nil {
		return false, err
	}
	existed := password != ""
	if existed {
		err = m.withAdmin(ctx, func(admin *mautrix.Client) error {
			return deactivate(ctx, admin, password)
		})
		if err != nil && !errors.Is(err, ErrAdminHelperRemoved) {
			return false, fmt.Errorf("failed to deactivate the admin helper: %w", err)
		}
	}
	m.adminGate.Lock() // no call uses the helper while it is marked removed
	defer m.adminGate.Unlock()
	m.adminLock.Lock()
	m.adminSecrets = nil // written below without it
	m.adminLock.Unlock()
	if err = store.PutSecret(ctx, secretAdminRemoved, time.Now().UTC().Format(time.RFC3339)); err != nil {
		return false, err
	}
	_ = store.DeleteSecret(ctx, secretPassword)
	_ = store.DeleteSecret(ctx, secretAccessToken)
	m.log.Warn().Stringer("user_id", m.adminUserID()).Bool("deactivated", existed).Msg("Removed ferry's admin helper account; ferry will not create it again")
	return existed, nil
}

// deactivate deactivates the account admin is logged in as, answering the password UIA.
func deactivate(ctx context.Context, admin *mautrix.Client, password string) error {
	url := admin.BuildClientURL("v3", "account", "deactivate")
	body := map[string]any{"erase": false}
	// The first attempt, without auth, gets the UIA session in its 401 answer.
	data, err := admin.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost, URL: url, RequestJSON: body})
	var httpErr mautrix.HTTPError
	if err == nil || !errors.As(err, &httpErr) || httpErr.Response == nil || httpErr.Response.StatusCode != http.StatusUnauthorized {
		return err
	}
	var uia mautrix.RespUserInteractive
	if jerr := json.Unmarshal(data, &uia); jerr != nil {
		return err
	}
	body["auth"] = &uiaPassword{
		Type: mautrix.AuthTypePassword, Session: uia.Session,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(admin.UserID)},
		Password:   password,
	}
	_, err = admin.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost, URL: url, RequestJSON: body, SensitiveContent: true})
	return err
}
