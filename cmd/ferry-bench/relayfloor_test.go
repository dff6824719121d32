package main

import (
	"context"
	"os"
	"testing"
	"time"

	"go.ferry.im/ferry/database/dbtest"
)

// The relay floor must do the work it stands for, or its figures say nothing: every message delivered is
// relayed once, recorded before the homeserver's answer and recorded done (relayFloor checks the table), with
// one statement for the done record and at most one for the events of a transaction.
func TestRelayFloorRelaysAndRecordsEveryMessage(t *testing.T) {
	admin := os.Getenv(dbtest.EnvPostgres)
	if admin == "" {
		t.Fatalf("%s is not set: run the tests with `make test`", dbtest.EnvPostgres)
	}
	st := settings{adminURL: admin, payload: 200, drain: 30 * time.Second}
	res, err := relayFloor(context.Background(), st, 400, 250*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if res.Relayed != res.Messages || res.Messages != 100 {
		t.Fatalf("relayed %d of %d messages, want 100 of 100", res.Relayed, res.Messages)
	}
	if res.StmtsPerMsg <= 1 || res.StmtsPerMsg > 2.001 {
		t.Fatalf("%.2f statements per message, want more than 1 and at most 2 (the done record, and a record of the events of each transaction)", res.StmtsPerMsg)
	}
}
