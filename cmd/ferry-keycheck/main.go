// Command ferry-keycheck tells whether anything in ferry's database can decrypt a Megolm-encrypted event. It
// opens the crypto store with the database and pickle key of ferry's config, looks up every stored copy of the
// event's session (under the bot's and every ghost's account) and tries to decrypt the ciphertext with each.
// It prints one JSON line and never the plaintext:
//
//	ferry-keycheck -c config.yaml event.json      (or the event JSON on stdin)
//	{"event_id":"$…","room_id":"!…","session_id":"…","stored_copies":1,"decryptable":true}
//
// The exit status is 0 when the check ran (whatever its result) and 2 when it could not run. The config is read
// like ferry reads it, FERRY_* environment overrides included (FERRY_DATABASE_URI, FERRY_ENCRYPTION_PICKLE_KEY).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/lib/pq"
	"go.mau.fi/util/dbutil"
	_ "go.mau.fi/util/dbutil/litestream" // registers the sqlite3-fk-wal driver
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/config"
)

// result is the one line ferry-keycheck prints.
type result struct {
	EventID      id.EventID   `json:"event_id"`
	RoomID       id.RoomID    `json:"room_id"`
	SessionID    id.SessionID `json:"session_id"`
	StoredCopies int          `json:"stored_copies"`
	Decryptable  bool         `json:"decryptable"`
	Reason       string       `json:"reason,omitempty"`
}

func main() {
	configPath := flag.String("c", "config.yaml", "ferry's config file")
	flag.Parse()
	if err := run(*configPath, flag.Arg(0)); err != nil {
		fmt.Fprintln(os.Stderr, "ferry-keycheck:", err)
		os.Exit(2)
	}
}

// loadConfig reads ferry's config the way ferry does (strict, with FERRY_* overrides) and checks that it names a
// database and a pickle key ferry has generated or been given.
func loadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	if cfg.Encryption.PickleKey == crypto.PickleKeyGenerate {
		return nil, errors.New("encryption.pickle_key is not set yet (ferry writes it into the config on first start)")
	}
	return cfg, nil
}

func readEvent(path string) (*event.Event, *event.EncryptedEventContent, error) {
	var data []byte
	var err error
	if path == "" || path == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, nil, err
	}
	var evt event.Event
	if err = json.Unmarshal(data, &evt); err != nil {
		return nil, nil, fmt.Errorf("the event is not valid JSON: %w", err)
	}
	if evt.Type != event.EventEncrypted || evt.RoomID == "" {
		return nil, nil, fmt.Errorf("want an m.room.encrypted event with room_id, got type %q", evt.Type.Type)
	}
	var content event.EncryptedEventContent
	if err = json.Unmarshal(evt.Content.VeryRaw, &content); err != nil {
		return nil, nil, fmt.Errorf("the event's content is not Megolm ciphertext: %w", err)
	}
	if content.Algorithm != id.AlgorithmMegolmV1 || content.SessionID == "" || len(content.MegolmCiphertext) == 0 {
		return nil, nil, fmt.Errorf("the event is not Megolm-encrypted (algorithm %q)", content.Algorithm)
	}
	return &evt, &content, nil
}

func run(configPath, eventPath string) error {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return err
	}
	evt, content, err := readEvent(eventPath)
	if err != nil {
		return err
	}
	mcrypto.PostgresArrayWrapper = pq.Array
	db, err := dbutil.NewFromConfig("ferry-keycheck", dbutil.Config{PoolConfig: dbutil.PoolConfig{Type: database.DriverFor(cfg.Database.Type), URI: database.TuneURI(cfg.Database.Type, cfg.Database.URI), MaxOpenConns: 2}}, dbutil.NoopLogger)
	if err != nil {
		return fmt.Errorf("failed to open the database: %w", err)
	}
	defer db.Close()
	ctx := context.Background()
	accounts, err := crypto.StoredCopiesOf(ctx, db, evt.RoomID, content.SessionID)
	if err != nil {
		return fmt.Errorf("failed to read the crypto store: %w", err)
	}
	res := result{EventID: evt.ID, RoomID: evt.RoomID, SessionID: content.SessionID, StoredCopies: len(accounts)}
	if len(accounts) == 0 {
		res.Reason = "no key of this session is stored"
	}
	for _, account := range accounts {
		store := mcrypto.NewSQLCryptoStore(db, dbutil.NoopLogger, account, "", []byte(cfg.Encryption.PickleKey))
		sess, err := store.GetGroupSession(ctx, evt.RoomID, content.SessionID)
		if err != nil {
			res.Reason = fmt.Sprintf("a stored copy could not be read: %v", err)
			continue
		} else if sess == nil || sess.Internal == nil {
			continue
		}
		// The plaintext is discarded: only whether decryption succeeds matters.
		if _, _, err = sess.Internal.Decrypt(content.MegolmCiphertext); err == nil {
			res.Decryptable, res.Reason = true, ""
			break
		}
		res.Reason = fmt.Sprintf("the stored key does not decrypt it: %v", err)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	return nil
}
