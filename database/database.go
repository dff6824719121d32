// Package database owns ferry's own tables (inbox, links, event map, key-value facts) and their numbered
// upgrades. They live beside mautrix's crypto store and state store in the same database, each with its own
// version table. This package never imports bridge or crypto, and never stores message plaintext: the inbox
// holds events exactly as the homeserver delivered them (ciphertext in encrypted rooms) and drops the payload
// once an event is relayed.
package database

import (
	"context"
	"embed"
	"errors"
	"fmt"
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
	// Readback names the rooms to read back before the next send into them.
	Readback *ReadbackQuery
}

// New wraps a root database handle. The handle may be shared with the crypto and state stores (each uses its
// own version table via Child).
func New(root *dbutil.Database, log dbutil.DatabaseLogger) *Database {
	db := root.Child(VersionTable, UpgradeTable, log)
	return &Database{
		Database:  db,
		Inbox:     &InboxQuery{db: db},
		Links:     &LinkQuery{db: db},
		EventMap:  &EventMapQuery{db: db},
		KV:        &KVQuery{db: db},
		Disappear: &DisappearQuery{db: db},
		Calls:     &CallQuery{db: db},
		Readback:  &ReadbackQuery{db: db},
	}
}

// DriverFor returns the database/sql driver ferry opens a database.type with (PostgresDriver for postgres).
func DriverFor(dbType string) string {
	if dbType == "postgres" {
		return PostgresDriver
	}
	return dbType
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
