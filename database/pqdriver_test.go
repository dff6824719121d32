package database_test

import (
	"context"
	"testing"
	"time"

	"go.ferry.im/ferry/database/dbtest"
)

// TestConnectWaitsForARestartingDatabase: while PostgreSQL restarts, its connections break and new ones are
// refused (or answered "the database system is shutting down"); a statement that needs a connection then waits
// for the database to come back instead of failing, as a room key handed to mautrix's store in that moment
// would otherwise be lost for good.
func TestConnectWaitsForARestartingDatabase(t *testing.T) {
	db, proxy := dbtest.PostgresThroughProxy(t)
	proxy.Down()
	go func() {
		time.Sleep(700 * time.Millisecond)
		proxy.Up()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var one int
	if err := db.QueryRow(ctx, `SELECT 1`).Scan(&one); err != nil || one != 1 {
		t.Fatalf("a statement while the database was away: %d, %v", one, err)
	}
}
