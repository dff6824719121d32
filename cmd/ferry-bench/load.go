package main

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/fakehs"
)

// msg is one pre-encrypted message from a simulated sender and what became of it.
type msg struct {
	k      int
	phase  *phaseState
	pair   *pair
	sender *fakehs.User
	evtID  id.EventID
	raw    json.RawMessage
	txnID  string // the transaction ID ferry must use for the copy in pair.b
	body   string
	sample bool

	enqueued time.Time
	// set by the callbacks (unix nanoseconds, 0 = not yet)
	acked, arrived atomic.Int64
	// copy of a sampled message, written before arrived is set
	copyID      id.EventID
	copyContent json.RawMessage
}

// phaseState is one measured run over a set of messages.
type phaseState struct {
	name string
	msgs []*msg
	sem  chan struct{} // closed-loop window; nil for open-loop runs
	done atomic.Int64
	// background: the run goes on beside another phase, whose transactions it leaves to that phase's figures
	background bool
	// stop ends production early (a background run, when the phase beside it ended)
	stop atomic.Bool

	// guards the following fields
	mu   sync.Mutex
	txns []time.Duration // intake: transaction PUT → 200
	txnN int
}

// generate pre-encrypts n messages, spread round-robin over the measured pairs and their senders.
func (e *env) generate(ctx context.Context, name string, n int) ([]*msg, error) {
	return e.generateOn(ctx, name, n, e.pairs)
}

// generateOn pre-encrypts n messages, spread round-robin over pairs and their senders, so the measured runs
// spend no CPU on the simulated clients. Each sender encrypts its own messages in order (Megolm indexes
// ascend); senders run in parallel.
func (e *env) generateOn(ctx context.Context, name string, n int, pairs []*pair) ([]*msg, error) {
	ph := &phaseState{name: name}
	msgs := make([]*msg, n)
	perSender := map[*fakehs.User][]*msg{}
	var order []*fakehs.User
	P := len(pairs)
	for k := range n {
		p := pairs[k%P]
		u := p.senders[(k/P)%len(p.senders)]
		m := &msg{k: k, phase: ph, pair: p, sender: u, sample: e.st.sampleEvery > 0 && k%e.st.sampleEvery == 0}
		m.body = messageBody(name, k, e.st.payload)
		msgs[k] = m
		if perSender[u] == nil {
			order = append(order, u)
		}
		perSender[u] = append(perSender[u], m)
	}
	work := make(chan *fakehs.User)
	errs := make(chan error, len(order))
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := range work {
				for _, m := range perSender[u] {
					if err := e.encryptMessage(ctx, m); err != nil {
						errs <- err
						break
					}
				}
			}
		}()
	}
	for _, u := range order {
		work <- u
	}
	close(work)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	for _, m := range msgs {
		e.byTxn[m.txnID] = m
		e.byEvent[m.evtID] = m
	}
	ph.msgs = msgs
	return msgs, nil
}

// messageBody makes a text whose Megolm plaintext ({"type","content","room_id"}) is about payload bytes.
func messageBody(phase string, k, payload int) string {
	const envelope = 110 // type, content keys, msgtype and a room ID
	head := fmt.Sprintf("bench %s %d ", phase, k)
	pad := max(payload-envelope-len(head), 8)
	return head + strings.Repeat("x", pad)
}

func (e *env) encryptMessage(ctx context.Context, m *msg) error {
	content := &event.MessageEventContent{MsgType: event.MsgText, Body: m.body}
	enc, shared, err := m.sender.Encrypt(ctx, m.pair.a, event.EventMessage, content)
	if err != nil {
		return fmt.Errorf("encrypt message %d: %w", m.k, err)
	}
	if shared {
		e.sessionsShared.Add(1)
	}
	m.evtID = fakehs.EventID(string(m.pair.a), string(m.sender.ID), m.phase.name, fmt.Sprint(m.k))
	m.txnID = bridge.TxnID(m.evtID, m.pair.b)
	m.raw, err = fakehs.MakeEvent(m.evtID, m.pair.a, m.sender.ID, event.EventEncrypted.Type, enc, time.Now())
	return err
}

// onSend sees every event the fake homeserver accepts; copies of generated messages complete them.
func (e *env) onSend(se fakehs.SentEvent) {
	m := e.byTxn[se.TxnID]
	if m == nil {
		e.otherMu.Lock()
		e.otherSends[se.Type]++
		e.otherMu.Unlock()
		return
	}
	if se.Type != event.EventEncrypted.Type {
		e.plaintextCopies.Add(1)
	}
	if m.sample {
		m.copyID, m.copyContent = se.EventID, se.Content
	}
	if !m.arrived.CompareAndSwap(0, se.Received.UnixNano()) {
		e.duplicates.Add(1)
		return
	}
	m.phase.done.Add(1)
	if m.phase.sem != nil {
		<-m.phase.sem
	}
}

// onTransaction records when ferry acknowledged each generated message.
func (e *env) onTransaction(t fakehs.TxnResult) {
	if ph := e.current.Load(); ph != nil {
		ph.mu.Lock()
		ph.txns = append(ph.txns, t.Acked.Sub(t.Sent))
		ph.txnN++
		ph.mu.Unlock()
	}
	for _, evtID := range t.EventIDs {
		if m := e.byEvent[evtID]; m != nil {
			m.acked.Store(t.Acked.UnixNano())
		} else {
			e.echoes.Add(1)
		}
	}
}

// run pushes a phase's messages to ferry as appservice transactions and waits for every copy. rate > 0 runs
// open loop at that many messages per second; otherwise at most window messages are in flight (closed loop,
// full speed). Production stops after maxDur; the copies still in flight are then awaited up to drain.
func (e *env) run(ctx context.Context, ph *phaseState, rate float64, window int, maxDur, drain time.Duration) (produced int, start, end time.Time) {
	if rate <= 0 && window > 0 {
		ph.sem = make(chan struct{}, window)
	}
	if !ph.background {
		e.current.Store(ph)
	}
	start = time.Now()
	for i, m := range ph.msgs {
		if ctx.Err() != nil || time.Since(start) > maxDur || ph.stop.Load() {
			break
		}
		if rate > 0 {
			waitForSlot(start, i, rate)
		} else if ph.sem != nil {
			select {
			case ph.sem <- struct{}{}:
			case <-ctx.Done():
			}
		}
		m.enqueued = time.Now()
		e.hs.Deliver([]id.EventID{m.evtID}, []json.RawMessage{m.raw})
		produced++
	}
	deadline := time.Now().Add(drain)
	for ph.done.Load() < int64(produced) && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(2 * time.Millisecond)
	}
	end = start
	for _, m := range ph.msgs[:produced] {
		if at := m.arrived.Load(); at != 0 && time.Unix(0, at).After(end) {
			end = time.Unix(0, at)
		}
	}
	// Let ferry finish the echoes of its copies before the next phase.
	idleCtx, cancel := context.WithTimeout(ctx, drain)
	defer cancel()
	_ = e.hs.WaitAppserviceIdle(idleCtx)
	e.waitInboxDrained(idleCtx)
	if !ph.background {
		e.current.Store(nil)
	}
	return produced, start, end
}

// waitForSlot sleeps until the i-th message of an open-loop run at rate msg/s that started at start is due.
func waitForSlot(start time.Time, i int, rate float64) {
	if wait := time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))); wait > 0 {
		time.Sleep(wait)
	}
}

// waitInboxDrained waits until ferry has no pending inbox rows (echoes included).
func (e *env) waitInboxDrained(ctx context.Context) {
	for ctx.Err() == nil {
		counts, err := e.br.DB.Inbox.CountByState(ctx, "")
		if err != nil || counts[database.InboxPending] == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
