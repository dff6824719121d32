// Package dbtest opens throwaway databases for tests: a fresh Postgres database on the server named by
// FERRY_TEST_PG (which `make test` always sets, starting a private server when none runs), or a SQLite file in
// the test's temp dir. Tests that need Postgres fail, not skip, when FERRY_TEST_PG is unset.
package dbtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	_ "github.com/lib/pq"
	"go.mau.fi/util/dbutil"
	_ "go.mau.fi/util/dbutil/litestream"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/faultproxy"
)

// EnvPostgres names the environment variable holding an admin connection URL to a Postgres server.
const EnvPostgres = "FERRY_TEST_PG"

// Dialects lists the database types the store suites run against.
var Dialects = []string{"postgres", "sqlite3-fk-wal"}

// Open returns a fresh, empty database of the given type that is removed when the test ends.
func Open(t testing.TB, dbType string) *dbutil.Database {
	t.Helper()
	switch dbType {
	case "postgres":
		return Postgres(t)
	case "sqlite3-fk-wal":
		return SQLite(t)
	}
	t.Fatalf("unknown database type %q", dbType)
	return nil
}

// PostgresURI creates a fresh database and returns its URI; it is dropped when the test ends.
func PostgresURI(t testing.TB) string {
	t.Helper()
	admin := os.Getenv(EnvPostgres)
	if admin == "" {
		t.Fatalf("%s is not set: run the tests with `make test` (it starts PostgreSQL when none runs) or set it to an admin URL such as postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable", EnvPostgres)
	}
	adminDB, err := sql.Open("postgres", admin)
	if err != nil {
		t.Fatalf("open %s: %v", EnvPostgres, err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "ferry_test_" + hex.EncodeToString(b)
	if _, err = adminDB.Exec(`CREATE DATABASE ` + name); err != nil {
		_ = adminDB.Close()
		t.Fatalf("create test database via %s: %v", EnvPostgres, err)
	}
	t.Cleanup(func() {
		_, _ = adminDB.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`)
		_ = adminDB.Close()
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("parse %s: %v", EnvPostgres, err)
	}
	u.Path = "/" + name
	return u.String()
}

// Postgres returns a fresh Postgres database, opened as cmd/ferry opens one (ferry's driver, one round trip per
// statement).
func Postgres(t testing.TB) *dbutil.Database {
	t.Helper()
	return open(t, database.TuneURI("postgres", PostgresURI(t)), database.DriverFor("postgres"))
}

// SetConnectWait shortens how long a statement waits for a database that refuses connections (30 s in ferry),
// for tests of outages longer than that wait; the returned function restores it.
func SetConnectWait(d time.Duration) (restore func()) { return database.SetConnectWait(d) }

// PostgresThroughProxy is Postgres, reached through a TCP proxy the test can cut (proxy.Down, then Up) to make
// the database go away and come back, as a restarting server does.
func PostgresThroughProxy(t testing.TB) (*dbutil.Database, *faultproxy.TCP) {
	t.Helper()
	u, err := url.Parse(PostgresURI(t))
	if err != nil {
		t.Fatal(err)
	}
	proxy, err := faultproxy.NewTCP(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	u.Host = proxy.Addr()
	return open(t, database.TuneURI("postgres", u.String()), database.DriverFor("postgres")), proxy
}

// SQLite returns a fresh SQLite database in the test's temp dir.
func SQLite(t testing.TB) *dbutil.Database {
	t.Helper()
	return open(t, "file:"+filepath.Join(t.TempDir(), "ferry.db")+"?_txlock=immediate", "sqlite3-fk-wal")
}

func open(t testing.TB, uri, dbType string) *dbutil.Database {
	t.Helper()
	db, err := dbutil.NewWithDialect(uri, dbType)
	if err != nil {
		t.Fatalf("open %s database: %v", dbType, err)
	}
	if err = db.RawDB.PingContext(context.Background()); err != nil {
		t.Fatalf("ping %s database: %v", dbType, err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}
