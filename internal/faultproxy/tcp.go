package faultproxy

import (
	"io"
	"net"
	"sync"
)

// TCP forwards TCP connections to one address and can cut them, as a database server that restarts does: Down
// resets every open connection and refuses new ones until Up. Go tests put it between ferry and PostgreSQL.
type TCP struct {
	listener net.Listener
	target   string

	// guards the following fields
	lock  sync.Mutex
	down  bool
	conns map[net.Conn]struct{}
	cuts  int
}

// NewTCP listens on a loopback port and forwards to target (host:port).
func NewTCP(target string) (*TCP, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	t := &TCP{listener: l, target: target, conns: make(map[net.Conn]struct{})}
	go t.serve()
	return t, nil
}

// Addr is the address to connect to instead of the target.
func (t *TCP) Addr() string { return t.listener.Addr().String() }

// Down resets every connection and refuses new ones until Up.
func (t *TCP) Down() {
	t.lock.Lock()
	defer t.lock.Unlock()
	t.down = true
	t.cuts++
	for c := range t.conns {
		resetConn(c)
		delete(t.conns, c)
	}
}

// Up accepts connections again.
func (t *TCP) Up() {
	t.lock.Lock()
	t.down = false
	t.lock.Unlock()
}

// Cuts counts the calls to Down.
func (t *TCP) Cuts() int {
	t.lock.Lock()
	defer t.lock.Unlock()
	return t.cuts
}

// Close stops listening and resets every connection.
func (t *TCP) Close() {
	_ = t.listener.Close()
	t.Down()
}

func (t *TCP) serve() {
	for {
		c, err := t.listener.Accept()
		if err != nil {
			return
		}
		go t.forward(c)
	}
}

func (t *TCP) forward(c net.Conn) {
	t.lock.Lock()
	down := t.down
	t.lock.Unlock()
	if down {
		resetConn(c)
		return
	}
	up, err := net.Dial("tcp", t.target)
	if err != nil {
		resetConn(c)
		return
	}
	t.lock.Lock()
	if t.down {
		t.lock.Unlock()
		resetConn(c)
		resetConn(up)
		return
	}
	t.conns[c] = struct{}{}
	t.conns[up] = struct{}{}
	t.lock.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
	t.lock.Lock()
	delete(t.conns, c)
	delete(t.conns, up)
	t.lock.Unlock()
	_ = c.Close()
	_ = up.Close()
}

func resetConn(c net.Conn) {
	if tcp, ok := c.(*net.TCPConn); ok {
		_ = tcp.SetLinger(0)
	}
	_ = c.Close()
}
