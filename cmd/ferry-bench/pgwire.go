package main

import (
	"bytes"
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/binary"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lib/pq"

	"go.ferry.im/ferry/database"
)

// pgDriverName is the database/sql driver the benchmark opens ferry's database with: lib/pq on a connection
// that counts what crosses the wire. dbutil treats every driver name starting with "postgres" as Postgres.
const pgDriverName = "postgres-bench"

// maxQueryKey bounds the statement text kept per histogram entry (multi-row inserts differ only after it).
const maxQueryKey = 96

// pgStats counts Postgres traffic of every connection opened through pgDriverName, read from the frontend
// protocol: a statement is a simple Query ('Q') or an extended-protocol Execute ('E'); a round trip is the
// client reading after it wrote (a statement's first run on a connection prepares it: one more); wait is the
// time from a round trip's first write to its first read. A statement prepared under a name counts at each
// Bind that runs it.
//
// commits counts write transactions, each of which waits for a WAL flush under synchronous_commit=on: COMMITs
// of explicit transactions, and INSERT/UPDATE/DELETE statements run outside one (autocommit).
type pgStats struct {
	dials, roundTrips, simple, executes, commits, bytesOut, bytesIn, waitNanos atomic.Int64

	// guards the following fields
	mu      sync.Mutex
	byQuery map[string]int64
	keys    map[string]string // statement text → histogram key
}

var pgCounters = &pgStats{byQuery: make(map[string]int64), keys: make(map[string]string)}

func init() {
	sql.Register(pgDriverName, pgDriver{stats: pgCounters})
}

type pgSnapshot struct {
	Dials, RoundTrips, Statements, Commits, BytesOut, BytesIn int64
	Wait                                                      time.Duration
	ByQuery                                                   map[string]int64
}

func (s *pgStats) snapshot() pgSnapshot {
	s.mu.Lock()
	byQuery := make(map[string]int64, len(s.byQuery))
	for k, v := range s.byQuery {
		byQuery[k] = v
	}
	s.mu.Unlock()
	return pgSnapshot{
		Dials: s.dials.Load(), RoundTrips: s.roundTrips.Load(), Statements: s.simple.Load() + s.executes.Load(), Commits: s.commits.Load(),
		BytesOut: s.bytesOut.Load(), BytesIn: s.bytesIn.Load(), Wait: time.Duration(s.waitNanos.Load()), ByQuery: byQuery,
	}
}

// sub returns the traffic between two snapshots.
func (a pgSnapshot) sub(b pgSnapshot) pgSnapshot {
	d := pgSnapshot{
		Dials: a.Dials - b.Dials, RoundTrips: a.RoundTrips - b.RoundTrips, Statements: a.Statements - b.Statements,
		Commits: a.Commits - b.Commits, BytesOut: a.BytesOut - b.BytesOut, BytesIn: a.BytesIn - b.BytesIn, Wait: a.Wait - b.Wait, ByQuery: map[string]int64{},
	}
	for k, v := range a.ByQuery {
		if n := v - b.ByQuery[k]; n > 0 {
			d.ByQuery[k] = n
		}
	}
	return d
}

type queryCount struct {
	Query string
	Count int64
}

// top lists the most frequent statement texts.
func (a pgSnapshot) top(n int) []queryCount {
	out := make([]queryCount, 0, len(a.ByQuery))
	for k, v := range a.ByQuery {
		out = append(out, queryCount{k, v})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Count != out[j].Count {
			return out[i].Count > out[j].Count
		}
		return out[i].Query < out[j].Query
	})
	if len(out) > n {
		out = out[:n]
	}
	return out
}

func (s *pgStats) query(text []byte) {
	s.mu.Lock()
	key, ok := s.keys[string(text)] // no allocation for the lookup
	if !ok {
		key = strings.Join(strings.Fields(string(text)), " ")
		if len(key) > maxQueryKey {
			key = key[:maxQueryKey] + "…"
		}
		s.keys[string(text)] = key
	}
	s.byQuery[key]++
	s.mu.Unlock()
}

type pgDriver struct{ stats *pgStats }

func (d pgDriver) Open(dsn string) (driver.Conn, error) {
	conn, err := pq.DialOpen(pgDialer(d), dsn)
	if err != nil {
		return nil, err
	}
	return database.WrapConn(conn), nil
}

type pgDialer struct{ stats *pgStats }

func (d pgDialer) Dial(network, address string) (net.Conn, error) {
	return d.DialContext(context.Background(), network, address)
}

func (d pgDialer) DialTimeout(network, address string, timeout time.Duration) (net.Conn, error) {
	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	return d.DialContext(ctx, network, address)
}

func (d pgDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	d.stats.dials.Add(1)
	return &pgConn{Conn: c, stats: d.stats, untyped: true}, nil
}

// pgConn parses the frontend messages it writes. database/sql uses a connection from one goroutine at a time.
type pgConn struct {
	net.Conn
	stats      *pgStats
	wrote      bool // the last operation was a write: the next read ends a round trip
	writeStart time.Time

	// frontend stream parser state
	untyped bool              // the next message has no type byte (startup, SSL or GSS request)
	inTxn   bool              // an explicit transaction is open
	head    []byte            // partial message header
	body    []byte            // body being collected (untyped, Query and Parse messages, the start of Bind messages)
	named   map[string][]byte // prepared statements' texts by name
	typ     byte
	left    int // bytes of the current message body still to come
}

func (c *pgConn) Write(p []byte) (int, error) {
	if !c.wrote {
		c.wrote = true
		c.writeStart = time.Now()
	}
	c.stats.bytesOut.Add(int64(len(p)))
	c.parse(p)
	return c.Conn.Write(p)
}

func (c *pgConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.wrote && n > 0 {
		c.wrote = false
		c.stats.roundTrips.Add(1)
		c.stats.waitNanos.Add(int64(time.Since(c.writeStart)))
	}
	c.stats.bytesIn.Add(int64(n))
	return n, err
}

// parse follows the frontend message stream across writes.
func (c *pgConn) parse(p []byte) {
	for len(p) > 0 {
		if c.left > 0 {
			n := min(c.left, len(p))
			if c.typ == 0 || c.typ == 'Q' || c.typ == 'P' || (c.typ == 'B' && len(c.body) < 256) {
				c.body = append(c.body, p[:n]...)
			}
			c.left -= n
			p = p[n:]
			if c.left == 0 {
				c.finish()
			}
			continue
		}
		headLen := 5
		if c.untyped {
			headLen = 4
		}
		n := min(headLen-len(c.head), len(p))
		c.head = append(c.head, p[:n]...)
		p = p[n:]
		if len(c.head) < headLen {
			return
		}
		if c.untyped {
			c.typ = 0
			c.left = int(binary.BigEndian.Uint32(c.head)) - 4
		} else {
			c.typ = c.head[0]
			c.left = int(binary.BigEndian.Uint32(c.head[1:])) - 4
		}
		c.head = c.head[:0]
		c.body = c.body[:0]
		if c.left <= 0 {
			c.left = 0
			c.finish()
		}
	}
}

// sslRequestCode and gssRequestCode are the untyped requests after which the startup message follows.
const (
	sslRequestCode = 80877103
	gssRequestCode = 80877104
)

func (c *pgConn) finish() {
	switch c.typ {
	case 0:
		// An SSL or GSS encryption request is followed by another untyped (startup) message.
		code := 0
		if len(c.body) >= 4 {
			code = int(binary.BigEndian.Uint32(c.body))
		}
		c.untyped = code == sslRequestCode || code == gssRequestCode
	case 'Q':
		c.stats.simple.Add(1)
		text := cString(c.body)
		c.stats.query(text)
		c.transaction(text)
	case 'P':
		// Parse: statement name, then the query text. A named statement (prepared once per connection) is
		// counted at each Bind that runs it; an unnamed one runs right after.
		name, text := cString(c.body), c.body
		if i := bytes.IndexByte(text, 0); i >= 0 {
			text = text[i+1:]
		}
		text = cString(text)
		if len(name) > 0 {
			if c.named == nil {
				c.named = make(map[string][]byte)
			}
			c.named[string(name)] = append([]byte(nil), text...)
			return
		}
		c.stats.query(text)
		c.transaction(text)
	case 'B':
		// Bind: portal name, then the statement name.
		rest := c.body
		if i := bytes.IndexByte(rest, 0); i >= 0 {
			rest = rest[i+1:]
		}
		if text, ok := c.named[string(cString(rest))]; ok {
			c.stats.query(text)
			c.transaction(text)
		}
	case 'E':
		c.stats.executes.Add(1)
	}
}

// transaction follows explicit transactions and counts commits (see pgStats).
func (c *pgConn) transaction(text []byte) {
	text = bytes.TrimLeft(text, " \t\r\n")
	verb := text
	if i := bytes.IndexAny(text, " \t\r\n;"); i >= 0 {
		verb = text[:i]
	}
	is := func(words ...string) bool {
		for _, w := range words {
			if bytes.EqualFold(verb, []byte(w)) {
				return true
			}
		}
		return false
	}
	switch {
	case is("BEGIN", "START"):
		c.inTxn = true
	case is("COMMIT", "END"):
		c.inTxn = false
		c.stats.commits.Add(1)
	case is("ROLLBACK", "ABORT"):
		c.inTxn = false
	case is("INSERT", "UPDATE", "DELETE"):
		if !c.inTxn {
			c.stats.commits.Add(1)
		}
	}
}

// cString cuts b at its first NUL.
func cString(b []byte) []byte {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}
