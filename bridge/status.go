package bridge

// Delivery status. When a message cannot be relayed into a room of its link, its sender learns it in their own
// room, the same way whatever the cause: the homeserver refused the copy, sending keeps failing (ferry still
// tries) or failed for good (ferry gave up), the message cannot be decrypted yet (its key has not come) or never
// will be (ferry gave up waiting), the link's rules refuse it. Each time:
//   - a notice from the bot, as a reply to the message: Element shows it under a quote of that message, so the
//     sender sees which one it is about, in plain words;
//   - com.beeper.message_send_status referencing the message (FAIL_RETRIABLE while ferry keeps trying,
//     FAIL_PERMANENT when it will not), for clients that show a status per message.
// When a message that had a problem is relayed after all (its key arrived, the homeserver recovered), the notice
// is redacted and the status becomes SUCCESS. One notice per message at a time: a later problem of the same
// message (a stalled send that is then given up) replaces the earlier notice. Notices are rate-limited per room
// and sender (noticeAboutSender), status events too, with a budget of their own (noticeStatus). What a message's
// status is lives in the kv table (deliveryKey) only while it can still change: a retriable problem until it
// resolves; a permanent one is forgotten once told.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// statusNetwork is the network named in ferry's com.beeper.message_send_status events.
const statusNetwork = "ferry"

// deliveryKey names the kv entry of a message whose sender was told about a problem that may still resolve:
// "<room> <notice event>", "<room> -" when only a status event was sent, or "<room> pending <txn ID>" from just
// before the notice is sent until its event ID is recorded.
func deliveryKey(evtID id.EventID) string { return "delivery:" + string(evtID) }

// legacyKeyNoticeKey is where ferry before delivery statuses kept a missing-key notice ("<room> <notice>", or
// "pending <room>"); still read, so a notice posted before an upgrade is redacted once its message relays.
func legacyKeyNoticeKey(evtID id.EventID) string { return "key_notice:" + string(evtID) }

// noticeMarkerPending marks a notice being sent in a deliveryKey value.
const noticeMarkerPending = "pending"

// delivery is the message a status is about.
type delivery struct {
	room   id.RoomID
	event  id.EventID
	sender id.UserID
}

func deliveryOf(row *database.InboxEvent) delivery {
	return delivery{room: row.RoomID, event: row.EventID, sender: row.Sender}
}

// deliveryProblem is why a message did not reach (every room of) its link.
type deliveryProblem struct {
	status event.MessageStatus // FAIL_RETRIABLE (ferry keeps trying) or FAIL_PERMANENT
	reason event.MessageStatusReason
	// kind names the problem in transaction IDs, so that telling again after a crash finds the first notice.
	kind string
	// notice is what the sender reads; empty: a status event only (and an earlier notice goes).
	notice noticeText
}

// statusReason classifies a relay error for com.beeper.message_send_status.
func statusReason(err error) event.MessageStatusReason {
	var httpErr mautrix.HTTPError
	switch {
	case errors.As(err, &httpErr) && httpErr.Response != nil && httpErr.Response.StatusCode == http.StatusForbidden:
		return event.MessageStatusNoPermission
	case errors.As(err, &httpErr):
		return event.MessageStatusNetworkError
	}
	return event.MessageStatusGenericError
}

// tellSender tells a message's sender, in its room, about problem p (see the file comment). Failures are logged:
// the relay goes on either way.
func (b *Bridge) tellSender(ctx context.Context, d delivery, p deliveryProblem) {
	log := zerolog.Ctx(ctx).With().Stringer("status_event_id", d.event).Str("problem", p.kind).Logger()
	key := deliveryKey(d.event)
	prev, err := b.DB.KV.Get(ctx, key)
	if err != nil {
		log.Warn().Err(err).Msg("Failed to read a message's delivery status")
		return
	}
	noticeTxn := "ferry_status_" + p.kind + "_" + TxnID(d.event, d.room)
	record := string(d.room) + " -"
	if p.notice.Plain != "" && (strings.HasSuffix(prev, noticeMarkerPending+" "+noticeTxn) || b.mayNotice(ctx, d.room, d.sender, noticeAboutSender)) {
		// Recorded before sending, so that a crash right after the send cannot lose the notice: it is found again
		// by its transaction ID.
		if err = b.DB.KV.Set(ctx, key, string(d.room)+" "+noticeMarkerPending+" "+noticeTxn); err != nil {
			log.Warn().Err(err).Msg("Failed to record a message's delivery status")
			return
		}
		if noticeID, err := b.sendRenderedNotice(ctx, d.room, p.notice, d.event, noticeTxn); err != nil {
			log.Warn().Err(err).Msg("Failed to tell a sender that their message was not relayed")
		} else {
			record = string(d.room) + " " + string(noticeID)
		}
	}
	b.sendStatus(ctx, d, p.status, p.reason, p.kind, p.notice.Plain)
	if prevRoom, prevNotice := parseDelivery(prev); prevNotice != "" && !strings.HasSuffix(record, " "+string(prevNotice)) {
		b.redactNotice(ctx, prevRoom, prevNotice) // replaced by this one
	}
	if p.status == event.MessageStatusFail {
		// Nothing will change any more: nothing to remember.
		err = b.DB.KV.Delete(ctx, key)
	} else {
		err = b.DB.KV.Set(ctx, key, record)
	}
	if err != nil {
		log.Warn().Err(err).Msg("Failed to record a message's delivery status")
	}
}

// deliveredLate resolves the status of a message that was relayed after a problem its sender was told about:
// the notice is redacted and the status becomes SUCCESS. Messages never told about cost one kv read.
func (b *Bridge) deliveredLate(ctx context.Context, row *database.InboxEvent) {
	log := zerolog.Ctx(ctx).With().Stringer("status_event_id", row.EventID).Logger()
	for _, key := range []string{deliveryKey(row.EventID), legacyKeyNoticeKey(row.EventID)} {
		v, err := b.DB.KV.Get(ctx, key)
		if err != nil {
			log.Warn().Err(err).Msg("Failed to read a message's delivery status")
			return
		} else if v == "" {
			continue
		}
		room, notice := parseDelivery(v)
		if txn, pending := pendingTxn(v, row.EventID); pending {
			// Posted by a run that stopped before recording its event ID, or never: sending again under the same
			// transaction ID returns that event (or posts one now), which goes right away.
			if notice, err = b.sendRenderedNotice(ctx, room, renderNotice("ferry relayed this message after all."), row.EventID, txn); err != nil {
				log.Warn().Err(err).Msg("Failed to find the delivery notice to redact")
				return
			}
		}
		if notice != "" {
			b.redactNotice(ctx, room, notice)
		}
		if key == deliveryKey(row.EventID) {
			b.sendStatus(ctx, delivery{room: room, event: row.EventID, sender: row.Sender}, event.MessageStatusSuccess, "", "relayed", "")
		}
		if err = b.DB.KV.Delete(ctx, key); err != nil {
			log.Warn().Err(err).Msg("Failed to forget a message's delivery status")
		}
	}
}

// parseDelivery reads a deliveryKey value (or a legacy missing-key one): the room, and the notice when one was
// posted and recorded.
func parseDelivery(v string) (room id.RoomID, notice id.EventID) {
	if rest, ok := strings.CutPrefix(v, noticeMarkerPending+" "); ok {
		return id.RoomID(rest), "" // legacy: "pending <room>"
	}
	r, rest, _ := strings.Cut(v, " ")
	if strings.HasPrefix(rest, "$") {
		notice = id.EventID(rest)
	}
	return id.RoomID(r), notice
}

// pendingTxn returns the transaction ID of a notice about evt being sent, from a deliveryKey value or a legacy
// missing-key one.
func pendingTxn(v string, evt id.EventID) (string, bool) {
	if room, ok := strings.CutPrefix(v, noticeMarkerPending+" "); ok {
		return "ferry_keynotice_" + TxnID(evt, id.RoomID(room)), true
	}
	_, rest, _ := strings.Cut(v, " ")
	if txn, ok := strings.CutPrefix(rest, noticeMarkerPending+" "); ok {
		return txn, true
	}
	return "", false
}

func (b *Bridge) redactNotice(ctx context.Context, room id.RoomID, notice id.EventID) {
	if _, err := b.AS.BotIntent().RedactEvent(ctx, room, notice); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to redact a delivery notice")
	}
}

// sendStatus sends com.beeper.message_send_status about a message into its room (encrypted where the room is),
// within the room's and sender's budget of status events.
func (b *Bridge) sendStatus(ctx context.Context, d delivery, status event.MessageStatus, reason event.MessageStatusReason, kind, message string) {
	if !b.mayNotice(ctx, d.room, d.sender, noticeStatus) {
		return
	}
	content := &event.BeeperMessageStatusEventContent{
		Network: statusNetwork,
		RelatesTo: event.RelatesTo{
			Type:    event.RelReference,
			EventID: d.event,
		},
		Status:  status,
		Reason:  reason,
		Message: message,
	}
	encrypted, err := b.StateStore.IsEncrypted(ctx, d.room)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to check whether a room is encrypted")
		return
	}
	txn := fmt.Sprintf("ferry_mss_%s_%s_%s", strings.ToLower(string(status)), kind, TxnID(d.event, d.room))
	if _, err = b.send(ctx, b.AS.BotIntent(), d.room, encrypted, event.BeeperMessageStatus, &event.Content{Parsed: content}, txn, disappearInfo{}); err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to send a message status")
	}
}
