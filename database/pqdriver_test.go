package database_test

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.ferry.im/ferry/database"
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

// pinned returns one connection of db's pool, for tests that look at a server connection's own state.
func pinned(t *testing.T, ctx context.Context) *sql.Conn {
	t.Helper()
	db := dbtest.Postgres(t)
	conn, err := db.RawDB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// preparedCount counts the statements the server connection behind conn keeps prepared.
func preparedCount(t *testing.T, ctx context.Context, conn *sql.Conn) int {
	t.Helper()
	var n int
	// No arguments: a simple query, which is never prepared.
	if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM pg_prepared_statements`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestStatementsArePreparedOncePerConnection: a statement with arguments is parsed and planned once per server
// connection and run from then on by name; the number kept per connection is bounded.
func TestStatementsArePreparedOncePerConnection(t *testing.T) {
	ctx := context.Background()
	conn := pinned(t, ctx)
	for i := range 3 {
		var got int
		if err := conn.QueryRowContext(ctx, `SELECT $1::int + 1`, i).Scan(&got); err != nil || got != i+1 {
			t.Fatalf("SELECT %d+1 = %d, %v", i, got, err)
		}
	}
	if n := preparedCount(t, ctx, conn); n != 1 {
		t.Fatalf("after running one statement three times the connection holds %d prepared statements, want 1", n)
	}
	for i := range 300 {
		if _, err := conn.ExecContext(ctx, fmt.Sprintf(`SELECT $1::int + %d`, i), i); err != nil {
			t.Fatal(err)
		}
	}
	if n := preparedCount(t, ctx, conn); n > 256 {
		t.Fatalf("after 300 distinct statements the connection holds %d prepared statements, want at most 256", n)
	}
}

// TestRepeatedLongStatementsArePrepared: a statement with many parameters (a bulk insert, an IN list, writes
// merged into one statement) is often run once and never again, and is not kept at first; run a second time on a
// connection, it is kept like any other. ferry merges a new sender's writes into such statements, each run once
// per new sender with the same text: parsed and planned at every run, they cost Postgres more than executing them.
func TestRepeatedLongStatementsArePrepared(t *testing.T) {
	ctx := context.Background()
	conn := pinned(t, ctx)
	wide := func(tag string) (string, []any) {
		var terms []string
		var args []any
		for i := range 20 {
			terms = append(terms, fmt.Sprintf("$%d::int", i+1))
			args = append(args, i)
		}
		return "SELECT " + strings.Join(terms, " + ") + " AS " + tag, args
	}
	for i := range 300 {
		q, args := wide(fmt.Sprintf("once%d", i))
		if _, err := conn.ExecContext(ctx, q, args...); err != nil {
			t.Fatal(err)
		}
	}
	if n := preparedCount(t, ctx, conn); n != 0 {
		t.Fatalf("after 300 distinct statements of 20 parameters, each run once, the connection holds %d prepared statements, want 0", n)
	}
	q, args := wide("again")
	for i := range 3 {
		var got int
		if err := conn.QueryRowContext(ctx, q, args...).Scan(&got); err != nil || got != 190 {
			t.Fatalf("run %d: sum %d, %v", i+1, got, err)
		}
		want := 0
		if i > 0 {
			want = 1
		}
		if n := preparedCount(t, ctx, conn); n != want {
			t.Fatalf("after running a statement of 20 parameters %d times the connection holds %d prepared statements, want %d", i+1, n, want)
		}
	}
}

// TestPreparedStatementOutlivesASchemaChange: a table gains a column after a statement reading it was prepared
// (Postgres then refuses to run the old plan: "cached plan must not change result type"); the statement still
// runs, and returns the new column.
func TestPreparedStatementOutlivesASchemaChange(t *testing.T) {
	ctx := context.Background()
	conn := pinned(t, ctx)
	if _, err := conn.ExecContext(ctx, `CREATE TABLE shape (id int PRIMARY KEY, a text)`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, `INSERT INTO shape VALUES ($1, $2)`, 1, "x"); err != nil {
		t.Fatal(err)
	}
	read := func() int {
		rows, err := conn.QueryContext(ctx, `SELECT * FROM shape WHERE id=$1`, 1)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		cols, _ := rows.Columns()
		return len(cols)
	}
	if n := read(); n != 2 {
		t.Fatalf("%d columns, want 2", n)
	}
	if _, err := conn.ExecContext(ctx, `ALTER TABLE shape ADD COLUMN b text`); err != nil {
		t.Fatal(err)
	}
	if n := read(); n != 3 {
		t.Fatalf("after the new column: %d columns, want 3", n)
	}
}

// TestStatementsRunBehindAPoolerThatForgetsThem: a transaction pooler (PgBouncer in transaction mode) may hand
// each statement to another server connection, which does not know a statement prepared on the first. Here the
// server connection forgets it (DEALLOCATE ALL); the statement still runs, and the connection stops preparing.
func TestStatementsRunBehindAPoolerThatForgetsThem(t *testing.T) {
	ctx := context.Background()
	conn := pinned(t, ctx)
	var got int
	if err := conn.QueryRowContext(ctx, `SELECT $1::int`, 7).Scan(&got); err != nil || got != 7 {
		t.Fatalf("got %d, %v", got, err)
	}
	if _, err := conn.ExecContext(ctx, `DEALLOCATE ALL`); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRowContext(ctx, `SELECT $1::int`, 8).Scan(&got); err != nil || got != 8 {
		t.Fatalf("after the server connection forgot the statement: %d, %v", got, err)
	}
	if _, err := conn.ExecContext(ctx, `SELECT $1::text`, "new"); err != nil {
		t.Fatal(err)
	}
	if n := preparedCount(t, ctx, conn); n != 0 {
		t.Fatalf("after a sign of a pooler the connection prepared %d statements, want none", n)
	}
}

// TestStaleStatementInATransactionIsRetried: a statement prepared earlier is forgotten by the server connection
// while a transaction is open on it (a pooler handed the transaction to another server connection). Postgres
// aborts the transaction; the statement fails with an error callers retry (database.Transient), and the next
// transaction goes through.
func TestStaleStatementInATransactionIsRetried(t *testing.T) {
	ctx := context.Background()
	conn := pinned(t, ctx)
	var got int
	if err := conn.QueryRowContext(ctx, `SELECT $1::int`, 1).Scan(&got); err != nil {
		t.Fatal(err)
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err = tx.ExecContext(ctx, `DEALLOCATE ALL`); err != nil {
		t.Fatal(err)
	}
	err = tx.QueryRowContext(ctx, `SELECT $1::int`, 2).Scan(&got)
	if err == nil || !database.Transient(err) {
		t.Fatalf("a forgotten statement inside a transaction: %v (transient: %v), want an error callers retry", err, database.Transient(err))
	}
	_ = tx.Rollback()
	tx, err = conn.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback() }()
	if err = tx.QueryRowContext(ctx, `SELECT $1::int`, 3).Scan(&got); err != nil || got != 3 {
		t.Fatalf("the retried transaction: %d, %v", got, err)
	}
}

// TestStatementsRunWhereTheirNameIsTaken: behind a transaction pooler, the server connection may hold another
// client's prepared statement under the name the driver picks for its next one. The statement still runs, and
// the connection stops preparing.
func TestStatementsRunWhereTheirNameIsTaken(t *testing.T) {
	ctx := context.Background()
	conn := pinned(t, ctx)
	var got int
	if err := conn.QueryRowContext(ctx, `SELECT $1::int`, 7).Scan(&got); err != nil || got != 7 {
		t.Fatalf("got %d, %v", got, err)
	}
	// The driver names statements 1, 2, 3, … per connection: take the next names (a simple query, no arguments).
	taken := 0
	for k := 1; k <= 500; k++ {
		if _, err := conn.ExecContext(ctx, fmt.Sprintf(`PREPARE "%d" AS SELECT 1`, k)); err == nil {
			taken++
		}
	}
	if taken < 400 {
		t.Fatalf("took %d statement names, want most of 500", taken)
	}
	before := preparedCount(t, ctx, conn)
	if err := conn.QueryRowContext(ctx, `SELECT $1::int * 2`, 4).Scan(&got); err != nil || got != 8 {
		t.Fatalf("a statement whose name was taken: %d, %v", got, err)
	}
	if _, err := conn.ExecContext(ctx, `SELECT $1::text`, "new"); err != nil {
		t.Fatal(err)
	}
	if n := preparedCount(t, ctx, conn); n != before {
		t.Fatalf("after a taken name the connection prepared %d more statements, want none", n-before)
	}
}
