// Package database owns ferry's own tables (inbox, links, event map, key-value facts) and their numbered
// upgrades. They live beside mautrix's crypto store and state store in the same database, each with its own
// version table. This package never imports bridge or crypto, and never stores message plaintext: the inbox
// holds events exactly as the homeserver delivered them (ciphertext in encrypted rooms) and drops the payload
// once an event is relayed.
package database

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"

	"go.mau.fi/util/dbutil"
)

// VersionTable is the name of ferry's own schema version table.
const VersionTable = "ferry_version"

//go:embed upgrades/*.sql
var upgrades embed.FS

// UpgradeTable is ferry's schema history.
var UpgradeTable = dbutil.BuildUpgradeTable().WithFSPath(upgrades, "upgrades").Finish()

// Database is ferry's view of its own tables.
type Database struct {
	*dbutil.Database
	Inbox    *InboxQuery
	Links    *LinkQuery
	EventMap *EventMapQuery
	KV       *KVQuery
	// Disappear holds disappearing-message deadlines and the sessions that carried such messages.
	Disappear *DisappearQuery
	Calls     *CallQuery
	// Consent holds actions that wait for consent in the rooms they act on.
	Consent *ConsentQuery
	// Readback names the rooms to read back before the next send into them.
	Readback *ReadbackQuery
	// FoundSends keeps the unanswered sends read-backs found until ferry recorded them.
	FoundSends *FoundSendQuery
	// root is the database this one is a child of: its connections log through root's logger
	root *dbutil.Database
}

// New wraps a root database handle. The handle may be shared with the crypto and state stores (each uses its
// own version table via Child).
func New(root *dbutil.Database, log dbutil.DatabaseLogger) *Database {
	db := root.Child(VersionTable, UpgradeTable, log)
	return &Database{
		Database:   db,
		root:       root,
		Inbox:      &InboxQuery{db: db},
		Links:      &LinkQuery{db: db},
		EventMap:   &EventMapQuery{db: db},
		KV:         &KVQuery{db: db},
		Disappear:  &DisappearQuery{db: db},
		Calls:      &CallQuery{db: db},
		Consent:    &ConsentQuery{db: db},
		Readback:   &ReadbackQuery{db: db},
		FoundSends: &FoundSendQuery{db: db},
	}
}

// sqliteDriver is the database.type of SQLite, and sqliteFullSyncDriver the driver ferry opens it with: the same
// (foreign keys, write-ahead log) with synchronous=FULL, so a transaction ferry acknowledged (an event it told the
// homeserver it recorded) survives a power loss; the default NORMAL may lose the last ones.
const (
	sqliteDriver         = "sqlite3-fk-wal"
	sqliteFullSyncDriver = "sqlite3-fk-wal-fullsync"
)

// DriverFor returns the database/sql driver ferry opens a database.type with (PostgresDriver for postgres).
func DriverFor(dbType string) string {
	switch dbType {
	case "postgres":
		return PostgresDriver
	case sqliteDriver:
		return sqliteFullSyncDriver
	}
	return dbType
}

// sqliteFileMode is the mode of a SQLite database file ferry creates: it holds encrypted keys, the inbox and
// the links, readable by ferry's user only. SQLite gives its -wal and -shm files the database file's mode.
const sqliteFileMode os.FileMode = 0o600

// PrepareFile creates the file of a SQLite database (a file: URI) with mode 0600 when it does not exist yet, so
// SQLite does not create it with the process's umask. Other database types need nothing.
func PrepareFile(dbType, uri string) error {
	if dbType != sqliteDriver {
		return nil
	}
	path := sqlitePath(uri)
	if path == "" {
		return nil
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, sqliteFileMode)
	if errors.Is(err, os.ErrExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("failed to create the database file %s: %w", path, err)
	}
	return f.Close()
}

// sqlitePath returns the file of a SQLite URI ("file:ferry.db?..." or "file:///var/lib/ferry.db"), or "" for an
// in-memory database.
func sqlitePath(uri string) string {
	rest, ok := strings.CutPrefix(uri, "file:")
	if !ok {
		rest = uri
	}
	rest, query, _ := strings.Cut(rest, "?")
	if strings.Contains(query, "mode=memory") || rest == ":memory:" || rest == "" {
		return ""
	}
	if u, err := url.Parse("file:" + rest); err == nil && strings.HasPrefix(rest, "//") {
		return u.Path
	}
	return rest
}

// TuneURI adjusts a database URI for ferry's access pattern: on Postgres (lib/pq), binary_parameters=yes sends
// a parameterised statement in one round trip instead of two (Parse/Describe, then Bind/Execute). A value the
// URI already sets is kept.
func TuneURI(dbType, uri string) string {
	if dbType != "postgres" || strings.Contains(uri, "binary_parameters=") {
		return uri
	}
	if strings.HasPrefix(uri, "postgres://") || strings.HasPrefix(uri, "postgresql://") {
		if strings.Contains(uri, "?") {
			return uri + "&binary_parameters=yes"
		}
		return uri + "?binary_parameters=yes"
	}
	// key=value connection string
	return uri + " binary_parameters=yes"
}

// UpgradeError says which schema failed to upgrade; cmd/ferry turns it into an exit code.
type UpgradeError struct {
	Section string
	Err     error
}

func (e UpgradeError) Error() string {
	if errors.Is(e.Err, dbutil.ErrUnsupportedDatabaseVersion) {
		return fmt.Sprintf("the %s tables were written by a newer ferry than this one (%v); upgrade ferry or restore a backup", e.Section, e.Err)
	}
	return fmt.Sprintf("failed to upgrade %s tables: %v", e.Section, e.Err)
}

func (e UpgradeError) Unwrap() error { return e.Err }

// Upgrade brings ferry's tables to the latest schema.
func (db *Database) Upgrade(ctx context.Context) error {
	if err := db.Database.Upgrade(ctx); err != nil {
		return UpgradeError{Section: "ferry", Err: err}
	}
	return nil
}

// KeepConn takes a connection out of the pool for the caller to keep (its statements log as the pool's do), and
// returns the connection to close when done with it.
func (db *Database) KeepConn(ctx context.Context) (dbutil.Execable, *sql.Conn, error) {
	conn, err := db.root.AcquireConn(ctx)
	if err != nil {
		return nil, nil, err
	}
	le, ok := conn.(*dbutil.LoggingExecable)
	if !ok {
		return nil, nil, fmt.Errorf("unexpected connection type %T", conn)
	}
	raw, ok := le.UnderlyingExecable.(*sql.Conn)
	if !ok {
		return nil, nil, fmt.Errorf("unexpected connection type %T", le.UnderlyingExecable)
	}
	return conn, raw, nil
}
