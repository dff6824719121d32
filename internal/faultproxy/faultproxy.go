// Package faultproxy is a fault-injecting HTTP proxy for ferry's tests: it stands between ferry and the
// homeserver, in either direction (ferry's client requests to the homeserver, or the homeserver's appservice
// transactions to ferry), forwards requests, and turns a seeded share of them into the failures an operator's
// bad day brings: rate limits (429 with retry_after_ms, or with a Retry-After header), server errors
// (500/502/503/504), connections reset before or after the upstream acted, answers lost after the upstream acted,
// gateways that give up after the upstream acted, and slow answers. It can be switched off and on, and it counts
// what it did.
//
// The faults are deterministic for a seed: the n-th request that may get a fault draws the n-th number of a
// generator seeded with it, so the same order of requests meets the same faults. (Concurrent requests arrive in
// an order of their own; the tallies say what was met.)
//
// It is a test kit: it must never stand in front of a production homeserver. It does not import ferry's
// packages. Go tests use it as an http.Handler (New, then httptest.NewServer); end-to-end tests run it as a
// process (cmd/ferry-faultproxy) and steer it through its control paths (see Proxy.ServeHTTP).
package faultproxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Kind is one sort of fault.
type Kind string

// The faults. "Before" faults answer without forwarding (the upstream never sees the request); "after" faults
// forward the request, let the upstream act and answer, and then keep that answer from the client.
const (
	// RateLimit answers 429 M_LIMIT_EXCEEDED with retry_after_ms in the body (Dendrite's and Synapse's way).
	RateLimit Kind = "429"
	// RateLimitHeader answers 429 M_LIMIT_EXCEEDED with a Retry-After header and no retry_after_ms.
	RateLimitHeader Kind = "429h"
	// Status500 … Status504 answer with that status before forwarding, as a failing server or gateway does.
	Status500 Kind = "500"
	Status502 Kind = "502"
	Status503 Kind = "503"
	Status504 Kind = "504"
	// ResetBefore resets the client's connection without forwarding the request.
	ResetBefore Kind = "reset"
	// ResetAfter forwards the request, lets the upstream answer, then resets the client's connection.
	ResetAfter Kind = "reset-after"
	// LostAfter forwards the request, lets the upstream answer, then sends the client nothing for Config.Hold
	// and closes the connection: an answer lost on the way back.
	LostAfter Kind = "lost"
	// GatewayAfter forwards the request, lets the upstream answer, then answers the client 504, as a gateway
	// that stopped waiting does.
	GatewayAfter Kind = "504-after"
	// Slow forwards the request after a delay of up to Config.SlowMax.
	Slow Kind = "slow"
)

// AllKinds lists every fault, in the order tallies print them.
var AllKinds = []Kind{RateLimit, RateLimitHeader, Status500, Status502, Status503, Status504, ResetBefore, ResetAfter, LostAfter, GatewayAfter, Slow}

// acts tells whether the upstream sees a request that meets this fault.
func (k Kind) acts() bool {
	switch k {
	case ResetAfter, LostAfter, GatewayAfter, Slow:
		return true
	}
	return false
}

// ParseMix reads a fault mix written as "kind=weight,kind=weight" (e.g. "429=2,502=1,reset-after=1"); a kind
// without "=weight" weighs 1. "all" stands for every kind with weight 1.
func ParseMix(s string) (map[Kind]int, error) {
	mix := make(map[Kind]int)
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, weight, hasWeight := strings.Cut(part, "=")
		w := 1
		if hasWeight {
			var err error
			if w, err = strconv.Atoi(weight); err != nil || w < 0 {
				return nil, fmt.Errorf("fault %q: weight %q is not a whole number", name, weight)
			}
		}
		if name == "all" {
			for _, k := range AllKinds {
				mix[k] += w
			}
			continue
		}
		if !slices.Contains(AllKinds, Kind(name)) {
			return nil, fmt.Errorf("unknown fault %q (known: %v)", name, AllKinds)
		}
		mix[Kind(name)] += w
	}
	return mix, nil
}

// Config says where the proxy forwards and which faults it injects.
type Config struct {
	// Name labels the proxy in its tallies, e.g. "ferry→homeserver".
	Name string
	// Target is the upstream's base URL, e.g. http://127.0.0.1:8008.
	Target string
	// Seed seeds the fault generator.
	Seed uint64
	// Rate is the share of eligible requests that meet a fault, from 0 to 1.
	Rate float64
	// Mix weighs the faults a request may meet (default: every kind, weight 1).
	Mix map[Kind]int
	// Eligible picks the requests that may meet a fault (default: every request).
	Eligible func(*http.Request) bool
	// RetryAfter is what the rate-limit faults ask for (default 500 ms; the header form rounds up to seconds).
	RetryAfter time.Duration
	// SlowMax bounds the delay of a slow answer (default 2 s).
	SlowMax time.Duration
	// Hold is how long a lost answer keeps the client waiting before its connection closes (default 2 s).
	Hold time.Duration
	// ForgetTxn makes the "after" faults forward a send (PUT …/send/…/{txnId}, …/redact/…/{txnId}) under another
	// transaction ID, so the upstream does not recognise the client's retry: the request was processed, but its
	// transaction ID is not remembered (as Dendrite forgets requests it did not finish answering, and every
	// homeserver may forget after a restart).
	ForgetTxn bool
}

// Proxy forwards HTTP requests to one upstream and injects faults. It is an http.Handler.
type Proxy struct {
	cfg       Config
	target    *url.URL
	transport *http.Transport
	kinds     []Kind
	weights   []int
	total     int

	// guards the following fields
	lock        sync.Mutex
	rng         *rand.Rand
	enabled     bool
	requests    int64
	forwarded   int64
	unreachable int64
	faults      map[Kind]int64
	forgotten   int64
	dropped     int64
	// drops are the armed DropNext matches, oldest first.
	drops []dropMatch
}

// dropMatch picks a request body: it holds every string of contains and none of without.
type dropMatch struct {
	contains, without []string
}

func (d dropMatch) matches(body []byte) bool {
	for _, c := range d.contains {
		if !bytes.Contains(body, []byte(c)) {
			return false
		}
	}
	for _, c := range d.without {
		if bytes.Contains(body, []byte(c)) {
			return false
		}
	}
	return true
}

// New builds a proxy. It is on (injecting faults) from the start unless cfg.Rate is 0.
func New(cfg Config) (*Proxy, error) {
	target, err := url.Parse(cfg.Target)
	if err != nil || target.Host == "" {
		return nil, fmt.Errorf("target %q is not an absolute URL", cfg.Target)
	}
	if cfg.Rate < 0 || cfg.Rate > 1 {
		return nil, fmt.Errorf("rate %v is not between 0 and 1", cfg.Rate)
	}
	if cfg.Mix == nil {
		cfg.Mix, _ = ParseMix("all")
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = 500 * time.Millisecond
	}
	if cfg.SlowMax <= 0 {
		cfg.SlowMax = 2 * time.Second
	}
	if cfg.Hold <= 0 {
		cfg.Hold = 2 * time.Second
	}
	p := &Proxy{
		cfg:    cfg,
		target: target,
		transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     30 * time.Second,
		},
		rng:     rand.New(rand.NewPCG(cfg.Seed, 0x66657272795f6670)), // the stream constant spells "ferry_fp"
		enabled: cfg.Rate > 0,
		faults:  make(map[Kind]int64),
	}
	for _, k := range AllKinds { // a fixed order keeps the draws deterministic
		if w := cfg.Mix[k]; w > 0 {
			p.kinds = append(p.kinds, k)
			p.weights = append(p.weights, w)
			p.total += w
		}
	}
	if p.total == 0 && cfg.Rate > 0 {
		return nil, errors.New("the fault mix weighs nothing")
	}
	return p, nil
}

// SetEnabled switches fault injection on or off; requests are forwarded either way.
func (p *Proxy) SetEnabled(on bool) {
	p.lock.Lock()
	p.enabled = on
	p.lock.Unlock()
}

// Close drops the proxy's idle upstream connections.
func (p *Proxy) Close() { p.transport.CloseIdleConnections() }

// Tallies is what a proxy did so far.
type Tallies struct {
	Name        string         `json:"name"`
	Enabled     bool           `json:"enabled"`
	Requests    int64          `json:"requests"`
	Forwarded   int64          `json:"forwarded"`
	Unreachable int64          `json:"upstream_unreachable"`
	Faults      map[Kind]int64 `json:"faults"`
	Forgotten   int64          `json:"txn_forgotten"`
	Dropped     int64          `json:"dropped"`
}

// Injected is the number of faults injected.
func (t Tallies) Injected() int64 {
	var n int64
	for _, c := range t.Faults {
		n += c
	}
	return n
}

// String prints the tallies on one line: name, requests, faults by kind.
func (t Tallies) String() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s: %d requests, %d faults", t.Name, t.Requests, t.Injected())
	kinds := make([]string, 0, len(t.Faults))
	for k, c := range t.Faults {
		if c > 0 {
			kinds = append(kinds, fmt.Sprintf("%s=%d", k, c))
		}
	}
	sort.Strings(kinds)
	if len(kinds) > 0 {
		fmt.Fprintf(&sb, " (%s)", strings.Join(kinds, " "))
	}
	if t.Forgotten > 0 {
		fmt.Fprintf(&sb, ", %d forwarded under a forgotten transaction ID", t.Forgotten)
	}
	if t.Unreachable > 0 {
		fmt.Fprintf(&sb, ", upstream unreachable %d times", t.Unreachable)
	}
	if t.Dropped > 0 {
		fmt.Fprintf(&sb, ", %d dropped as asked", t.Dropped)
	}
	return sb.String()
}

// Tallies returns a copy of the counts.
func (p *Proxy) Tallies() Tallies {
	p.lock.Lock()
	defer p.lock.Unlock()
	t := Tallies{Name: p.cfg.Name, Enabled: p.enabled, Requests: p.requests, Forwarded: p.forwarded,
		Unreachable: p.unreachable, Faults: make(map[Kind]int64, len(p.faults)), Forgotten: p.forgotten, Dropped: p.dropped}
	for k, c := range p.faults {
		t.Faults[k] = c
	}
	return t
}

// ControlPrefix starts the paths that steer a running proxy instead of being forwarded:
//
//	POST /_faultproxy/on, POST /_faultproxy/off   switch fault injection
//	GET  /_faultproxy/tallies                     the tallies as JSON
//	POST /_faultproxy/drop-next?contains=…&without=…   DropNext (each parameter may repeat)
const ControlPrefix = "/_faultproxy/"

// DropNext arms the proxy to answer the next request whose body holds every string of contains and none of
// without with 200 {} and never forward it: a request its sender counts as delivered that the upstream never
// got, as a homeserver's appservice transaction that it never sends is. Each call arms one drop; a request meets
// at most one. Independent of SetEnabled.
func (p *Proxy) DropNext(contains, without []string) {
	p.lock.Lock()
	p.drops = append(p.drops, dropMatch{contains: contains, without: without})
	p.lock.Unlock()
}

// takeDrop reads r's body (leaving it readable) and tells whether an armed drop matches it, disarming that one.
func (p *Proxy) takeDrop(r *http.Request) bool {
	p.lock.Lock()
	armed := len(p.drops) > 0
	p.lock.Unlock()
	if !armed {
		return false
	}
	body, err := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		return false
	}
	p.lock.Lock()
	defer p.lock.Unlock()
	for i, d := range p.drops {
		if d.matches(body) {
			p.drops = slices.Delete(p.drops, i, i+1)
			p.requests++
			p.dropped++
			return true
		}
	}
	return false
}

// ServeHTTP forwards one request, or fails it.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, ControlPrefix) {
		p.control(w, r)
		return
	}
	if p.takeDrop(r) {
		writeJSON(w, http.StatusOK, map[string]any{})
		return
	}
	kind, slow, n := p.draw(r)
	switch kind {
	case RateLimit:
		writeJSON(w, http.StatusTooManyRequests, map[string]any{"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests (injected)", "retry_after_ms": p.cfg.RetryAfter.Milliseconds()})
		return
	case RateLimitHeader:
		w.Header().Set("Retry-After", strconv.Itoa(int((p.cfg.RetryAfter+time.Second-1)/time.Second)))
		writeJSON(w, http.StatusTooManyRequests, map[string]any{"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests (injected)"})
		return
	case Status500, Status502, Status503, Status504:
		status, _ := strconv.Atoi(string(kind))
		writeJSON(w, status, map[string]any{"errcode": "M_UNKNOWN", "error": "Injected server error"})
		return
	case ResetBefore:
		_, _ = io.Copy(io.Discard, r.Body)
		reset(w)
		return
	case Slow:
		time.Sleep(slow)
	}
	forget := kind.acts() && kind != Slow && p.cfg.ForgetTxn
	status, header, body, err := p.forward(r, forget, n)
	if err != nil {
		// What a reverse proxy answers when its upstream is down or restarting.
		p.count(func() { p.unreachable++ })
		writeJSON(w, http.StatusBadGateway, map[string]any{"errcode": "M_UNKNOWN", "error": "Upstream unreachable"})
		return
	}
	switch kind {
	case ResetAfter:
		reset(w)
		return
	case LostAfter:
		time.Sleep(p.cfg.Hold)
		reset(w)
		return
	case GatewayAfter:
		writeJSON(w, http.StatusGatewayTimeout, map[string]any{"errcode": "M_UNKNOWN", "error": "Gateway timeout (injected)"})
		return
	}
	for k, v := range header {
		if !hopByHop(k) {
			w.Header()[k] = v
		}
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// draw decides the fault a request meets ("" for none), the delay of a slow answer, and the fault's number.
func (p *Proxy) draw(r *http.Request) (kind Kind, slow time.Duration, n int64) {
	eligible := p.cfg.Eligible == nil || p.cfg.Eligible(r)
	p.lock.Lock()
	defer p.lock.Unlock()
	p.requests++
	if !p.enabled || !eligible {
		return "", 0, 0
	}
	if p.rng.Float64() >= p.cfg.Rate {
		return "", 0, 0
	}
	pick := p.rng.IntN(p.total)
	for i, w := range p.weights {
		if pick < w {
			kind = p.kinds[i]
			break
		}
		pick -= w
	}
	if kind == Slow {
		slow = time.Duration(p.rng.Int64N(int64(p.cfg.SlowMax))) + 1
	}
	p.faults[kind]++
	var total int64
	for _, c := range p.faults {
		total += c
	}
	return kind, slow, total
}

func (p *Proxy) count(f func()) {
	p.lock.Lock()
	f()
	p.lock.Unlock()
}

// txnPath matches the paths whose last segment is a client transaction ID.
var txnPath = regexp.MustCompile(`^(/_matrix/client/[^/]+/rooms/[^/]+/(?:send/[^/]+|redact/[^/]+))/([^/]+)$`)

// forward sends the request upstream and reads the whole answer. With forget, a send goes under another
// transaction ID (see Config.ForgetTxn).
func (p *Proxy) forward(r *http.Request, forget bool, n int64) (int, http.Header, []byte, error) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return 0, nil, nil, err
	}
	u := *p.target
	u.Path = strings.TrimSuffix(p.target.Path, "/") + r.URL.Path
	u.RawPath = ""
	u.RawQuery = r.URL.RawQuery
	if r.URL.RawPath != "" {
		u.RawPath = strings.TrimSuffix(p.target.EscapedPath(), "/") + r.URL.RawPath
	}
	if forget && r.Method == http.MethodPut {
		if m := txnPath.FindStringSubmatch(r.URL.Path); m != nil {
			u.Path = strings.TrimSuffix(p.target.Path, "/") + m[1] + "/" + m[2] + "-forgotten" + strconv.FormatInt(n, 10)
			u.RawPath = ""
			p.count(func() { p.forgotten++ })
		}
	}
	out, err := http.NewRequestWithContext(r.Context(), r.Method, u.String(), bytes.NewReader(body))
	if err != nil {
		return 0, nil, nil, err
	}
	for k, v := range r.Header {
		if !hopByHop(k) {
			out.Header[k] = v
		}
	}
	out.Host = p.target.Host
	resp, err := p.transport.RoundTrip(out)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, nil, err
	}
	p.count(func() { p.forwarded++ })
	return resp.StatusCode, resp.Header, data, nil
}

func (p *Proxy) control(w http.ResponseWriter, r *http.Request) {
	switch strings.TrimPrefix(r.URL.Path, ControlPrefix) {
	case "on":
		p.SetEnabled(true)
	case "off":
		p.SetEnabled(false)
	case "tallies":
	case "drop-next":
		q := r.URL.Query()
		if r.Method != http.MethodPost || len(q["contains"]) == 0 {
			writeJSON(w, http.StatusBadRequest, map[string]any{"errcode": "M_INVALID_PARAM", "error": "drop-next is a POST with at least one contains parameter"})
			return
		}
		p.DropNext(q["contains"], q["without"])
	default:
		writeJSON(w, http.StatusNotFound, map[string]any{"errcode": "M_UNRECOGNIZED", "error": "Unknown control path"})
		return
	}
	writeJSON(w, http.StatusOK, p.Tallies())
}

// reset closes the client's connection with a TCP reset instead of an answer.
func reset(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.SetLinger(0)
	}
	_ = conn.Close()
}

func hopByHop(header string) bool {
	switch http.CanonicalHeaderKey(header) {
	case "Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "Content-Length":
		return true
	}
	return false
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}
