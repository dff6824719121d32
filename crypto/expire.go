package crypto

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// DiscardOutboundSession discards one outbound Megolm session (whichever of ferry's devices owns it), so the
// device's next message in the room starts a new one. The inbound copy stays: it is deleted with
// DestroySession once the messages sent with it expired.
func (m *Machine) DiscardOutboundSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) error {
	// A discard is a forced rotation: successors shared ahead of time in the room go too.
	dropped := m.cache.dropNext(roomID)
	_, err := m.db.Exec(ctx, sqlDeleteOutbound, roomID, sessionID)
	// Outbound sessions live in memory between writes (storecache.go): forgetting the row alone would let the
	// device go on encrypting with it.
	m.cache.forgetSession(roomID, sessionID)
	if err != nil {
		return err
	}
	return m.cache.forgetSuccessors(ctx, m.db, dropped)
}

// DestroySession deletes every stored key of a Megolm session in a room: the outbound session when ferry owns
// it, and the inbound session under every account in the crypto store (the bot's and each ghost's device may
// hold a copy). Afterwards nothing in ferry's database decrypts messages sent with the session. It returns how
// many rows held key material.
func (m *Machine) DestroySession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (int64, error) {
	// Successors shared ahead of time in the room go too, before the key they would follow is deleted.
	dropped := m.cache.dropNext(roomID)
	var total int64
	err := m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, q := range []string{sqlDeleteOutbound, sqlDeleteInbound} {
			res, err := m.db.Exec(ctx, q, roomID, sessionID)
			if err != nil {
				return err
			}
			n, _ := res.RowsAffected()
			total += n
		}
		// Who the session was shared with; no key material, but nothing to keep once the key is gone.
		_, err := m.db.Exec(ctx, sqlDeleteSessionShared, sessionID)
		return err
	})
	// Also from memory, where the relay's decryption and the device's encryption would still find it.
	m.cache.forgetSession(roomID, sessionID)
	if err != nil {
		return 0, fmt.Errorf("failed to delete the keys of session %s: %w", sessionID, err)
	}
	return total, m.cache.forgetSuccessors(ctx, m.db, dropped)
}

// DestroyLateCopies deletes copies of an already destroyed session that ghost devices received after it was
// destroyed (their to-device messages are drained in the background). The bot's copy is left alone: the bot
// only receives the key again when ferry asked for it, to decrypt a later message sent with the session.
func (m *Machine) DestroyLateCopies(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (int64, error) {
	res, err := m.db.Exec(ctx, sqlDeleteGhostInbound, roomID, sessionID, botAccountID)
	m.cache.forgetGhostCopies(roomID, sessionID)
	if err != nil {
		return 0, fmt.Errorf("failed to delete late copies of session %s: %w", sessionID, err)
	}
	return res.RowsAffected()
}

// MegolmMessageIndex reads the message index of a Megolm-encrypted event from its ciphertext (the index is sent in
// the clear; no key is needed).
func MegolmMessageIndex(content *event.EncryptedEventContent) (uint32, error) {
	if content == nil || content.Algorithm != id.AlgorithmMegolmV1 {
		return 0, errors.New("not a Megolm event")
	}
	raw, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(string(content.MegolmCiphertext), "="))
	if err != nil {
		return 0, fmt.Errorf("ciphertext is not base64: %w", err)
	}
	return megolmCiphertextIndex(raw)
}

// RatchetInboundSession moves every stored copy of a Megolm session (under every account: the bot's and each
// ghost's device may hold one) forward so that it starts at floor: messages with a lower index no longer decrypt
// from ferry's database, later ones still do. Copies that start at floor or later are left alone. It returns how
// many copies it ratcheted.
func (m *Machine) RatchetInboundSession(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, floor uint32) (int, error) {
	rows, err := m.db.Query(ctx, sqlInboundCopyAccounts, roomID, sessionID)
	accounts, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[string], err).AsList()
	if err != nil {
		return 0, fmt.Errorf("failed to list the copies of session %s: %w", sessionID, err)
	}
	n := 0
	for _, account := range accounts {
		store := &cachedStore{SQLCryptoStore: crypto.NewSQLCryptoStore(m.db, m.dbLog, account, "", []byte(m.cfg.PickleKey)), c: m.cache}
		sess, err := store.GetGroupSession(ctx, roomID, sessionID)
		if err != nil || sess == nil || sess.Internal == nil {
			if err != nil && !errors.Is(err, crypto.ErrGroupSessionWithheld) {
				return n, fmt.Errorf("failed to load a copy of session %s: %w", sessionID, err)
			}
			continue
		}
		if sess.Internal.FirstKnownIndex() >= floor {
			continue
		}
		if err = sess.RatchetTo(floor); err != nil {
			return n, fmt.Errorf("failed to ratchet a copy of session %s: %w", sessionID, err)
		}
		if err = store.PutGroupSession(ctx, sess); err != nil {
			return n, fmt.Errorf("failed to store a ratcheted copy of session %s: %w", sessionID, err)
		}
		n++
	}
	return n, nil
}
