package bridge

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/tidwall/gjson"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/metrics"
)

// maxTransactionBytes bounds one transaction body. Synapse sends at most 100 PDUs + 100 EDUs + 100 to-device
// events per transaction; 64 MiB leaves ample room for large state events.
const maxTransactionBytes = 64 << 20

// ToDeviceHandler receives the encryption data that homeservers with MSC2409/MSC3202 push in transactions.
// It is nil on homeservers that don't (ferry then runs a /sync loop for its devices).
type ToDeviceHandler interface {
	HandleTransactionCrypto(ctx context.Context, txn json.RawMessage) error
	// TransactionFailed is called when ferry answers a transaction with an error, or receives an event again (the
	// homeserver counted an earlier try as failed): homeservers (Synapse) then
	// count ferry as down and drop the encryption data they would have pushed meanwhile.
	TransactionFailed()
}

// Router returns ferry's appservice HTTP API.
func (b *Bridge) Router(toDevice ToDeviceHandler) http.Handler {
	mux := http.NewServeMux()
	put := func(w http.ResponseWriter, r *http.Request) { b.putTransaction(w, r, toDevice) }
	mux.HandleFunc("PUT /_matrix/app/v1/transactions/{txnID}", put)
	mux.HandleFunc("PUT /transactions/{txnID}", put) // legacy path some homeservers still use
	mux.HandleFunc("POST /_matrix/app/v1/ping", b.authed(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, struct{}{})
	}))
	mux.HandleFunc("GET /_matrix/app/v1/users/{userID}", b.authed(b.queryUser))
	mux.HandleFunc("GET /_matrix/app/v1/rooms/{alias}", b.authed(func(w http.ResponseWriter, r *http.Request) {
		mautrix.MNotFound.WithMessage("ferry does not provide room aliases").Write(w)
	}))
	live := func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, map[string]any{"ok": true}) }
	ready := func(w http.ResponseWriter, r *http.Request) {
		if !b.running() {
			writeJSON(w, http.StatusServiceUnavailable, map[string]any{"ok": false})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true})
	}
	mux.HandleFunc("GET /_matrix/mau/live", live)
	mux.HandleFunc("GET /_matrix/mau/ready", ready)
	mux.HandleFunc("GET /health/live", live)
	mux.HandleFunc("GET /health/ready", ready)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		mautrix.MUnrecognized.WithMessage("Unrecognized request").Write(w)
	})
	return mux
}

// authed checks the homeserver's token (Authorization: Bearer, or the legacy access_token query parameter)
// in constant time: missing → 401 M_MISSING_TOKEN, wrong → 403 M_FORBIDDEN.
func (b *Bridge) authed(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		token := ""
		if h := r.Header.Get("Authorization"); strings.HasPrefix(h, "Bearer ") {
			token = h[len("Bearer "):]
		} else if q := r.URL.Query().Get("access_token"); q != "" {
			token = q
		}
		if token == "" {
			mautrix.MMissingToken.WithMessage("Missing homeserver token").Write(w)
			return
		}
		if subtle.ConstantTimeCompare([]byte(token), []byte(b.AS.Registration.ServerToken)) != 1 {
			if b.wrongTokenLog.Allow() {
				b.Log.Error().Str("path", r.URL.Path).Msg("Refused a request with a wrong hs_token: the registration installed in the homeserver " +
					"is not the one ferry -g wrote for this config (its hs_token must equal appservice.hs_token); install it and restart the homeserver")
			}
			mautrix.MForbidden.WithMessage("Invalid homeserver token").Write(w)
			return
		}
		next(w, r)
	}
}

// transactionBody is the part of a transaction ferry reads before recording its events verbatim.
type transactionBody struct {
	Events []json.RawMessage `json:"events"`
}

// eventHead is the part of an event ferry needs to file it in the inbox.
type eventHead struct {
	ID        id.EventID
	RoomID    id.RoomID
	Sender    id.UserID
	Type      string
	IsState   bool
	SessionID id.SessionID
}

var eventHeadPaths = []string{"event_id", "room_id", "sender", "type", "state_key", "content.session_id"}

// parseEventHead reads an event's head fields from its JSON, which the transaction's parse already validated,
// without decoding the rest (the worker does that later). Fields of the wrong type read as absent.
func parseEventHead(raw []byte) (head eventHead, ok bool) {
	if len(raw) == 0 || raw[0] != '{' {
		return head, false
	}
	res := gjson.GetManyBytes(raw, eventHeadPaths...)
	str := func(r gjson.Result) string {
		if r.Type == gjson.String {
			return r.Str
		}
		return ""
	}
	head = eventHead{
		ID: id.EventID(str(res[0])), RoomID: id.RoomID(str(res[1])), Sender: id.UserID(str(res[2])), Type: str(res[3]),
		IsState: res[4].Type == gjson.String, SessionID: id.SessionID(str(res[5])),
	}
	return head, head.ID != "" && head.RoomID != "" && head.Type != ""
}

// txnEvent is one event of a transaction: its head fields and its JSON as received.
type txnEvent struct {
	head eventHead
	raw  json.RawMessage
}

// parseTransaction reads the events of a transaction body (what the homeserver pushes: outside input). Events
// without event_id, room_id or type are skipped and counted; a body that is not a JSON object with an events
// array is an error (answered M_NOT_JSON).
func parseTransaction(body []byte) (events []txnEvent, skipped int, err error) {
	var txn transactionBody
	if err = json.Unmarshal(body, &txn); err != nil {
		return nil, 0, err
	}
	events = make([]txnEvent, 0, len(txn.Events))
	for _, raw := range txn.Events {
		head, ok := parseEventHead(raw)
		if !ok {
			skipped++
			continue
		}
		events = append(events, txnEvent{head: head, raw: raw})
	}
	return events, skipped, nil
}

// readBody reads a transaction body (at most maxTransactionBytes+1 bytes) into one buffer sized by its
// Content-Length when the homeserver sends one, instead of growing it step by step.
func readBody(r *http.Request) ([]byte, error) {
	limited := io.LimitReader(r.Body, maxTransactionBytes+1)
	if n := r.ContentLength; n > 0 && n <= maxTransactionBytes {
		buf := make([]byte, n+1) // +1: room to notice a body longer than announced
		m, err := io.ReadFull(limited, buf)
		switch {
		case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
			return buf[:m], nil
		case err != nil:
			return nil, err
		}
		rest, err := io.ReadAll(limited)
		return append(buf, rest...), err
	}
	return io.ReadAll(limited)
}

func (b *Bridge) putTransaction(w http.ResponseWriter, r *http.Request, toDevice ToDeviceHandler) {
	b.authed(func(w http.ResponseWriter, r *http.Request) {
		txnID := r.PathValue("txnID")
		log := b.Log.With().Str("component", "intake").Str("transaction_id", txnID).Logger()
		body, err := readBody(r)
		if err != nil {
			mautrix.MNotJSON.WithMessage("Failed to read request body").Write(w)
			return
		} else if len(body) > maxTransactionBytes {
			mautrix.MTooLarge.WithMessage("Transaction too large").Write(w)
			return
		}
		events, skipped, err := parseTransaction(body)
		if err != nil {
			mautrix.MNotJSON.WithMessage("Transaction body is not valid JSON").Write(w)
			return
		} else if skipped > 0 {
			// Refusing the whole transaction would make the homeserver redeliver it forever.
			log.Warn().Int("skipped", skipped).Msg("Skipping events without event_id, room_id or type")
		}
		rows := make([]*database.InboxEvent, 0, len(events))
		now := time.Now()
		hold := b.SyncOrders.Load()
		if hold && b.HoldOnGaps.Load() {
			why := b.gaps.hold(txnID, now, b.syncCovers.Load())
			if hold = why != ""; hold {
				metrics.HeldTransactions.WithLabelValues(why).Inc()
			}
		}
		var ids []id.EventID // for the push watch, where it runs
		watching := b.pushes.on.Load()
		for _, e := range events {
			head, raw := e.head, e.raw
			if watching {
				ids = append(ids, head.ID)
			}
			if !head.IsState && b.Ghosts.IsOwn(head.Sender) {
				// Echoes of ferry's own messages would only be stored, fetched and dropped by the worker. State
				// events are kept: the state store learns ferry's own memberships from them.
				continue
			}
			rows = append(rows, &database.InboxEvent{
				EventID: head.ID, RoomID: head.RoomID, Sender: head.Sender, Type: head.Type, Raw: raw,
				// State events are applied as they come (the bot's invites never show in its /sync timeline).
				State: database.InboxPending, SessionID: head.SessionID, ReceivedAt: now, Synced: !hold || head.IsState,
			})
		}
		// Keep handling even if the homeserver hangs up: the transaction is answered only once recorded.
		ctx := log.WithContext(context.WithoutCancel(r.Context()))
		if toDevice != nil {
			if err = toDevice.HandleTransactionCrypto(ctx, body); err != nil {
				log.Err(err).Msg("Failed to handle encryption data in transaction")
				toDevice.TransactionFailed()
				b.pushes.due(time.Now())
				mautrix.MUnknown.WithMessage("Failed to handle encryption data").Write(w)
				return
			}
		}
		inserted, err := b.DB.Inbox.Insert(ctx, rows)
		if err != nil {
			if toDevice != nil {
				toDevice.TransactionFailed()
			}
			b.pushes.due(time.Now())
			log.Err(err).Msg("Failed to record transaction")
			writeJSON(w, http.StatusInternalServerError, mautrix.RespError{ErrCode: mautrix.MUnknown.ErrCode, Err: "Failed to record events"})
			return
		}
		if inserted < len(rows) && toDevice != nil {
			// A redelivered event: the homeserver counted an earlier try as failed, and Synapse drops the to-device
			// messages of a failed transaction and of the time until its retry went through.
			toDevice.TransactionFailed()
		}
		b.gaps.recorded(txnID)
		if hold && b.HoldOnGaps.Load() && b.WakeRoomSync != nil {
			b.WakeRoomSync()
		}
		log.Debug().Int("events", len(rows)).Int("new", inserted).Bool("held", hold).Msg("Recorded transaction")
		writeJSON(w, http.StatusOK, struct{}{})
		if watching {
			b.pushes.pushed(time.Now(), ids)
		}
		b.handOver(rows)
		// Typing and read receipts (receive_ephemeral): relayed as they come, never recorded (ephemeral.go).
		if eph := ParseEphemeral(body); len(eph) > 0 {
			b.HandleEphemeral(ctx, eph)
		}
	})(w, r)
}

// handOver gives each room's worker the rows this transaction recorded (committed, in order), so that it need
// not read them back. A room with a redelivered event (not inserted: Seq 0) is only woken: its worker reads the
// inbox, which knows whether that event is still pending.
func (b *Bridge) handOver(rows []*database.InboxEvent) {
	var order []id.RoomID
	byRoom := make(map[id.RoomID][]*database.InboxEvent, 4)
	redelivered := map[id.RoomID]bool{}
	for _, row := range rows {
		if _, ok := byRoom[row.RoomID]; !ok {
			order = append(order, row.RoomID)
		}
		if row.Seq == 0 {
			redelivered[row.RoomID] = true
		}
		byRoom[row.RoomID] = append(byRoom[row.RoomID], row)
	}
	for _, room := range order {
		if redelivered[room] {
			b.notify(room, nil)
		} else {
			b.notify(room, byRoom[room])
		}
	}
}

// IngestSynced records room events that reached ferry through the bot's /sync, every room's in the room's order.
// It covers what a transaction may miss: redactions (homeservers like Dendrite 0.13.8 never push them to
// appservices) and events a homeserver pushes late (Dendrite pushes an event that was in flight when it restarted
// about 30 s later, after events that followed it). Events already recorded are recognised by event ID; with
// SyncOrders, every event /sync shows is confirmed and pending ones take the room's order (ConfirmOrder). The
// events of an initial /sync are only confirmed: they may predate ferry. An error means nothing was recorded: the
// caller keeps the /sync token where it was, so the batch comes again.
func (b *Bridge) IngestSynced(ctx context.Context, batch crypto.SyncedBatch) error {
	evts, initial := batch.Events, batch.Initial
	var rows []*database.InboxEvent
	var rooms []id.RoomID
	byRoom := make(map[id.RoomID][]database.ShownEvent)
	for _, evt := range evts {
		if evt.ID == "" || evt.RoomID == "" {
			continue
		}
		if _, ok := byRoom[evt.RoomID]; !ok {
			rooms = append(rooms, evt.RoomID)
		}
		byRoom[evt.RoomID] = append(byRoom[evt.RoomID], database.ShownEvent{ID: evt.ID, Server: evt.Sender.Homeserver(), TS: evt.Timestamp})
		if initial || batch.BeforeJoin[evt.ID] || (evt.StateKey == nil && b.Ghosts.IsOwn(evt.Sender)) {
			continue // history from before the bot was there; and, as intake, ferry's own echoes are never relayed
		}
		if batch.Edge[evt.ID] && time.Since(time.UnixMilli(evt.Timestamp)) > inboxRetention-time.Hour {
			// Read at the previous batch's end, and so old that its inbox row may be pruned: were it an event of
			// an earlier batch, recording it again would relay it twice. Its place is still confirmed below.
			continue
		}
		raw, err := json.Marshal(evt)
		if err != nil {
			continue
		}
		head, _ := parseEventHead(raw)
		rows = append(rows, &database.InboxEvent{EventID: evt.ID, RoomID: evt.RoomID, Sender: evt.Sender, Type: evt.Type.Type, Raw: raw,
			State: database.InboxPending, SessionID: head.SessionID, ReceivedAt: time.Now(), Synced: true})
	}
	if len(rows) == 0 && !initial && onlyOwn(evts, b.Ghosts.IsOwn) {
		// Only echoes of ferry's own messages, which the inbox never holds: nothing to record or place (every
		// event of the rooms since the previous batch is one of them, so no pushed event comes before them).
		b.syncCovers.Store(batch.Covers.UnixNano())
		return nil
	}
	// The rows and their places in one transaction: one commit per batch, on the path of every pushed event
	// that waits for /sync (orderHold).
	type placed struct{ moved, skipped int }
	places := make(map[id.RoomID]placed, len(rooms))
	err := b.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
		if _, err := b.DB.Inbox.Insert(ctx, rows); err != nil {
			return fmt.Errorf("failed to record synced events: %w", err)
		}
		if !b.SyncOrders.Load() {
			return nil
		}
		for _, room := range rooms {
			// A batch that holds all the room had since the previous one places the pushes it does not show
			// after its own events (unless older than one of them: then the batch skipped them).
			complete := !initial && !batch.Incomplete[room]
			moved, skipped, err := b.DB.Inbox.ConfirmOrder(ctx, room, byRoom[room], complete)
			if err != nil {
				return fmt.Errorf("failed to confirm the order of synced events: %w", err)
			}
			places[room] = placed{moved, skipped}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, room := range rooms {
		if p := places[room]; p.skipped > 0 {
			b.Log.Info().Stringer("room_id", room).Int("events", p.skipped).Msg("The homeserver's /sync skipped pushed events older than those it showed; they keep their place")
		}
		if p := places[room]; p.moved > 0 {
			b.Log.Info().Stringer("room_id", room).Int("events", p.moved).Msg("The homeserver pushed events out of the room's order; relaying them in the room's order")
		}
		// The worker reads the inbox: new rows, confirmed ones and new places are there.
		b.Notify(room)
	}
	// Pushed events received before Covers that this or an earlier batch did not show will not be shown (an
	// event type the sync hides, a room it does not cover): they need not wait for it (orderHold).
	b.syncCovers.Store(batch.Covers.UnixNano())
	return nil
}

// queryUser answers the homeserver's user query for ghost IDs ferry would create.
func (b *Bridge) queryUser(w http.ResponseWriter, r *http.Request) {
	userID := id.UserID(r.PathValue("userID"))
	if _, ok := b.Ghosts.Real(userID); !ok {
		mautrix.MNotFound.WithMessage("Not a ferry ghost").Write(w)
		return
	}
	if err := b.AS.Intent(userID).EnsureRegistered(r.Context()); err != nil {
		b.Log.Err(err).Stringer("user_id", userID).Msg("Failed to register ghost on query")
		mautrix.MUnknown.WithMessage("Failed to register ghost").Write(w)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

// HomeserverTransport is the HTTP transport for ferry's requests to the homeserver. Every room worker sends
// through it at once; Go's default keeps only 2 idle connections per host, so most requests under load would
// open a new connection.
func HomeserverTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 256
	t.MaxIdleConnsPerHost = 128
	t.IdleConnTimeout = 90 * time.Second
	return t
}

// onlyOwn tells whether every event is a non-state event of one of ferry's own users.
func onlyOwn(evts []*event.Event, isOwn func(id.UserID) bool) bool {
	for _, evt := range evts {
		if evt.StateKey != nil || !isOwn(evt.Sender) {
			return false
		}
	}
	return true
}
