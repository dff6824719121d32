package database_test

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"go.mau.fi/util/dbutil"

	"go.ferry.im/ferry/database"
)

// TestSQLiteFileIsPrivateAndSynced: the SQLite database ferry opens is created readable by its user only (its
// write-ahead log too, whatever the umask), and every commit is synced to disk before it is acknowledged.
func TestSQLiteFileIsPrivateAndSynced(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "ferry.db")
	uri := "file:" + path + "?_txlock=immediate"
	if err := database.PrepareFile("sqlite3-fk-wal", uri); err != nil {
		t.Fatal(err)
	}
	root, err := dbutil.NewWithDialect(uri, database.DriverFor("sqlite3-fk-wal"))
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	ctx := context.Background()
	db := database.New(root, dbutil.NoopLogger)
	if err = db.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	if err = db.KV.Set(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{path, path + "-wal", path + "-shm"} {
		info, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if mode := info.Mode().Perm(); mode != 0o600 {
			t.Errorf("%s has mode %o, want 600", filepath.Base(f), mode)
		}
	}
	var sync int
	if err = root.QueryRow(ctx, "PRAGMA synchronous").Scan(&sync); err != nil || sync != 2 {
		t.Fatalf("PRAGMA synchronous = %d (%v), want 2 (FULL)", sync, err)
	}
	// An existing file is left as it is (its owner chose its mode); Postgres needs nothing.
	if err = os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	if err = database.PrepareFile("sqlite3-fk-wal", uri); err != nil {
		t.Fatal(err)
	}
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o640 {
		t.Error("PrepareFile changed an existing file")
	}
	if err = database.PrepareFile("postgres", "postgres://x/y"); err != nil {
		t.Fatal(err)
	}
}
