package database

import (
	"context"
	"database/sql"
	"errors"
	"strings"

	"go.mau.fi/util/dbutil"
)

// SQL on kv_store.
const (
	getKVQuery    = `SELECT value FROM kv_store WHERE key=$1`
	setKVQuery    = `INSERT INTO kv_store (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value=excluded.value`
	deleteKVQuery = `DELETE FROM kv_store WHERE key=$1`
	// LIKE narrows the scan; the exact prefix is checked in Go (SQLite's LIKE ignores case, and _ matches anything).
	prefixedKVQuery = `SELECT key, value FROM kv_store WHERE key LIKE $1`
)

// KVQuery stores small durable facts. Never message plaintext.
type KVQuery struct {
	db *dbutil.Database
}

// Get returns the value for key, or "" when unset.
func (kq *KVQuery) Get(ctx context.Context, key string) (string, error) {
	var v string
	err := kq.db.QueryRow(ctx, getKVQuery, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	return v, err
}

// Set stores a value.
func (kq *KVQuery) Set(ctx context.Context, key, value string) error {
	_, err := kq.db.Exec(ctx, setKVQuery, key, value)
	return err
}

// Delete removes a key.
func (kq *KVQuery) Delete(ctx context.Context, key string) error {
	_, err := kq.db.Exec(ctx, deleteKVQuery, key)
	return err
}

// Prefixed returns every key starting with prefix, with its value. For families of facts that are few (such as
// removals by moderators) and read far more often than written.
func (kq *KVQuery) Prefixed(ctx context.Context, prefix string) (map[string]string, error) {
	rows, err := kq.db.Query(ctx, prefixedKVQuery, prefix+"%")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make(map[string]string)
	for rows.Next() {
		var k, v string
		if err = rows.Scan(&k, &v); err != nil {
			return nil, err
		}
		if strings.HasPrefix(k, prefix) {
			out[k] = v
		}
	}
	return out, rows.Err()
}
