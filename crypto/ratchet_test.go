package crypto

import (
	"context"
	"errors"
	"testing"

	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/event"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestRatchetInboundSession: a member sends three messages on one Megolm session. After ferry ratchets its copy
// of the session to index 2, the first two no longer decrypt from ferry's store, the third still does; a copy of
// the session with an earlier index, imported again, is ratcheted back by the same call.
func TestRatchetInboundSession(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := startASRig(ctx, t, fakehs.Options{CrossSigningUIA: true}, "")
	defer r.m.Stop()
	msgs := []*event.Event{r.memberSends(t, "zero"), r.memberSends(t, "one"), r.memberSends(t, "two")}
	// In appservice mode the room key reaches the bot in the homeserver's next transaction.
	if err := r.m.HandleTransactionCrypto(ctx, r.srv.TakeAppserviceTransaction()); err != nil {
		t.Fatal(err)
	}
	for i, msg := range msgs {
		idx, err := MegolmMessageIndex(msg.Content.AsEncrypted())
		if err != nil || int(idx) != i {
			t.Fatalf("message %d: index %d, %v", i, idx, err)
		}
		if _, err := r.m.Decrypt(ctx, msg); err != nil {
			t.Fatalf("message %d does not decrypt before the ratchet: %v", i, err)
		}
	}
	session := msgs[0].Content.AsEncrypted().SessionID
	// Keep a copy of the session as it arrived (index 0), as a key request or forward would bring it back.
	early, err := r.m.storeFor(r.bot).GetGroupSession(ctx, r.room, session)
	if err != nil || early == nil {
		t.Fatalf("no stored copy: %v", err)
	}
	n, err := r.m.RatchetInboundSession(ctx, r.room, session, 2)
	if err != nil || n < 1 {
		t.Fatalf("RatchetInboundSession = %d, %v", n, err)
	}
	check := func(when string) {
		t.Helper()
		for i, msg := range msgs {
			_, err := r.m.Decrypt(ctx, msg)
			if i < 2 && !errors.Is(err, olm.ErrUnknownMessageIndex) {
				t.Errorf("%s: message %d below the floor: %v, want unknown message index", when, i, err)
			} else if i == 2 && err != nil {
				t.Errorf("%s: message %d at the floor no longer decrypts: %v", when, i, err)
			}
		}
	}
	check("after the ratchet")
	if n, _ = r.m.RatchetInboundSession(ctx, r.room, session, 2); n != 0 {
		t.Errorf("a second ratchet to the same floor changed %d copies", n)
	}
	// The early copy comes back: stored again, it decrypts message 0 until ferry ratchets it to the floor.
	if err = r.m.storeFor(r.bot).PutGroupSession(ctx, early); err != nil {
		t.Fatal(err)
	}
	r.m.cache.forgetSession(r.room, session)
	if _, err = r.m.Decrypt(ctx, msgs[0]); err != nil {
		t.Fatalf("the re-imported early copy does not decrypt message 0 (test setup): %v", err)
	}
	if n, err = r.m.RatchetInboundSession(ctx, r.room, session, 2); err != nil || n < 1 {
		t.Fatalf("ratchet of the re-imported copy = %d, %v", n, err)
	}
	check("after the re-imported copy was ratcheted")
}
