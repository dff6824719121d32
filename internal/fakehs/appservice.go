package fakehs

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"maunium.net/go/mautrix/id"
)

// TxnResult describes one appservice transaction the appservice acknowledged, as passed to OnTransaction.
type TxnResult struct {
	ID       string
	EventIDs []id.EventID
	// Sent is when the successful attempt started, Acked when its 200 arrived.
	Sent, Acked time.Time
	Attempts    int
}

type queuedEvent struct {
	id  id.EventID
	raw json.RawMessage
}

// asSender pushes queued events to the appservice: one transaction in flight at a time, holding everything
// queued meanwhile (up to Options.MaxTxnEvents), retried with the same ID until it succeeds, like Synapse.
type asSender struct {
	s      *Server
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	// guards the following fields
	mu       sync.Mutex
	url      string
	queue    []queuedEvent
	inFlight int
	txnSeq   int64
	failures int64
	// pending: encryption data waits to be pushed (Options.PushEncryption)
	pending bool
	retry   chan struct{} // closed and replaced when a ping reached the appservice (Options.HoldAfterFailure)
	pings   int64
	wake    chan struct{} // closed and replaced when the queue or URL changes
	idle    chan struct{} // closed and replaced when the queue drains
}

func (a *asSender) init(s *Server, url string) {
	a.s = s
	a.url = url
	a.wake = make(chan struct{})
	a.idle = make(chan struct{})
	a.retry = make(chan struct{})
	a.done = make(chan struct{})
	a.ctx, a.cancel = context.WithCancel(context.Background())
	go a.loop()
}

func (a *asSender) stop() {
	if a.cancel == nil {
		return
	}
	a.cancel()
	<-a.done
}

// SetAppserviceURL sets (or changes) where transactions go. Events queued before are sent once it is set.
func (s *Server) SetAppserviceURL(url string) {
	if s.opts.ASToken == "" {
		panic("fakehs: SetAppserviceURL without an appservice (Options.ASToken)")
	}
	a := &s.as
	a.mu.Lock()
	a.url = url
	a.signalLocked()
	a.mu.Unlock()
}

// Deliver queues events for the appservice as if the homeserver had received them (from a client or over
// federation). Each raw must be a client-format event; evtIDs name them in TxnResult.
func (s *Server) Deliver(evtIDs []id.EventID, raws []json.RawMessage) {
	if s.opts.ASToken == "" {
		panic("fakehs: Deliver without an appservice (Options.ASToken)")
	}
	a := &s.as
	a.mu.Lock()
	for i, raw := range raws {
		a.queue = append(a.queue, queuedEvent{id: evtIDs[i], raw: raw})
	}
	a.signalLocked()
	a.mu.Unlock()
}

// AppserviceBacklog is how many events wait for a transaction (not counting the one in flight).
func (s *Server) AppserviceBacklog() int {
	s.as.mu.Lock()
	defer s.as.mu.Unlock()
	return len(s.as.queue)
}

// AppserviceFailures counts transaction attempts the appservice did not answer with 200.
func (s *Server) AppserviceFailures() int64 {
	s.as.mu.Lock()
	defer s.as.mu.Unlock()
	return s.as.failures
}

// WaitAppserviceIdle waits until every queued event was acknowledged by the appservice.
func (s *Server) WaitAppserviceIdle(ctx context.Context) error {
	if s.opts.ASToken == "" {
		return nil
	}
	a := &s.as
	for {
		a.mu.Lock()
		if len(a.queue) == 0 && a.inFlight == 0 {
			a.mu.Unlock()
			return nil
		}
		idle := a.idle
		a.mu.Unlock()
		select {
		case <-idle:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (a *asSender) enqueue(evtID id.EventID, raw json.RawMessage) {
	a.mu.Lock()
	a.queue = append(a.queue, queuedEvent{id: evtID, raw: raw})
	a.signalLocked()
	a.mu.Unlock()
}

func (a *asSender) signalLocked() {
	close(a.wake)
	a.wake = make(chan struct{})
}

func (a *asSender) loop() {
	defer close(a.done)
	for {
		a.mu.Lock()
		if (len(a.queue) == 0 && !a.pending) || a.url == "" {
			if len(a.queue) == 0 && a.inFlight == 0 {
				close(a.idle)
				a.idle = make(chan struct{})
			}
			wake := a.wake
			a.mu.Unlock()
			select {
			case <-wake:
				continue
			case <-a.ctx.Done():
				return
			}
		}
		n := min(len(a.queue), a.s.opts.MaxTxnEvents)
		batch := append([]queuedEvent(nil), a.queue[:n]...)
		a.queue = a.queue[n:]
		if len(a.queue) == 0 {
			a.queue = nil // let the backing array go
		}
		a.inFlight = n
		a.txnSeq++
		txnID := fmt.Sprintf("fakehs_%d", a.txnSeq)
		url := a.url
		pushed := a.pending
		a.pending = false
		a.mu.Unlock()

		var extra map[string]any
		if pushed {
			extra = a.s.takePushed()
		}
		res := a.send(url, txnID, batch, extra)
		a.mu.Lock()
		a.inFlight = 0
		a.mu.Unlock()
		if res == nil {
			return // stopped
		}
		if a.s.OnTransaction != nil {
			a.s.OnTransaction(*res)
		}
	}
}

// send delivers one transaction, retrying with backoff until the appservice answers 200. It returns nil when
// the sender stops first.
func (a *asSender) send(url, txnID string, batch []queuedEvent, extra map[string]any) *TxnResult {
	var body bytes.Buffer
	body.WriteString(`{"events":[`)
	for i, e := range batch {
		if i > 0 {
			body.WriteByte(',')
		}
		body.Write(e.raw)
	}
	body.WriteString(`]`)
	for k, v := range extra {
		body.WriteString(`,"` + k + `":`)
		body.Write(mustJSON(v))
	}
	body.WriteString(`}`)
	payload := body.Bytes()
	ids := make([]id.EventID, len(batch))
	for i, e := range batch {
		ids[i] = e.id
	}
	backoff := 50 * time.Millisecond
	if a.s.opts.HoldAfterFailure > 0 {
		backoff = a.s.opts.HoldAfterFailure
	}
	for attempt := 1; ; attempt++ {
		start := time.Now()
		req, err := http.NewRequestWithContext(a.ctx, http.MethodPut, url+"/_matrix/app/v1/transactions/"+txnID, bytes.NewReader(payload))
		if err != nil {
			return nil
		}
		req.Header.Set("Authorization", "Bearer "+a.s.opts.HSToken)
		req.Header.Set("Content-Type", "application/json")
		var resp *http.Response
		if fail := a.s.opts.FailTransaction; fail != nil && fail(txnID, attempt) {
			err = fmt.Errorf("transaction %s attempt %d failed on the way (FailTransaction)", txnID, attempt)
		} else {
			resp, err = a.s.client.Do(req)
		}
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return &TxnResult{ID: txnID, EventIDs: ids, Sent: start, Acked: time.Now(), Attempts: attempt}
			}
		}
		if a.ctx.Err() != nil {
			return nil
		}
		a.mu.Lock()
		a.failures++
		retry := a.retry
		a.mu.Unlock()
		if a.s.opts.HoldAfterFailure == 0 {
			retry = nil // only a held server retries on a ping
		}
		select {
		case <-time.After(backoff):
		case <-retry:
		case <-a.ctx.Done():
			return nil
		}
		if a.s.opts.HoldAfterFailure > 0 {
			backoff = min(backoff*2, 512*time.Second)
		} else {
			backoff = min(backoff*2, 5*time.Second)
		}
	}
}

// ping asks the appservice to answer POST /_matrix/app/v1/ping (MSC2659), as the homeserver does for
// /_matrix/client/v1/appservice/{id}/ping.
func (a *asSender) ping(r *http.Request, txnID string) error {
	a.mu.Lock()
	url := a.url
	a.mu.Unlock()
	if url == "" {
		return fmt.Errorf("no appservice URL configured")
	}
	body, _ := json.Marshal(map[string]string{"transaction_id": txnID})
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, url+"/_matrix/app/v1/ping", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+a.s.opts.HSToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.s.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("appservice answered %d", resp.StatusCode)
	}
	// The appservice is reachable: a held transaction is retried at once.
	a.mu.Lock()
	a.pings++
	close(a.retry)
	a.retry = make(chan struct{})
	a.mu.Unlock()
	return nil
}

// AppservicePings counts the appservice pings that reached the appservice.
func (s *Server) AppservicePings() int64 {
	s.as.mu.Lock()
	defer s.as.mu.Unlock()
	return s.as.pings
}
