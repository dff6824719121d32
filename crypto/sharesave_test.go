package crypto

import (
	"context"
	"strings"
	"testing"

	"go.ferry.im/ferry/internal/fakehs"
)

// TestShareSavedInOneStatement: a ghost's key share stores the Olm session it created and the member's device as
// a recipient of the Megolm session in one statement on Postgres, where a transaction took four (BEGIN, two
// inserts, COMMIT); what it stored lets the member read the message, and the session is not shared again.
func TestShareSavedInOneStatement(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, log := startASRigLogged(ctx, t, fakehs.Options{})
	defer r.m.Stop()
	if err := r.m.PrepareSender(ctx, r.ghost); err != nil {
		t.Fatal(err)
	}
	log.takeAll()
	sent := r.sendAs(t, r.ghost, "shared once")
	var share, txn []string
	for _, w := range log.takeAll() {
		switch {
		case w == "BEGIN" || w == "COMMIT":
			txn = append(txn, w)
		case strings.Contains(w, "crypto_olm_session ") || strings.Contains(w, "crypto_megolm_outbound_session_shared "):
			share = append(share, w)
		}
	}
	if len(share) != 1 || len(txn) != 0 {
		t.Errorf("the share was stored in %d statements and %d transaction statements, want 1 and 0:\n%s", len(share), len(txn), strings.Join(append(share, txn...), "\n"))
	}
	r.memberReads(t, sent, "shared once")
	var recipients, sessions int
	if err := r.db.QueryRow(ctx, `SELECT COUNT(*) FROM crypto_megolm_outbound_session_shared WHERE session_id=$1`, sent.Content.AsEncrypted().SessionID).Scan(&recipients); err != nil {
		t.Fatal(err)
	}
	if err := r.db.QueryRow(ctx, `SELECT COUNT(*) FROM crypto_olm_session WHERE account_id=$1`, string(r.ghost)).Scan(&sessions); err != nil {
		t.Fatal(err)
	}
	if recipients != 1 || sessions != 1 {
		t.Errorf("stored %d recipients of the session and %d Olm sessions of the ghost, want 1 and 1", recipients, sessions)
	}
	log.takeAll()
	again := r.sendAs(t, r.ghost, "no second share")
	for _, w := range log.takeAll() {
		if strings.Contains(w, "crypto_olm_session ") || strings.Contains(w, "crypto_megolm_outbound_session_shared ") {
			t.Errorf("the second message wrote %q", w)
		}
	}
	r.memberReads(t, again, "no second share")
}
