package crypto

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1" //nolint:gosec // the shared-secret registration API is defined with HMAC-SHA1
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

// Names under which ferry keeps per-account secrets in the crypto store's crypto_secrets table. Every value is
// encrypted with the pickle key (SQLCryptoStore.PutSecret), like the Olm pickles.
const (
	// secretPassword is the account password ferry chose when it registered the account through the
	// shared-secret API; it answers m.login.password UIA (Dendrite asks for it before cross-signing uploads).
	secretPassword id.Secret = "im.ferry.account_password"
	// secretAccessToken is a ghost device's access token (the bot logs in afresh at each start).
	secretAccessToken id.Secret = "im.ferry.access_token"
	// secretRecoveryKey is the recovery key of the bot's secret storage (SSSS), shown by the admin command.
	secretRecoveryKey id.Secret = "im.ferry.recovery_key"
	// secretSignedDevice is the device ID whose cross-signing signature has been uploaded.
	secretSignedDevice id.Secret = "im.ferry.cross_signed_device"
)

// passwordBytes is the entropy of generated account passwords (base64url: 43 characters).
const passwordBytes = 32

// sharedSecretRegisterPath is the shared-secret admin registration API (Synapse's, which Dendrite implements).
var sharedSecretRegisterPath = mautrix.SynapseAdminURLPath{"v1", "register"}

// ErrNoPassword is returned when an account's cross-signing keys must be uploaded with password UIA and ferry
// does not know the account's password (it was registered without one before ferry could set it).
var ErrNoPassword = errors.New("the homeserver asks for the account password and ferry has none for this account")

// sharedSecretMAC computes the registration MAC: HMAC-SHA1 over nonce, user, password and the admin flag,
// NUL-separated, hex-encoded. Pure; for the shared-secret registration API.
func sharedSecretMAC(secret, nonce, localpart, password string, admin bool) string {
	mac := hmac.New(sha1.New, []byte(secret))
	adminStr := "notadmin"
	if admin {
		adminStr = "admin"
	}
	mac.Write([]byte(strings.Join([]string{nonce, localpart, password, adminStr}, "\x00")))
	return hex.EncodeToString(mac.Sum(nil))
}

func randomPassword() string {
	b := make([]byte, passwordBytes)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// plainClient is an unauthenticated client for the homeserver.
func (m *Machine) plainClient() *mautrix.Client {
	cli, _ := mautrix.NewClient(m.client.HomeserverURL.String(), "", "")
	cli.Log = m.log.With().Str("component", "crypto_http").Logger()
	return cli
}

// userClient is a client that acts as userID with its own device's access token (not the appservice token).
func (m *Machine) userClient(userID id.UserID, deviceID id.DeviceID, token string) *mautrix.Client {
	cli, _ := mautrix.NewClient(m.client.HomeserverURL.String(), userID, token)
	cli.DeviceID = deviceID
	cli.Log = m.log.With().Str("component", "crypto_http").Stringer("user_id", userID).Logger()
	return cli
}

// registerWithPassword creates a ferry account (bot or ghost) through the shared-secret registration API with a
// random password, which it stores encrypted before asking the server. The device the API creates is logged out
// at once: ferry makes its own devices. It returns mautrix.MUserInUse when the account exists already (Dendrite
// creates the bot itself), and M_INVALID_USERNAME for localparts starting with '_' (both Dendrite and Synapse
// refuse those outside appservice registration).
func (m *Machine) registerWithPassword(ctx context.Context, userID id.UserID) error {
	store := m.storeFor(userID)
	password := randomPassword()
	if err := store.PutSecret(ctx, secretPassword, password); err != nil {
		return fmt.Errorf("failed to store the new password: %w", err)
	}
	resp, err := m.sharedSecretRegister(ctx, userID.Localpart(), password, false)
	if err != nil {
		// The password was (most likely) never set on the server: forget it so nothing relies on it. If the
		// request did succeed after all, provisionPassword sets a new one.
		_ = store.DeleteSecret(ctx, secretPassword)
		return err
	}
	if resp.AccessToken != "" {
		if _, err = m.userClient(userID, resp.DeviceID, resp.AccessToken).Logout(ctx); err != nil {
			m.log.Warn().Err(err).Stringer("user_id", userID).Msg("Failed to log out the device the registration API created")
		}
	}
	return nil
}

// sharedSecretRegister calls the shared-secret registration API (GET a nonce, POST with the MAC).
func (m *Machine) sharedSecretRegister(ctx context.Context, localpart, password string, admin bool) (*mautrix.RespRegister, error) {
	cli := m.plainClient()
	var nonce struct {
		Nonce string `json:"nonce"`
	}
	url := cli.BuildURL(sharedSecretRegisterPath)
	if _, err := cli.MakeRequest(ctx, http.MethodGet, url, nil, &nonce); err != nil {
		return nil, fmt.Errorf("failed to get a registration nonce: %w", err)
	}
	req := map[string]any{
		"nonce": nonce.Nonce, "username": localpart, "password": password, "admin": admin,
		"mac": sharedSecretMAC(m.SharedSecret, nonce.Nonce, localpart, password, admin),
	}
	var resp mautrix.RespRegister
	_, err := cli.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost, URL: url, RequestJSON: req, ResponseJSON: &resp, SensitiveContent: true})
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// provisionPassword gives one of ferry's existing accounts a password when it has none ferry knows (the bot,
// which Dendrite creates itself, and ghosts the appservice registered): it sets a random password through
// Dendrite's admin API, as ferry's admin helper account. Without a shared secret, or on homeservers without that
// API, it returns ErrNoPassword. The password is stored in store before the server is asked; with a nil store
// the caller stores it (a new ghost's, with its account: a stop before leaves no password stored, and the next
// set-up sets another).
func (m *Machine) provisionPassword(ctx context.Context, userID id.UserID, store secretStore) (string, error) {
	if m.SharedSecret == "" {
		return "", ErrNoPassword
	}
	password := randomPassword()
	err := m.withAdmin(ctx, func(admin *mautrix.Client) error {
		if store != nil {
			if err := store.PutSecret(ctx, secretPassword, password); err != nil {
				return fmt.Errorf("failed to store the new password: %w", err)
			}
		}
		url := admin.BuildURL(mautrix.BaseURLPath{"_dendrite", "admin", "resetPassword", userID})
		// logout_devices false: the bot's appservice "device" on Dendrite is the as_token itself.
		body := map[string]any{"password": password, "logout_devices": false}
		_, err := admin.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost, URL: url, RequestJSON: body, SensitiveContent: true})
		if err != nil {
			if store != nil {
				_ = store.DeleteSecret(ctx, secretPassword)
			}
			return fmt.Errorf("setting a password through the admin API failed: %w", err)
		}
		return nil
	})
	if errors.Is(err, ErrAdminHelperRemoved) {
		return "", fmt.Errorf("%w: %w", ErrNoPassword, err)
	} else if err != nil {
		return "", permanentAs(ErrNoPassword, err)
	}
	m.log.Info().Stringer("user_id", userID).Msg("Set a password on one of ferry's accounts, for the cross-signing UIA")
	return password, nil
}

// passwordUIA answers the homeserver's m.login.password UIA for userID (nil when there is no password or the
// server offers no password flow, which ends the attempt with the server's 401).
func passwordUIA(userID id.UserID, password string) mautrix.UIACallback {
	return func(resp *mautrix.RespUserInteractive) any {
		if password == "" || resp == nil || !resp.HasSingleStageFlow(mautrix.AuthTypePassword) {
			return nil
		}
		return &uiaPassword{
			Type:       mautrix.AuthTypePassword,
			Session:    resp.Session,
			Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: string(userID)},
			Password:   password,
		}
	}
}

type uiaPassword struct {
	Type       mautrix.AuthType       `json:"type"`
	Session    string                 `json:"session,omitempty"`
	Identifier mautrix.UserIdentifier `json:"identifier"`
	Password   string                 `json:"password"`
}

// registeringStateStore is the appservice's state store with one change: before the appservice registers one of
// ferry's accounts (without a password, which is all an appservice registration gives), ferry registers it
// through the shared-secret API with a password it keeps, so that it can later answer the password UIA that
// some homeservers (Dendrite) demand before cross-signing keys are uploaded.
type registeringStateStore struct {
	appservice.StateStore
	m *Machine
}

// WrapStateStore returns the state store cmd/ferry should give the appservice (see registeringStateStore).
func (m *Machine) WrapStateStore(ss appservice.StateStore) appservice.StateStore {
	return &registeringStateStore{StateStore: ss, m: m}
}

func (s *registeringStateStore) IsRegistered(ctx context.Context, userID id.UserID) (bool, error) {
	ok, err := s.StateStore.IsRegistered(ctx, userID)
	if ok || err != nil || !s.m.wantsPassword(userID) {
		return ok, err
	}
	if err = s.m.open(ctx); err != nil {
		return false, err
	}
	log := s.m.log.With().Stringer("user_id", userID).Logger()
	err = s.m.registerWithPassword(ctx, userID)
	switch {
	case err == nil:
		log.Debug().Msg("Registered account with a password through the shared-secret API")
		if err = s.StateStore.MarkRegistered(ctx, userID); err != nil {
			return false, err
		}
		return true, nil
	case errors.Is(err, mautrix.MUserInUse):
		log.Debug().Msg("Account already exists; ferry sets its password through the admin API if the homeserver asks for one")
	default:
		log.Warn().Err(err).Msg("Shared-secret registration failed; registering through the appservice instead")
	}
	// Let the appservice register it (or find it registered) as before.
	return false, nil
}

// wantsPassword tells whether ferry should create userID with a password: without appservice-mode encryption, the
// bot always when a shared secret is configured (its device is cross-signed in every mode), ghosts only in
// per-ghost mode.
func (m *Machine) wantsPassword(userID id.UserID) bool {
	if m.cfg.Appservice {
		// Appservice-mode encryption publishes identities without UIA (MSC4190), and when the homeserver turns
		// out to lack it, the fallback tries without a password first (see publishIdentity): a password is
		// set only if the homeserver then asks for one.
		return false
	}
	if m.SharedSecret == "" || m.isOwn == nil || !m.isOwn(userID) || strings.HasPrefix(userID.Localpart(), "_") {
		// Localparts starting with '_' are refused by shared-secret registration (Dendrite and Synapse);
		// those accounts get their password through provisionPassword instead.
		return false
	}
	return userID == m.client.UserID || m.cfg.DeviceMode == DeviceModePerGhost
}

// storeFor returns a crypto store handle for one of ferry's accounts (the bot's account ID is botAccountID).
func (m *Machine) storeFor(userID id.UserID) *crypto.SQLCryptoStore {
	accountID := string(userID)
	if userID == m.client.UserID {
		accountID = botAccountID
	}
	return crypto.NewSQLCryptoStore(m.db, m.dbLog, accountID, "", []byte(m.cfg.PickleKey))
}

// permanentAs wraps err in sentinel when the homeserver refused for good (a 4xx answer: no such API, not
// allowed, name taken), and returns err alone when trying again later may work (network errors, 5xx, 429).
func permanentAs(sentinel, err error) error {
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil && httpErr.Response.StatusCode >= 400 && httpErr.Response.StatusCode < 500 &&
		httpErr.Response.StatusCode != http.StatusTooManyRequests {
		return fmt.Errorf("%w: %w", sentinel, err)
	}
	return err
}
