package crypto

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database/dbtest"
	"go.ferry.im/ferry/internal/fakehs"
)

// devicePaths are the homeserver options of the two ways a ghost's device is made: through the appservice
// (MSC4190) and by logging in.
func devicePaths() map[string]fakehs.Options {
	return map[string]fakehs.Options{
		"appservice": {CrossSigningUIA: true},
		"login":      {NoMSC4190: true, CrossSigningUIA: true, SharedSecret: "asmode-secret"},
	}
}

// onEachDevicePath runs test, as a subtest per device path, with a started rig whose ghost is set up as a sender.
func onEachDevicePath(t *testing.T, test func(ctx context.Context, t *testing.T, r *asRig)) {
	for name, opts := range devicePaths() {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r := startASRig(ctx, t, opts, opts.SharedSecret)
			defer r.m.Stop()
			if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
				t.Fatal(err)
			}
			test(ctx, t, r)
		})
	}
}

// onEachDevicePathLogged runs test, as a subtest per device path, with a started rig whose statements log records
// (nothing set up for its ghost yet); the rig's Machine, even one test replaced, is stopped after test.
func onEachDevicePathLogged(t *testing.T, test func(ctx context.Context, t *testing.T, r *asRig, log *writeLog)) {
	for name, opts := range devicePaths() {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r, log := startASRigLogged(ctx, t, opts)
			defer func() { r.m.Stop() }()
			test(ctx, t, r, log)
		})
	}
}

// TestGhostDeviceUploadsFewOneTimeKeys: a ghost's new device uploads ghostOneTimeKeys one-time keys, on both
// device paths, and still works for what members do with it: their client opens an Olm channel to the ghost's
// device with one of those keys when it shares its own room key, and reads the ghost's message.
func TestGhostDeviceUploadsFewOneTimeKeys(t *testing.T) {
	onEachDevicePath(t, func(ctx context.Context, t *testing.T, r *asRig) {
		devices := r.srv.Devices(r.ghost)
		if len(devices) != 1 {
			t.Fatalf("the ghost has devices %v, want one", devices)
		}
		if n := r.srv.OTKCount(r.ghost, devices[0]); n != ghostOneTimeKeys {
			t.Fatalf("the ghost's new device uploaded %d one-time keys, want %d", n, ghostOneTimeKeys)
		}
		// The member writes before the ghost ever did: its client has no Olm channel to the ghost's device yet
		// and claims one of its keys.
		r.memberSends(t, "a room key for every device")
		if n := r.srv.OTKCount(r.ghost, devices[0]); n != ghostOneTimeKeys-1 {
			t.Fatalf("after the member shared its room key the ghost's device has %d one-time keys, want %d (one claimed)", n, ghostOneTimeKeys-1)
		}
		sent := r.sendAs(t, r.ghost, "first words")
		r.memberReads(t, sent, "first words")
	})
}

// TestGhostSetUpsAreBounded: when many new senders speak at once, at most ghostSetUpParallel of their ghosts'
// devices are set up side by side (the rest wait their turn), so that their requests and statements leave the
// established links' messages room; every one of them is set up in the end.
func TestGhostSetUpsAreBounded(t *testing.T) {
	for name, opts := range devicePaths() {
		t.Run(name, func(t *testing.T) { ghostSetUpsAreBounded(t, opts) })
	}
}

// ghostSetUpsAreBounded is TestGhostSetUpsAreBounded on one device path.
func ghostSetUpsAreBounded(t *testing.T, opts fakehs.Options) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	inFlight, most := 0, 0
	opts.BeforeRequest = func(route string, _ []byte) {
		if route != "POST /_matrix/client/v3/keys/upload" {
			return
		}
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		mu.Unlock()
		time.Sleep(50 * time.Millisecond) // a homeserver taking its time
		mu.Lock()
		inFlight--
		mu.Unlock()
	}
	r := startASRig(ctx, t, opts, opts.SharedSecret)
	defer r.m.Stop()
	const ghosts = 3 * ghostSetUpParallel
	var wg sync.WaitGroup
	errs := make(chan error, ghosts)
	for i := range ghosts {
		g := id.NewUserID(fmt.Sprintf("ghost_new%d", i), r.srv.Domain())
		if _, err := r.asClient(t, r.bot).MakeRequest(ctx, http.MethodPost, r.asClient(t, r.bot).BuildClientURL("v3", "register"),
			map[string]any{"type": mautrix.AuthTypeAppservice, "username": g.Localpart(), "inhibit_login": true}, nil); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.m.PrepareSender(ctx, g); err != nil {
				errs <- err
			} else if !r.m.SenderReady(g) {
				errs <- fmt.Errorf("%s is not ready after its set-up", g)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if most > ghostSetUpParallel {
		t.Errorf("%d ghost devices were set up side by side, want at most %d", most, ghostSetUpParallel)
	}
	if most < 2 {
		t.Errorf("ghost devices were set up one at a time (%d side by side)", most)
	}
}

// TestNewGhostSignsItsDeviceInOneRequest: a new ghost's device is signed by its self-signing key, and its master
// key by the device, in one signature upload, built from the device's own keys rather than from a query of what the
// homeserver holds; a member's client sees the device cross-signed by its owner, on both device paths.
func TestNewGhostSignsItsDeviceInOneRequest(t *testing.T) {
	for name, opts := range devicePaths() {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var mu sync.Mutex
			var uploads []map[id.UserID]map[string]json.RawMessage
			ownQueriesBefore := 0
			const ghostLocalpart = "ghost_alice" // the rig's ghost
			opts.BeforeRequest = func(route string, body []byte) {
				mu.Lock()
				defer mu.Unlock()
				switch route {
				case "POST /_matrix/client/v3/keys/signatures/upload":
					var req map[id.UserID]map[string]json.RawMessage
					if err := json.Unmarshal(body, &req); err != nil {
						t.Errorf("signature upload %s: %v", body, err)
					}
					uploads = append(uploads, req)
				case "POST /_matrix/client/v3/keys/query":
					if len(uploads) == 0 && strings.Contains(string(body), ghostLocalpart) {
						ownQueriesBefore++
					}
				}
			}
			r := startASRig(ctx, t, opts, opts.SharedSecret)
			defer r.m.Stop()
			if r.ghost.Localpart() != ghostLocalpart {
				t.Fatalf("the rig's ghost is %s", r.ghost)
			}
			if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			var ghostUploads []map[string]json.RawMessage
			for _, u := range uploads {
				if objs, ok := u[r.ghost]; ok {
					ghostUploads = append(ghostUploads, objs)
				}
			}
			queries := ownQueriesBefore
			mu.Unlock()
			if len(ghostUploads) != 1 {
				t.Fatalf("the ghost's set-up uploaded signatures %d times, want once", len(ghostUploads))
			}
			devices := r.srv.Devices(r.ghost)
			if len(devices) != 1 {
				t.Fatalf("the ghost has devices %v, want one", devices)
			}
			if _, ok := ghostUploads[0][string(devices[0])]; !ok || len(ghostUploads[0]) != 2 {
				t.Errorf("the upload signs %v, want the device %s and the master key", keysOf(ghostUploads[0]), devices[0])
			}
			if queries != 0 {
				t.Errorf("the ghost queried its own keys %d times before signing its device", queries)
			}
			sent := r.sendAs(t, r.ghost, "signed words")
			if trust := r.memberReads(t, sent, "signed words"); trust != id.TrustStateCrossSignedTOFU {
				t.Errorf("the member's client sees the ghost's device as %s, want cross-signed by its owner (%s)", trust, id.TrustStateCrossSignedTOFU)
			}
		})
	}
}

func keysOf(m map[string]json.RawMessage) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestNewIdentityStoredInTwoStatements: a new ghost's identity is stored in two statements (its private keys
// before they are published, in its account's first write; then the signatures of its publication and of its device with the markers of both
// steps); when signing the device fails, the publication's marker is stored all the same (with the publication's
// signatures), so the retry signs the device without publishing the identity again, and a member's client then
// sees the device cross-signed by its owner.
func TestNewIdentityStoredInTwoStatements(t *testing.T) {
	for name, failSigning := range map[string]bool{"clean": false, "signing fails once": true} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var published, signed atomic.Int32
			opts := fakehs.Options{CrossSigningUIA: true}
			opts.BeforeRequest = func(route string, _ []byte) {
				switch route {
				case "POST /_matrix/client/v3/keys/device_signing/upload":
					published.Add(1)
				case "POST /_matrix/client/v3/keys/signatures/upload":
					signed.Add(1)
				}
			}
			r, log := startASRigLogged(ctx, t, opts)
			defer r.m.Stop()
			if failSigning {
				r.failGhostRequestOnce(t, "/keys/signatures/upload")
			}
			published.Store(0)
			signed.Store(0)
			log.take()
			err := r.m.PrepareSender(ctx, r.ghost)
			if failSigning {
				if err == nil {
					t.Fatal("the failed signature upload did not reach the set-up")
				}
				err = r.m.PrepareSender(ctx, r.ghost)
			}
			if err != nil {
				t.Fatal(err)
			}
			writes := log.take("crypto_secrets", "crypto_cross_signing_signatures")
			if want := 2; !failSigning && len(writes) != want {
				t.Errorf("the identity was stored in %d statements, want %d:\n%s", len(writes), want, strings.Join(writes, "\n"))
			}
			if n := published.Load(); n != 1 {
				t.Errorf("the identity was published %d times, want once", n)
			}
			if n := signed.Load(); n != 1 { // the failed upload is answered before it reaches the server
				t.Errorf("%d signature uploads reached the server, want 1", n)
			}
			sent := r.sendAs(t, r.ghost, "after the set-up")
			if trust := r.memberReads(t, sent, "after the set-up"); trust != id.TrustStateCrossSignedTOFU {
				t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
			}
		})
	}
}

// TestGhostChecksItsSignatureOnlyWhereServedLate: after signing a new device, a ghost asks the homeserver whether it
// serves the signature yet only on the login path (Dendrite's: it applies signature uploads later, and a member's
// client that saw the device unsigned would refuse its first messages). A homeserver with MSC4190 (Synapse) stores
// the signatures before it answers the upload: no query there, one round trip fewer on a new sender's first message.
func TestGhostChecksItsSignatureOnlyWhereServedLate(t *testing.T) {
	for name, opts := range devicePaths() {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var signed, queriesAfter atomic.Int32
			opts.BeforeRequest = func(route string, body []byte) {
				switch {
				case route == "POST /_matrix/client/v3/keys/signatures/upload" && strings.Contains(string(body), "ghost_alice"):
					signed.Add(1)
				case route == "POST /_matrix/client/v3/keys/query" && signed.Load() > 0 && strings.Contains(string(body), "ghost_alice"):
					queriesAfter.Add(1)
				}
			}
			r := startASRig(ctx, t, opts, opts.SharedSecret)
			defer r.m.Stop()
			if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
				t.Fatal(err)
			}
			want := int32(1)
			if r.m.AppserviceMode() {
				want = 0
			}
			if n := queriesAfter.Load(); signed.Load() != 1 || n != want {
				t.Errorf("after %d signature uploads the ghost queried its keys %d times, want %d", signed.Load(), n, want)
			}
			sent := r.sendAs(t, r.ghost, "first words")
			if trust := r.memberReads(t, sent, "first words"); trust != id.TrustStateCrossSignedTOFU {
				t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
			}
		})
	}
}

// TestGhostDeviceKeysRunOut: more member devices share their room keys with a ghost's device than it has one-time
// keys. The ones after the keys ran out share without the ghost's device (ferry never needs their keys there), and
// every member still reads the ghost's messages, whose keys ferry sends over channels it opens itself. On both
// device paths.
func TestGhostDeviceKeysRunOut(t *testing.T) {
	onEachDevicePath(t, func(ctx context.Context, t *testing.T, r *asRig) {
		ghostDevice := r.srv.Devices(r.ghost)[0]
		members := []*fakehs.User{r.member}
		for i := 1; i <= ghostOneTimeKeys; i++ {
			u, err := r.srv.NewUser(ctx, id.NewUserID(fmt.Sprintf("member%d", i), r.srv.Domain()), fakehs.UserOptions{CrossSign: true})
			if err != nil {
				t.Fatal(err)
			}
			members = append(members, u)
		}
		inRoom := []id.UserID{r.bot, r.ghost}
		for _, u := range members {
			inRoom = append(inRoom, u.ID)
			if err := r.ss.SetMembership(ctx, r.room, u.ID, event.MembershipJoin); err != nil {
				t.Fatal(err)
			}
		}
		for _, u := range members {
			if err := u.SetRoom(ctx, r.room, inRoom, r.enc); err != nil {
				t.Fatal(err)
			}
			if _, _, err := u.Encrypt(ctx, r.room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "hello from " + u.ID.Localpart()}); err != nil {
				t.Fatalf("%s cannot send once the ghost's keys are gone: %v", u.ID, err)
			}
		}
		if n := r.srv.OTKCount(r.ghost, ghostDevice); n != 0 {
			t.Fatalf("after %d member devices shared their room keys the ghost's device has %d one-time keys left, want 0", len(members), n)
		}
		sent := r.sendAs(t, r.ghost, "to everyone")
		for _, u := range members {
			u.ReceiveToDevice(ctx)
			dec, err := u.Decrypt(ctx, sent)
			if err != nil {
				t.Errorf("%s cannot read the ghost's message: %v", u.ID, err)
			} else if dec.Content.AsMessage().Body != "to everyone" {
				t.Errorf("%s read %q", u.ID, dec.Content.AsMessage().Body)
			}
		}
	})
}

// TestNewGhostStoresItsDeviceWithItsAccount: a new ghost's own device and its account, which mautrix stores one
// after the other before their first upload, are written in one statement on Postgres; the stored device is the
// one the homeserver publishes (the keys members' clients see), and members read the ghost. On both device paths.
func TestNewGhostStoresItsDeviceWithItsAccount(t *testing.T) {
	onEachDevicePathLogged(t, func(ctx context.Context, t *testing.T, r *asRig, log *writeLog) {
		log.take()
		if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
			t.Fatal(err)
		}
		// Its first write (device and account) and the account marked shared after the upload (the login
		// path's first drain of the device's to-device queue also stores its token in the account's row).
		writes := slices.DeleteFunc(log.take("crypto_device", "crypto_account"), func(w string) bool {
			return strings.HasPrefix(w, "UPDATE crypto_account SET sync_token=")
		})
		if len(writes) != 2 {
			t.Errorf("the new ghost's device and account were written in %d statements, want 2:\n%s", len(writes), strings.Join(writes, "\n"))
		}
		devices := r.srv.Devices(r.ghost)
		if len(devices) != 1 {
			t.Fatalf("the ghost has devices %v, want one", devices)
		}
		resp, err := r.member.Client.QueryKeys(ctx, &mautrix.ReqQueryKeys{DeviceKeys: map[id.UserID]mautrix.DeviceIDList{r.ghost: nil}})
		if err != nil {
			t.Fatal(err)
		}
		published := resp.DeviceKeys[r.ghost][devices[0]]
		var identity, signing string
		var shared bool
		if err = r.db.QueryRow(ctx, `SELECT d.identity_key, d.signing_key, a.shared FROM crypto_device d JOIN crypto_account a ON a.account_id=$1 AND a.device_id=d.device_id
				WHERE d.user_id=$1 AND d.device_id=$2`, string(r.ghost), string(devices[0])).Scan(&identity, &signing, &shared); err != nil {
			t.Fatalf("the ghost's own device and account: %v", err)
		}
		if identity != published.Keys.GetCurve25519(devices[0]).String() || signing != published.Keys.GetEd25519(devices[0]).String() || !shared {
			t.Errorf("stored own device %s/%s (account shared %v), the homeserver publishes %s/%s", identity, signing, shared,
				published.Keys.GetCurve25519(devices[0]), published.Keys.GetEd25519(devices[0]))
		}
		sent := r.sendAs(t, r.ghost, "stored together")
		r.memberReads(t, sent, "stored together")
	})
}

// TestNewGhostReadsItsAccountAndSecretsOnce: setting up a new ghost's device reads what its account holds (its
// device, its secrets: cross-signing keys, markers, the login path's token and password) in one query, on both
// device paths, and on the login path the admin helper's state, once read, is not read again for each ghost it
// gives a password; restarted, ferry reads them the same way and the ghost keeps its identity.
func TestNewGhostReadsItsAccountAndSecretsOnce(t *testing.T) {
	onEachDevicePathLogged(t, func(ctx context.Context, t *testing.T, r *asRig, log *writeLog) {
		// Another ghost first: on the login path its password is the admin helper's first use.
		if err := r.m.PrepareSender(ctx, id.NewUserID("ghost_first", r.srv.Domain())); err != nil {
			t.Fatal(err)
		}
		log.takeReads("")
		if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
			t.Fatal(err)
		}
		// (The login path's first drain of the device's to-device queue reads its token from the account's row.)
		reads := slices.DeleteFunc(log.takeReads(""), func(q string) bool {
			return strings.HasPrefix(q, "SELECT sync_token ") || !(strings.Contains(q, "FROM crypto_account ") || strings.Contains(q, "FROM crypto_secrets "))
		})
		if len(reads) != 1 {
			t.Errorf("the new ghost's set-up read its account and secrets in %d queries, want 1:\n%s", len(reads), strings.Join(reads, "\n"))
		}
		sent := r.sendAs(t, r.ghost, "first words")
		r.memberReads(t, sent, "first words")
		master := r.publishedMaster(ctx, t, r.ghost)

		r.keepsIdentityOverRestart(ctx, t, master)
	})
}

// TestNewGhostStoresItsSeedsWithItsAccount: a new ghost's cross-signing keys are stored in the statement that
// first stores its account (before its keys are uploaded, so a retry publishes the same identity), and they are
// the keys the homeserver publishes; the account as its upload left it is stored with the identity's signatures.
func TestNewGhostStoresItsSeedsWithItsAccount(t *testing.T) {
	onEachDevicePathLogged(t, func(ctx context.Context, t *testing.T, r *asRig, log *writeLog) {
		log.take()
		if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
			t.Fatal(err)
		}
		writes := slices.DeleteFunc(log.take("crypto_secrets", "crypto_account", "crypto_device"), func(w string) bool {
			return strings.HasPrefix(w, "UPDATE crypto_account SET sync_token=")
		})
		// The account with its device and cross-signing keys (and on the login path the ghost's password and
		// access token); then the device's signatures with the markers of the steps done and the account as its
		// upload left it (shared).
		if want := 2; len(writes) != want {
			t.Errorf("the new ghost's account, device, keys and markers were written in %d statements, want %d:\n%s", len(writes), 2, strings.Join(writes, "\n"))
		}
		r.storedIdentityIsPublished(ctx, t)
		sent := r.sendAs(t, r.ghost, "signed with stored keys")
		r.memberReads(t, sent, "signed with stored keys")
	})
}

// TestNewGhostKeepsItsIdentityAfterAFailedUpload: a new ghost's cross-signing keys, stored with its account
// before its device keys are uploaded, are the ones it publishes when that upload failed and the set-up runs
// again: the retry neither makes nor publishes another identity. (Through the appservice's clients, where the
// rig can fail a request; the login path stores the keys the same way.)
func TestNewGhostKeepsItsIdentityAfterAFailedUpload(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var published atomic.Int32
	opts := devicePaths()["appservice"]
	opts.BeforeRequest = func(route string, body []byte) {
		if route == "POST /_matrix/client/v3/keys/device_signing/upload" && strings.Contains(string(body), "ghost_alice") {
			published.Add(1)
		}
	}
	r := startASRig(ctx, t, opts, opts.SharedSecret)
	defer r.m.Stop()
	r.failGhostRequestOnce(t, "/keys/upload")
	if err := r.m.PrepareSender(ctx, r.ghost); err == nil {
		t.Fatal("the failed key upload did not reach the set-up")
	}
	stored, err := loadSeeds(ctx, newSecretCache(r.m.storeFor(r.ghost)))
	if err != nil || stored == nil {
		t.Fatalf("the ghost's cross-signing keys after the failed upload: %v, %v", stored, err)
	}
	if err = r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	if n := published.Load(); n != 1 {
		t.Errorf("the ghost's identity was published %d times, want once", n)
	}
	if master := r.publishedMaster(ctx, t, r.ghost); master != stored.MasterKey.PublicKey() {
		t.Errorf("the ghost published master key %s, not the one stored before the failed upload (%s)", master, stored.MasterKey.PublicKey())
	}
	sent := r.sendAs(t, r.ghost, "after the retry")
	if trust := r.memberReads(t, sent, "after the retry"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
	}
}

// TestNewGhostUploadsItsKeysOnceWhenItsIdentityFails: when publishing a new ghost's identity fails after its
// device keys were uploaded, the account is still stored as uploaded: the retry publishes the identity without
// uploading the device keys again.
func TestNewGhostUploadsItsKeysOnceWhenItsIdentityFails(t *testing.T) {
	for _, suffix := range []string{"/keys/device_signing/upload", "/keys/signatures/upload"} {
		t.Run(suffix, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var uploads atomic.Int32
			opts := devicePaths()["appservice"]
			opts.BeforeRequest = func(route string, body []byte) {
				if route == "POST /_matrix/client/v3/keys/upload" && strings.Contains(string(body), "device_keys") && strings.Contains(string(body), "ghost_alice") {
					uploads.Add(1)
				}
			}
			r := startASRig(ctx, t, opts, opts.SharedSecret)
			defer r.m.Stop()
			r.failGhostRequestOnce(t, suffix)
			if err := r.m.PrepareSender(ctx, r.ghost); err == nil {
				t.Fatal("the failed request did not reach the set-up")
			}
			if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
				t.Fatal(err)
			}
			if n := uploads.Load(); n != 1 {
				t.Errorf("the ghost's device keys were uploaded %d times, want once", n)
			}
			sent := r.sendAs(t, r.ghost, "after the retry")
			if trust := r.memberReads(t, sent, "after the retry"); trust != id.TrustStateCrossSignedTOFU {
				t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
			}
		})
	}
}

// failGhostRequestOnce makes the first request of ferry's appservice clients (the ghosts' devices) whose path
// ends in suffix fail with a 500.
func (r *asRig) failGhostRequestOnce(t *testing.T, suffix string) {
	fail := &failOnce{next: r.srv.Client().Transport, suffix: suffix}
	r.m.NewUserClient = func(u id.UserID) *mautrix.Client {
		cli := r.asClient(t, u)
		cli.Client = &http.Client{Transport: fail}
		return cli
	}
}

// restart stops the rig's Machine and starts a new one over the same database, as a restart of ferry does.
func (r *asRig) restart(ctx context.Context, t *testing.T) {
	t.Helper()
	r.m.Stop()
	r.m = r.newMachine(t)
	if err := r.m.Init(ctx); err != nil {
		t.Fatalf("start after a restart: %v", err)
	}
	r.m.Start(ctx)
}

// keepsIdentityOverRestart restarts the rig's Machine and checks that the member reads the ghost's next message
// and that the homeserver still publishes master as the ghost's master key.
func (r *asRig) keepsIdentityOverRestart(ctx context.Context, t *testing.T, master id.Ed25519) {
	t.Helper()
	r.restart(ctx, t)
	sent := r.sendAs(t, r.ghost, "after a restart")
	r.memberReads(t, sent, "after a restart")
	if now := r.publishedMaster(ctx, t, r.ghost); now != master {
		t.Errorf("after a restart the ghost's master key is %s, was %s", now, master)
	}
}

// storedIdentityIsPublished checks that the rig's ghost has cross-signing keys stored and that the homeserver
// publishes the stored master key.
func (r *asRig) storedIdentityIsPublished(ctx context.Context, t *testing.T) {
	t.Helper()
	keys, err := loadSeeds(ctx, newSecretCache(r.m.storeFor(r.ghost)))
	if err != nil || keys == nil {
		t.Fatalf("the ghost's stored cross-signing keys: %v, %v", keys, err)
	}
	if published := r.publishedMaster(ctx, t, r.ghost); keys.MasterKey.PublicKey() != published {
		t.Errorf("the stored master key is %s, the homeserver publishes %s", keys.MasterKey.PublicKey(), published)
	}
}

// publishedMaster is user's master key as the homeserver publishes it to the member.
func (r *asRig) publishedMaster(ctx context.Context, t *testing.T, user id.UserID) id.Ed25519 {
	t.Helper()
	resp, err := r.member.Client.QueryKeys(ctx, &mautrix.ReqQueryKeys{DeviceKeys: map[id.UserID]mautrix.DeviceIDList{user: nil}})
	if err != nil {
		t.Fatal(err)
	}
	master, ok := resp.MasterKeys[user]
	if !ok {
		t.Fatalf("the homeserver publishes no master key of %s", user)
	}
	return master.FirstKey()
}

// TestNewGhostOnSQLite: on SQLite, where no statement carries a new account's device, keys and uploaded state
// together, a new ghost is set up by the writes of their own, keeps its identity over a restart, and a member
// reads its messages with its device cross-signed by its owner.
func TestNewGhostOnSQLite(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := newASRigOn(t, fakehs.Options{CrossSigningUIA: true}, "", dbtest.Open(t, "sqlite3-fk-wal"))
	if err := r.m.Init(ctx); err != nil {
		t.Fatal(err)
	}
	r.m.Start(ctx)
	defer func() { r.m.Stop() }()
	sent := r.sendAs(t, r.ghost, "first words")
	if trust := r.memberReads(t, sent, "first words"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
	}
	master := r.publishedMaster(ctx, t, r.ghost)
	keys, err := loadSeeds(ctx, newSecretCache(r.m.storeFor(r.ghost)))
	if err != nil || keys == nil || keys.MasterKey.PublicKey() != master {
		t.Fatalf("stored cross-signing keys %v (%v), the homeserver publishes %s", keys, err, master)
	}
	r.keepsIdentityOverRestart(ctx, t, master)
}

// TestLoginPathPublishesAnIdentityInOneUpload: on the login path (Dendrite's), where the homeserver asks for the
// account password before it takes cross-signing keys, a new ghost sends its password with its first upload
// instead of waiting to be challenged: one request. A homeserver that takes the password only within the session
// of its challenge gets the upload again, answered in that session; the identity is published either way and a
// member sees the ghost's device cross-signed by its owner.
func TestLoginPathPublishesAnIdentityInOneUpload(t *testing.T) {
	for name, sessionRequired := range map[string]bool{"password taken at once": false, "session required": true} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var uploads atomic.Int32
			opts := devicePaths()["login"]
			opts.UIASessionRequired = sessionRequired
			opts.BeforeRequest = func(route string, body []byte) {
				if route == "POST /_matrix/client/v3/keys/device_signing/upload" && strings.Contains(string(body), "ghost_alice") {
					uploads.Add(1)
				}
			}
			r := startASRig(ctx, t, opts, opts.SharedSecret)
			defer r.m.Stop()
			if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
				t.Fatal(err)
			}
			want := int32(1)
			if sessionRequired {
				want = 2
			}
			if n := uploads.Load(); n != want {
				t.Errorf("the ghost's identity took %d uploads, want %d", n, want)
			}
			r.storedIdentityIsPublished(ctx, t)
			sent := r.sendAs(t, r.ghost, "first words")
			if trust := r.memberReads(t, sent, "first words"); trust != id.TrustStateCrossSignedTOFU {
				t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
			}
		})
	}
}

// TestLoginPathGhostKeepsItsDeviceAfterAFailedUpload: on the login path a new ghost's password and access token
// are stored with its account, before its device keys are uploaded. When that upload fails, the retry uses the
// same device: no second login and no second password, the identity published once; and after a restart the
// ghost still speaks from that device, without logging in again.
func TestLoginPathGhostKeepsItsDeviceAfterAFailedUpload(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var logins, resets, published atomic.Int32
	var failed atomic.Bool
	opts := devicePaths()["login"]
	opts.BeforeRequest = func(route string, body []byte) {
		ghost := strings.Contains(string(body), "ghost_alice")
		switch {
		case route == "POST /_matrix/client/v3/login" && ghost:
			logins.Add(1)
		case strings.HasPrefix(route, "POST /_dendrite/admin/resetPassword/"):
			resets.Add(1)
		case route == "POST /_matrix/client/v3/keys/device_signing/upload" && ghost:
			published.Add(1)
		}
	}
	opts.FailRequest = func(route string, body []byte) bool {
		return route == "POST /_matrix/client/v3/keys/upload" && strings.Contains(string(body), "ghost_alice") && failed.CompareAndSwap(false, true)
	}
	r := startASRig(ctx, t, opts, opts.SharedSecret)
	defer func() { r.m.Stop() }()
	resets.Store(0)
	if err := r.m.PrepareSender(ctx, r.ghost); err == nil {
		t.Fatal("the failed key upload did not reach the set-up")
	}
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	if l, p, n := logins.Load(), resets.Load(), published.Load(); l != 1 || p != 1 || n != 1 {
		t.Errorf("the ghost logged in %d times, got %d passwords and published its identity %d times; want once each", l, p, n)
	}
	devices := r.srv.Devices(r.ghost)
	sent := r.sendAs(t, r.ghost, "after the retry")
	if trust := r.memberReads(t, sent, "after the retry"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
	}
	r.restart(ctx, t)
	sent = r.sendAs(t, r.ghost, "after a restart")
	if trust := r.memberReads(t, sent, "after a restart"); trust != id.TrustStateCrossSignedTOFU {
		t.Errorf("after a restart the member's client sees the ghost's device as %s, want %s", trust, id.TrustStateCrossSignedTOFU)
	}
	if l, now := logins.Load(), r.srv.Devices(r.ghost); l != 1 || !slices.Equal(now, devices) {
		t.Errorf("after a restart the ghost logged in %d times in all and has devices %v, want once and %v", l, now, devices)
	}
}

// TestGhostsDeviceListsAreIgnored: the homeserver reports every new ghost device as a device-list change to the
// bot (the ghosts share its rooms): on the login path in the bot's /sync, on the appservice path in a
// transaction. ferry never shares room keys with its own ghosts nor reads what they send, so such a change is
// dropped before it is handled: no read and no key query about the ghost. A change of a member's devices in the
// same batch is still fetched.
func TestGhostsDeviceListsAreIgnored(t *testing.T) {
	for name, opts := range devicePaths() {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r, log := startASRigLogged(ctx, t, opts)
			defer r.m.Stop()
			if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
				t.Fatal(err)
			}
			r.sendAs(t, r.bot, "the member's devices are now tracked")
			queries := func() int64 { return r.srv.Counts()[routeKeysQuery] }
			change := func(users ...id.UserID) {
				if name == "login" {
					resp := &mautrix.RespSync{DeviceLists: mautrix.DeviceLists{Changed: users}}
					if err := r.m.client.Syncer.(*cryptoSyncer).ProcessResponse(ctx, resp, "since"); err != nil {
						t.Fatal(err)
					}
					return
				}
				raw, _ := json.Marshal(map[string]any{"events": []any{}, "device_lists": map[string]any{"changed": users}})
				if err := r.m.HandleTransactionCrypto(ctx, raw); err != nil {
					t.Fatal(err)
				}
			}
			log.takeReads("")
			before := queries()
			change(r.ghost)
			if reads, n := log.takeReads("crypto_tracked_user"), queries()-before; len(reads) != 0 || n != 0 {
				t.Errorf("a change of the ghost's device list made %d reads of tracked users and devices and %d key queries, want none:\n%s", len(reads), n, strings.Join(reads, "\n"))
			}
			change(r.ghost, r.member.ID)
			if queries() == before {
				t.Error("the member's changed device list was not fetched")
			}
		})
	}
}
