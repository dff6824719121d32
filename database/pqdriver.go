package database

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"strings"
	"sync/atomic"
	"time"

	"github.com/lib/pq"
)

// PostgresDriver is the database/sql driver ferry opens Postgres with: lib/pq, with one adjustment that lets it
// run with binary_parameters=yes (one round trip per parameterised statement instead of two). In that mode lib/pq
// sends []byte arguments in binary format, which Postgres rejects for jsonb columns (binary jsonb starts with a
// version byte); mautrix's state and crypto stores pass JSON documents as []byte. The wrapper passes []byte
// arguments that hold a JSON object or array as text instead. Each connection also prepares the statements it
// runs with arguments (at most stmtCacheSize, least recently used dropped; those with many parameters once they
// repeat), so that Postgres parses and plans them once per connection rather than at every run: about a third of
// Postgres's CPU per relayed message. A
// connection pooler that does not keep prepared statements (PgBouncer in transaction mode before 1.21) shows
// itself by an unknown or duplicate statement name, and the connector stops preparing. dbutil treats every
// driver name starting with "postgres" as Postgres.
const PostgresDriver = "postgres-ferry"

func init() {
	sql.Register(PostgresDriver, jsonTextDriver{})
}

type jsonTextDriver struct{}

func (jsonTextDriver) Open(dsn string) (driver.Conn, error) {
	c, err := jsonTextDriver{}.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	return c.Connect(context.Background())
}

// connectWait bounds how long opening a connection waits for a database that refuses connections for a while
// (it restarts: new connections are refused or answered 57P03 "the database system is shutting down" or "is
// starting up"). A statement that needs a new connection then waits instead of failing: mautrix's stores log
// and drop what they could not store (a room key that arrived in that moment would be lost for good), and
// ferry's own callers would retry anyway.
var connectWait atomic.Int64

func init() { connectWait.Store(int64(30 * time.Second)) }

// SetConnectWait changes connectWait (tests of outages longer than it) and returns a function that restores it.
func SetConnectWait(d time.Duration) (restore func()) {
	old := connectWait.Swap(int64(d))
	return func() { connectWait.Store(old) }
}

// OpenConnector makes database/sql open connections through retryConnector.
func (jsonTextDriver) OpenConnector(dsn string) (driver.Connector, error) {
	c, err := pq.NewConnector(dsn)
	if err != nil {
		return nil, err
	}
	return &retryConnector{pq: c}, nil
}

// retryConnector opens lib/pq connections, trying again with backoff (100 ms doubling to 2 s, for at most
// connectWait and never past the caller's context) while the database refuses them for a reason that passes,
// once it has been reached: a database never reached (a wrong host or port in database.uri) fails at once, so
// start-up and the doctor say so without waiting.
type retryConnector struct {
	pq      *pq.Connector
	reached atomic.Bool
	// noPrepare is set once a connection met a sign that prepared statements do not last on it (a connection
	// pooler in front of Postgres that hands each transaction to another server connection): connections then
	// stop preparing.
	noPrepare atomic.Bool
}

func (c *retryConnector) Connect(ctx context.Context) (driver.Conn, error) {
	deadline := time.Now().Add(time.Duration(connectWait.Load()))
	backoff := 100 * time.Millisecond
	for {
		conn, err := c.pq.Connect(ctx)
		if err == nil {
			c.reached.Store(true)
			return &jsonTextConn{Conn: conn, noPrepare: &c.noPrepare}, nil
		}
		if !c.reached.Load() || !Transient(err) || ctx.Err() != nil || time.Now().Add(backoff).After(deadline) {
			return nil, err
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (c *retryConnector) Driver() driver.Driver { return jsonTextDriver{} }

// WrapConn applies PostgresDriver's argument handling to a lib/pq connection (the benchmark opens its own).
func WrapConn(c driver.Conn) driver.Conn { return &jsonTextConn{Conn: c} }

type jsonTextConn struct {
	driver.Conn
	noPrepare *atomic.Bool // nil: prepare
	inTx      bool         // a transaction is open on the connection
	// prepared statements by query text (database/sql uses a connection from one goroutine at a time)
	stmts map[string]*cachedStmt
	tick  uint64
	// hashes of statements with many parameters run once and not kept (see prepared)
	seen map[uint64]struct{}
}

// CheckNamedValue turns JSON documents given as []byte into strings and leaves every other argument to lib/pq's
// own checker.
// Binary bytea values (pickles, hashes) never parse as a JSON object or array.
func (c *jsonTextConn) CheckNamedValue(nv *driver.NamedValue) error {
	if b, ok := nv.Value.([]byte); ok && len(b) > 0 && (b[0] == '{' || b[0] == '[') && json.Valid(b) {
		nv.Value = string(b)
		return nil
	}
	if nvc, ok := c.Conn.(driver.NamedValueChecker); ok {
		return nvc.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

func (c *jsonTextConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	tx, err := c.Conn.(driver.ConnBeginTx).BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	c.inTx = true
	return txEnd{Tx: tx, c: c}, nil
}

// txEnd notes on its connection that the transaction ended.
type txEnd struct {
	driver.Tx
	c *jsonTextConn
}

func (t txEnd) Commit() error {
	t.c.inTx = false
	return t.Tx.Commit()
}

func (t txEnd) Rollback() error {
	t.c.inTx = false
	return t.Tx.Rollback()
}

func (c *jsonTextConn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	return c.Conn.(driver.ConnPrepareContext).PrepareContext(ctx, query)
}

func (c *jsonTextConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if st := c.prepared(ctx, query, args); st != nil {
		res, err := st.(driver.StmtExecContext).ExecContext(ctx, args)
		if !c.stale(query, err) {
			return res, err
		} else if c.inTx {
			return nil, errStaleInTx
		}
	}
	return c.Conn.(driver.ExecerContext).ExecContext(ctx, query, args)
}

func (c *jsonTextConn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if st := c.prepared(ctx, query, args); st != nil {
		rows, err := st.(driver.StmtQueryContext).QueryContext(ctx, args)
		if !c.stale(query, err) {
			return rows, err
		} else if c.inTx {
			return nil, errStaleInTx
		}
	}
	return c.Conn.(driver.QueryerContext).QueryContext(ctx, query, args)
}

// Statement cache limits: statements kept per connection, the longest statement worth keeping, and how many
// parameters a statement may have to be kept from its first run. One with more is a bulk insert or an IN list,
// whose text changes with its length, or several writes merged into one statement (a new sender's account,
// identity and first share), which repeat: those are kept from their second run on the connection, which
// remembers the last stmtSeenSize such statements it ran once.
const (
	stmtCacheSize  = 256
	stmtCacheArgs  = 16
	stmtCacheBytes = 16384
	stmtSeenSize   = 1024
)

// seenSeed hashes the statements a connection ran once (jsonTextConn.seen).
var seenSeed = maphash.MakeSeed()

// prepared returns the connection's prepared statement for query, preparing it the first time (a statement with
// more than stmtCacheArgs parameters: the second time), or nil where the statement is not worth keeping or could
// not be prepared (the plain path then runs it and reports any error). Postgres parses and plans a prepared
// statement once per connection instead of at every execution.
func (c *jsonTextConn) prepared(ctx context.Context, query string, args []driver.NamedValue) driver.Stmt {
	if len(args) == 0 || len(query) > stmtCacheBytes || (c.noPrepare != nil && c.noPrepare.Load()) {
		return nil
	}
	if st, ok := c.stmts[query]; ok {
		c.tick++
		st.used = c.tick
		return st.Stmt
	}
	if len(args) > stmtCacheArgs {
		h := maphash.String(seenSeed, query)
		if _, ok := c.seen[h]; !ok {
			if len(c.seen) >= stmtSeenSize {
				clear(c.seen)
			} else if c.seen == nil {
				c.seen = make(map[uint64]struct{})
			}
			c.seen[h] = struct{}{}
			return nil
		}
		delete(c.seen, h)
	}
	st, err := c.Conn.(driver.ConnPrepareContext).PrepareContext(ctx, query)
	if err != nil {
		var pqErr *pq.Error
		if errors.As(err, &pqErr) && pqErr.Code == "42P05" && c.noPrepare != nil {
			// duplicate_prepared_statement: another client's statement of that name on the same server
			// connection (a transaction pooler)
			c.noPrepare.Store(true)
		}
		return nil
	}
	if c.stmts == nil {
		c.stmts = make(map[string]*cachedStmt)
	}
	if len(c.stmts) >= stmtCacheSize {
		var oldest string
		var used uint64
		for q, e := range c.stmts {
			if oldest == "" || e.used < used {
				oldest, used = q, e.used
			}
		}
		_ = c.stmts[oldest].Close()
		delete(c.stmts, oldest)
	}
	c.tick++
	c.stmts[query] = &cachedStmt{Stmt: st, used: c.tick}
	return st
}

// stale reports whether err says the prepared statement for query no longer fits (the schema changed under it,
// or the server forgot it), dropping it so that the caller runs the statement on the plain path once.
func (c *jsonTextConn) stale(query string, err error) bool {
	var pqErr *pq.Error
	if err == nil || !errors.As(err, &pqErr) {
		return false
	}
	// 0A000 "cached plan must not change result type"; 26000 invalid_sql_statement_name: the server connection
	// does not know the statement, which happens only behind a transaction pooler.
	switch {
	case pqErr.Code == "0A000" && strings.Contains(pqErr.Message, "cached plan"):
	case pqErr.Code == "26000":
		if c.noPrepare != nil {
			c.noPrepare.Store(true)
		}
	default:
		return false
	}
	if st, ok := c.stmts[query]; ok {
		_ = st.Close()
		delete(c.stmts, query)
	}
	return true
}

// errStaleInTx is what a statement that met a stale prepared statement inside a transaction returns: Postgres
// has aborted the transaction, so the statement cannot run again there. It is driver.ErrBadConn, which makes
// database/sql drop the connection and callers (database.Transient) retry the transaction.
var errStaleInTx = fmt.Errorf("a prepared statement went stale inside a transaction: %w", driver.ErrBadConn)

type cachedStmt struct {
	driver.Stmt
	used uint64 // c.tick when last used
}

func (c *jsonTextConn) Ping(ctx context.Context) error {
	if p, ok := c.Conn.(driver.Pinger); ok {
		return p.Ping(ctx)
	}
	return nil
}

func (c *jsonTextConn) ResetSession(ctx context.Context) error {
	if r, ok := c.Conn.(driver.SessionResetter); ok {
		return r.ResetSession(ctx)
	}
	return nil
}

func (c *jsonTextConn) IsValid() bool {
	if v, ok := c.Conn.(driver.Validator); ok {
		return v.IsValid()
	}
	return true
}
