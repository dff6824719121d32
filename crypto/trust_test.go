package crypto

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"testing"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
)

// TestTrustResolverAgainstStore resolves device trust from what a real crypto store holds (cross-signing keys,
// first-seen master keys, signatures), on both database dialects, and applies the share policy to it.
func TestTrustResolverAgainstStore(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			store := crypto.NewSQLCryptoStore(dbtest.Open(t, dialect), dbutil.NoopLogger, botAccountID, "", []byte("pickle"))
			if err := store.DB.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
			const bot = id.UserID("@bot:x")
			botUSK := id.Ed25519("QkFLRUQtYm90LXVzay1rZXktZm9yLXRlc3RzLW9ubHk")
			// Real keys are 43 characters of unpadded base64; the store keeps some in CHAR(43) columns.
			key := func(user id.UserID, name string) id.Ed25519 {
				sum := sha256.Sum256([]byte(fmt.Sprintf("%s/%s", user, name)))
				return id.Ed25519(base64.RawStdEncoding.EncodeToString(sum[:]))
			}
			must := func(err error) {
				t.Helper()
				if err != nil {
					t.Fatal(err)
				}
			}
			// identity publishes a user's master and self-signing keys, the latter signed by the former.
			identity := func(user id.UserID, master string) {
				must(store.PutCrossSigningKey(ctx, user, id.XSUsageMaster, key(user, master)))
				must(store.PutCrossSigningKey(ctx, user, id.XSUsageSelfSigning, key(user, master+"-ssk")))
				must(store.PutSignature(ctx, user, key(user, master+"-ssk"), user, key(user, master), "sig"))
			}
			device := func(user id.UserID, signedBy string) *id.Device {
				dev := &id.Device{UserID: user, DeviceID: "DEV", SigningKey: key(user, "device"), IdentityKey: id.Curve25519(key(user, "curve"))}
				if signedBy != "" {
					must(store.PutSignature(ctx, user, dev.SigningKey, user, key(user, signedBy+"-ssk"), "sig"))
				}
				return dev
			}
			identity("@signed:x", "m1")
			identity("@unsigned:x", "m1")
			identity("@changed:x", "m1")
			identity("@changed:x", "m2") // a reset: m1 stays the first key seen
			identity("@verified:x", "m1")
			must(store.PutSignature(ctx, "@verified:x", key("@verified:x", "m1"), bot, botUSK, "sig"))
			must(store.PutCrossSigningKey(ctx, "@badssk:x", id.XSUsageMaster, key("@badssk:x", "m1")))
			must(store.PutCrossSigningKey(ctx, "@badssk:x", id.XSUsageSelfSigning, key("@badssk:x", "m1-ssk")))

			for name, tc := range map[string]struct {
				device                 *id.Device
				unverified, tofu, veri bool
			}{
				"legacy user, no identity":           {device("@legacy:x", ""), true, true, false},
				"signed by the first identity":       {device("@signed:x", "m1"), true, true, false},
				"identity, device not signed":        {device("@unsigned:x", ""), true, false, false},
				"signed after an identity reset":     {device("@changed:x", "m2"), true, false, false},
				"signed, identity verified by bot":   {device("@verified:x", "m1"), true, true, true},
				"self-signing key not signed by MSK": {device("@badssk:x", "m1"), true, false, false},
				"blacklisted":                        {func() *id.Device { d := device("@signed:x", "m1"); d.Trust = id.TrustStateBlacklisted; return d }(), false, false, false},
			} {
				// A share resolves trust from keys and signatures loaded in bulk (prefetch); both ways must agree.
				for _, bulk := range []bool{false, true} {
					t.Run(fmt.Sprintf("%s/bulk=%v", name, bulk), func(t *testing.T) {
						r := newTrustResolver(store, bot, func(context.Context) id.Ed25519 { return botUSK })
						if bulk {
							if err := r.prefetch(ctx, []id.UserID{tc.device.UserID, "@absent:x"}); err != nil {
								t.Fatal(err)
							}
						}
						trust, err := r.device(ctx, tc.device)
						if err != nil {
							t.Fatal(err)
						}
						for level, want := range map[trustLevel]bool{levelUnverified: tc.unverified, levelCrossSignedTOFU: tc.tofu, levelVerified: tc.veri} {
							if got := level.admits(trust); got != want {
								t.Errorf("%s admits %+v = %v, want %v", level, trust, got, want)
							}
						}
					})
				}
			}
		})
	}
}

func TestPermanentAs(t *testing.T) {
	status := func(code int) error {
		return mautrix.HTTPError{Response: &http.Response{StatusCode: code}, RespError: &mautrix.RespError{ErrCode: "M_X"}}
	}
	for name, tc := range map[string]struct {
		err       error
		permanent bool
	}{
		"403 not an admin":   {status(http.StatusForbidden), true},
		"404 no such API":    {status(http.StatusNotFound), true},
		"400 name taken":     {status(http.StatusBadRequest), true},
		"502 gateway":        {status(http.StatusBadGateway), false},
		"429 rate limit":     {status(http.StatusTooManyRequests), false},
		"network error":      {errors.New("connection refused"), false},
		"wrapped 401 answer": {fmt.Errorf("login: %w", status(http.StatusUnauthorized)), true},
	} {
		t.Run(name, func(t *testing.T) {
			if got := errors.Is(permanentAs(ErrNoPassword, tc.err), ErrNoPassword); got != tc.permanent {
				t.Errorf("permanent = %v, want %v", got, tc.permanent)
			}
		})
	}
}
