package fakehs

import (
	"context"
	"crypto/hmac"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

func TestMegolmBetweenCrossSignedUsers(t *testing.T) {
	ctx := context.Background()
	s := New(Options{})
	defer s.Close()
	alice, err := s.NewUser(ctx, "@alice:fakehs.test", UserOptions{CrossSign: true})
	if err != nil {
		t.Fatal(err)
	}
	bob, err := s.NewUser(ctx, "@bob:fakehs.test", UserOptions{CrossSign: true})
	if err != nil {
		t.Fatal(err)
	}
	// mautrix's default sharing policy: cross-signed (TOFU) devices only. Bob's device must qualify.
	alice.Machine.ShareKeysMinTrust = id.TrustStateCrossSignedTOFU
	enc := &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}
	room := s.CreateRoom(alice.ID, RoomOptions{Name: "test", Encryption: enc, Members: []id.UserID{bob.ID}})
	for _, u := range []*User{alice, bob} {
		if err = u.SetRoom(ctx, room, []id.UserID{alice.ID, bob.ID}, enc); err != nil {
			t.Fatal(err)
		}
	}
	content := &event.MessageEventContent{MsgType: event.MsgText, Body: "hello"}
	encrypted, shared, err := alice.Encrypt(ctx, room, event.EventMessage, content)
	if err != nil || !shared {
		t.Fatalf("Encrypt: shared=%v err=%v", shared, err)
	}
	if n := bob.ReceiveToDevice(ctx); n != 1 {
		t.Fatalf("bob received %d to-device events, want 1 room key", n)
	}
	resp, err := alice.Client.SendMessageEvent(ctx, room, event.EventEncrypted, encrypted)
	if err != nil {
		t.Fatal(err)
	}
	evt := &event.Event{ID: resp.EventID, RoomID: room, Sender: alice.ID, Type: event.EventEncrypted, Content: event.Content{Parsed: encrypted}}
	dec, err := bob.Decrypt(ctx, evt)
	if err != nil {
		t.Fatal(err)
	}
	if got := dec.Content.AsMessage().Body; got != "hello" {
		t.Fatalf("decrypted body %q", got)
	}
	if dec.Mautrix.TrustState != id.TrustStateCrossSignedTOFU {
		t.Errorf("trust state %s, want cross-signed TOFU", dec.Mautrix.TrustState)
	}
}

func TestSendDedupeMembershipAndCounts(t *testing.T) {
	ctx := context.Background()
	s := New(Options{})
	defer s.Close()
	var mu sync.Mutex
	var sent []SentEvent
	s.OnSend = func(e SentEvent) {
		mu.Lock()
		sent = append(sent, e)
		mu.Unlock()
	}
	alice, err := s.NewUser(ctx, "@alice:fakehs.test", UserOptions{})
	if err != nil {
		t.Fatal(err)
	}
	carol, err := s.NewUser(ctx, "@carol:fakehs.test", UserOptions{})
	if err != nil {
		t.Fatal(err)
	}
	room := s.CreateRoom(alice.ID, RoomOptions{})
	content := map[string]any{"msgtype": "m.text", "body": "x"}
	first, err := alice.Client.SendMessageEvent(ctx, room, event.EventMessage, content, mautrix.ReqSendEvent{TransactionID: "t1"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := alice.Client.SendMessageEvent(ctx, room, event.EventMessage, content, mautrix.ReqSendEvent{TransactionID: "t1"})
	if err != nil || again.EventID != first.EventID {
		t.Fatalf("retry gave %v, %v; want the first event %s", again, err, first.EventID)
	}
	if len(sent) != 1 || sent[0].TxnID != "t1" {
		t.Fatalf("OnSend saw %+v, want one event", sent)
	}
	if _, err = carol.Client.SendMessageEvent(ctx, room, event.EventMessage, content); !errorsIs(err, mautrix.MForbidden) {
		t.Fatalf("non-member send: %v, want M_FORBIDDEN", err)
	}
	if _, err = carol.Client.JoinRoomByID(ctx, room); !errorsIs(err, mautrix.MForbidden) {
		t.Fatalf("uninvited join: %v, want M_FORBIDDEN", err)
	}
	if _, err = alice.Client.InviteUser(ctx, room, &mautrix.ReqInviteUser{UserID: carol.ID}); err != nil {
		t.Fatal(err)
	}
	if _, err = carol.Client.JoinRoomByID(ctx, room); err != nil {
		t.Fatal(err)
	}
	if got := s.Counts()["PUT /_matrix/client/v3/rooms/{roomID}/send/{type}/{txnID}"]; got != 3 {
		t.Errorf("send count %d, want 3", got)
	}
}

func errorsIs(err error, target mautrix.RespError) bool {
	var httpErr mautrix.HTTPError
	return errors.As(err, &httpErr) && httpErr.RespError != nil && httpErr.RespError.ErrCode == target.ErrCode
}

func TestAppserviceTransactionsAndEcho(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var mu sync.Mutex
	var got []string
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer hs" {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		body, _ := io.ReadAll(r.Body)
		var txn struct {
			Events []struct {
				ID   string `json:"event_id"`
				Type string `json:"type"`
			} `json:"events"`
		}
		_ = json.Unmarshal(body, &txn)
		mu.Lock()
		for _, e := range txn.Events {
			got = append(got, e.Type)
		}
		mu.Unlock()
		_, _ = w.Write([]byte("{}"))
	}))
	defer as.Close()
	s := New(Options{ASID: "as", ASToken: "as", HSToken: "hs", ASBotLocalpart: "bot", ASUsers: regexp.MustCompile(`^@ghost_.*:fakehs\.test$`), AppserviceURL: as.URL})
	defer s.Close()
	room := s.CreateRoom("@alice:fakehs.test", RoomOptions{Public: true, Members: []id.UserID{s.BotID()}})
	raw, err := MakeEvent("$1", room, "@alice:fakehs.test", "m.room.message", map[string]any{"body": "hi"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	s.Deliver([]id.EventID{"$1"}, []json.RawMessage{raw})

	cli, _ := mautrix.NewClient(s.URL, "@ghost_a:fakehs.test", "as")
	cli.SetAppServiceUserID = true
	if _, err = cli.JoinRoomByID(ctx, room); err == nil {
		t.Fatal("an unregistered appservice user could join")
	}
	if _, _, err = cli.Register(ctx, &mautrix.ReqRegister[any]{Username: "ghost_a", Type: mautrix.AuthTypeAppservice, InhibitLogin: true}); err != nil {
		t.Fatal(err)
	}
	if _, err = cli.JoinRoomByID(ctx, room); err != nil {
		t.Fatal(err)
	}
	if err = s.WaitAppserviceIdle(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || got[0] != "m.room.message" || got[1] != "m.room.member" {
		t.Fatalf("appservice received %v, want the delivered message and the ghost's join", got)
	}
}

func TestSharedSecretRegistrationAndCrossSigningUIA(t *testing.T) {
	ctx := context.Background()
	s := New(Options{SharedSecret: "secret", CrossSigningUIA: true})
	defer s.Close()
	cli, _ := mautrix.NewClient(s.URL, "", "")
	var nonce struct {
		Nonce string `json:"nonce"`
	}
	url := cli.BuildURL(mautrix.SynapseAdminURLPath{"v1", "register"})
	if _, err := cli.MakeRequest(ctx, http.MethodGet, url, nil, &nonce); err != nil {
		t.Fatal(err)
	}
	register := func(nonce, name, mac string) error {
		_, err := cli.MakeRequest(ctx, http.MethodPost, url, map[string]any{"nonce": nonce, "username": name, "password": "pw", "admin": false, "mac": mac}, nil)
		return err
	}
	if err := register(nonce.Nonce, "carol", "00"); err == nil {
		t.Fatal("a wrong MAC was accepted")
	}
	if _, err := cli.MakeRequest(ctx, http.MethodGet, url, nil, &nonce); err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha1.New, []byte("secret"))
	mac.Write([]byte(nonce.Nonce + "\x00carol\x00pw\x00notadmin"))
	if err := register(nonce.Nonce, "carol", hex.EncodeToString(mac.Sum(nil))); err != nil {
		t.Fatal(err)
	}
	// Cross-signing needs the password: a User (which knows its own) manages; a wrong password does not.
	if _, err := s.NewUser(ctx, "@dave:fakehs.test", UserOptions{CrossSign: true}); err != nil {
		t.Fatal(err)
	}
	carol, _ := mautrix.NewClient(s.URL, "", "")
	if _, err := carol.Login(ctx, &mautrix.ReqLogin{Type: mautrix.AuthTypePassword, Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: "carol"}, Password: "pw", StoreCredentials: true}); err != nil {
		t.Fatal(err)
	}
	err := carol.UploadCrossSigningKeys(ctx, &mautrix.UploadCrossSigningKeysReq[any]{}, passwordUIA(carol.UserID, "wrong"))
	if err == nil {
		t.Fatal("a wrong password passed the cross-signing UIA")
	}
	if err = carol.UploadCrossSigningKeys(ctx, &mautrix.UploadCrossSigningKeysReq[any]{}, passwordUIA(carol.UserID, "pw")); err != nil {
		t.Fatal(err)
	}
}

// TestSyncWakesForKeyChangesOfRoomMates: a /sync waiting on a device returns when a user who shares a room with its
// owner uploads keys, listing that user and not a user it shares no room with (whose upload came first and did not
// end the wait); a room mate who left is no longer listed.
func TestSyncWakesForKeyChangesOfRoomMates(t *testing.T) {
	ctx := context.Background()
	s := New(Options{})
	defer s.Close()
	alice, err := s.NewUser(ctx, "@alice:fakehs.test", UserOptions{})
	if err != nil {
		t.Fatal(err)
	}
	room := s.CreateRoom(alice.ID, RoomOptions{Name: "shared", Members: []id.UserID{"@dave:fakehs.test"}})
	waitChanged := func(step string, since string, upload func()) (*mautrix.RespSync, string) {
		t.Helper()
		type result struct {
			resp *mautrix.RespSync
			err  error
		}
		done := make(chan result, 1)
		calls := len(s.SyncCalls())
		go func() {
			resp, err := alice.Client.SyncRequest(ctx, 300000, since, "", false, "")
			done <- result{resp, err}
		}()
		for len(s.SyncCalls()) == calls {
			time.Sleep(time.Millisecond)
		}
		upload()
		select {
		case r := <-done:
			if r.err != nil {
				t.Fatalf("%s: %v", step, r.err)
			}
			return r.resp, r.resp.NextBatch
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: the waiting /sync was not woken", step)
		}
		return nil, ""
	}
	first, err := alice.Client.SyncRequest(ctx, 0, "", "", false, "")
	if err != nil {
		t.Fatal(err)
	}
	resp, next := waitChanged("a room mate's keys", first.NextBatch, func() {
		if _, err := s.NewUser(ctx, "@carol:fakehs.test", UserOptions{}); err != nil { // no room with alice
			t.Error(err)
		}
		if _, err := s.NewUser(ctx, "@dave:fakehs.test", UserOptions{}); err != nil {
			t.Error(err)
		}
	})
	if got := resp.DeviceLists.Changed; len(got) != 1 || got[0] != "@dave:fakehs.test" {
		t.Errorf("the /sync listed %v as changed, want dave only", got)
	}

	if err = s.SetState(room, "@dave:fakehs.test", event.StateMember.Type, "@dave:fakehs.test", map[string]any{"membership": "leave"}); err != nil {
		t.Fatal(err)
	}
	resp, _ = waitChanged("after the room mate left", next, func() {
		if _, err := s.NewUser(ctx, "@dave:fakehs.test", UserOptions{DeviceID: "SECOND"}); err != nil {
			t.Error(err)
		}
		if _, err := s.NewUser(ctx, "@alice:fakehs.test", UserOptions{DeviceID: "SECOND"}); err != nil {
			t.Error(err)
		}
	})
	if got := resp.DeviceLists.Changed; len(got) != 1 || got[0] != alice.ID {
		t.Errorf("the /sync listed %v as changed, want alice's own only", got)
	}
}
