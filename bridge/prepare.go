package bridge

import (
	"context"
	"sync"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/database"
)

// prepareParallel bounds how many new senders' devices are prepared at once, across all room workers: each takes
// a dozen homeserver requests and a few dozen statements, and the database pool is shared with the relay.
const prepareParallel = 8

// senderPrep hands out the prepareParallel slots.
type senderPrep struct {
	once  sync.Once
	slots chan struct{}
}

func (p *senderPrep) acquire(ctx context.Context) bool {
	p.once.Do(func() { p.slots = make(chan struct{}, prepareParallel) })
	select {
	case p.slots <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

func (p *senderPrep) release() { <-p.slots }

// prepareSenders readies, side by side, the devices of new senders in a batch a room worker is about to relay,
// and brings their ghosts into the link's other rooms, before the batch is relayed one event at a time in order.
// A new sender's device (registration, keys, cross-signing) and joins are most of the cost of its first message;
// without this, a room where many new members speak at once (a busy room just linked) made them wait for each
// other's, and everyone else's messages behind them. Only senders whose messages the relay would carry count:
// encrypted messages whose room key ferry holds, in a linked room, from users ferry relays (not its own, a
// peer's or a blocked user's). Failures are left to the relay, which meets them again and retries them as it
// always does.
func (b *Bridge) prepareSenders(ctx context.Context, room id.RoomID, rows []*database.InboxEvent) {
	prep, ok := b.Crypto.(SenderPreparer)
	if !ok || len(rows) < 2 {
		return // fewer than two rows cannot hold two new senders: the relay prepares one in line
	}
	type newSender struct{ real, ghost id.UserID }
	var senders []newSender
	seen := make(map[id.UserID]bool)
	for _, row := range rows {
		if row.Type != "m.room.encrypted" || seen[row.Sender] {
			continue
		}
		seen[row.Sender] = true
		if b.Ghosts.IsOwn(row.Sender) || b.Config.isPeer(string(row.Sender)) || b.Permission(row.Sender) == LevelBlock {
			continue
		}
		ghost, err := b.Ghosts.GhostChecked(row.Sender)
		if err != nil || prep.SenderReady(ghost) {
			continue
		}
		// Only a message ferry can read will cross: without its room key (a sender who never shared one, or
		// who sends junk), the relay parks it, and nobody gets a ghost or a device for it.
		if evt := parseEncryptedEvent(row.Raw); evt == nil || !b.Crypto.WaitForKey(ctx, evt, 0) {
			continue
		}
		senders = append(senders, newSender{row.Sender, ghost})
	}
	if len(senders) < 2 {
		return // one new sender: the relay prepares it in line
	}
	link, err := b.DB.Links.GetByRoom(ctx, room)
	if err != nil {
		return // not a linked room (a management room, a room a link left): nothing is relayed from it
	}
	targets := link.Others(room)
	var wg sync.WaitGroup
	for _, s := range senders {
		if !b.prep.acquire(ctx) {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer b.prep.release()
			intent := b.AS.Intent(s.ghost)
			if err := intent.EnsureRegistered(ctx); err != nil {
				return
			}
			if err := prep.PrepareSender(ctx, s.ghost); err != nil {
				return
			}
			// The ghost's joins too (membership and moderation checked as the relay checks them).
			for _, target := range targets {
				_ = b.ensureGhost(ctx, intent, room, s.real, target)
			}
		}()
	}
	wg.Wait()
}
