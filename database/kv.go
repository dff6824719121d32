package database

import (
	"context"
	"database/sql"
	"errors"

	"go.mau.fi/util/dbutil"
)

// SQL on kv_store.
const (
	getKVQuery    = `SELECT value FROM kv_store WHERE key=$1`
	setKVQuery    = `INSERT INTO kv_store (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value=excluded.value`
	deleteKVQuery = `DELETE FROM kv_store WHERE key=$1`
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
