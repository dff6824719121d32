package crypto

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Sharing the next outbound session ahead of time.
//
// A device's outbound Megolm session in a room expires after the room's rotation limits (messages or age), and
// the message that finds it expired would wait for a new session to be created and shared (a to-device request,
// Olm encryption, the session written) on its room worker. Instead, when a session nears its limits, the device
// creates its successor and shares it in the background with the room's members at that moment, under the same
// policy and through the same batched share path. The successor stays in memory (the store holds one outbound
// session per device and room) until the current session expires; the message that finds it expired installs
// the successor and encrypts at once. A successor is only ever installed after its share completed.
//
// Every forced rotation of a room (a member left, a device list changed, !ferry rotate, disappearing messages'
// discards and key destruction) drops the room's successors and invalidates any share of one still running, so
// a member who left never receives a session ferry will use. A successor lost to a restart was never used.

// preshareConcurrency bounds the background shares running at once across all of ferry's devices.
const preshareConcurrency = 4

// preshareTimeout bounds one background share.
const preshareTimeout = 2 * time.Minute

// preshareMaxAgeMargin caps how long before a session's age limit its successor is shared: the successor's own
// age counts from its creation.
const preshareMaxAgeMargin = 10 * time.Minute

// rotationStamp identifies the forced rotations a room went through: a successor prepared under one stamp is
// only valid while the room's stamp is unchanged.
type rotationStamp struct {
	room, all uint64
}

// nextSessions holds the successors shared ahead of time and the background shares running (part of
// storeCache, shared by every device).
type nextSessions struct {
	// rotations counts forced rotations per room, allRotations those of every room at once.
	rotations    map[id.RoomID]uint64
	allRotations uint64
	next         map[outboundKey]*crypto.OutboundGroupSession
	running      map[outboundKey]bool
	active       int
	closed       bool
	// idle is closed and replaced when active drops to zero (for Stop and tests).
	idle chan struct{}
}

func (c *storeCache) stampLocked(room id.RoomID) rotationStamp {
	return rotationStamp{room: c.pre.rotations[room], all: c.pre.allRotations}
}

// dropNext forgets the successors prepared in a room (every room for ""), and makes shares still running for it
// discard theirs. Forced rotations call it before deleting the current sessions, then forgetSuccessors with what
// it returned.
func (c *storeCache) dropNext(room id.RoomID) []*crypto.OutboundGroupSession {
	c.preLock.Lock()
	defer c.preLock.Unlock()
	var dropped []*crypto.OutboundGroupSession
	if room == "" {
		c.pre.allRotations++
		for _, sess := range c.pre.next {
			dropped = append(dropped, sess)
		}
		c.pre.next = nil
		return dropped
	}
	if c.pre.rotations == nil {
		c.pre.rotations = make(map[id.RoomID]uint64)
	}
	c.pre.rotations[room]++
	for k, sess := range c.pre.next {
		if k.room == room {
			dropped = append(dropped, sess)
			delete(c.pre.next, k)
		}
	}
	return dropped
}

// forgetSuccessors deletes what the store holds of successors that were shared but will never be used: their
// inbound copies (key material that no message needs) and their recipients (who could otherwise ask for them).
func (c *storeCache) forgetSuccessors(ctx context.Context, db *dbutil.Database, dropped []*crypto.OutboundGroupSession) error {
	for _, sess := range dropped {
		err := db.DoTxn(ctx, nil, func(ctx context.Context) error {
			if _, err := db.Exec(ctx, sqlDeleteInbound, sess.RoomID, sess.ID()); err != nil {
				return err
			}
			_, err := db.Exec(ctx, sqlDeleteSessionShared, sess.ID())
			return err
		})
		c.forgetSession(sess.RoomID, sess.ID())
		if err != nil {
			return fmt.Errorf("failed to delete the keys of an unused session: %w", err)
		}
	}
	return nil
}

// startPreshare reserves the background share of k's successor: not when one is prepared or running, when
// preshareConcurrency shares run already, or after closePreshare. done must be called when the share ends.
func (c *storeCache) startPreshare(k outboundKey) (stamp rotationStamp, done func(), ok bool) {
	c.preLock.Lock()
	defer c.preLock.Unlock()
	p := &c.pre
	if p.closed || p.running[k] || p.next[k] != nil || p.active >= preshareConcurrency {
		return rotationStamp{}, nil, false
	}
	if p.running == nil {
		p.running = make(map[outboundKey]bool)
	}
	if p.idle == nil {
		p.idle = make(chan struct{})
	}
	p.running[k] = true
	p.active++
	return c.stampLocked(k.room), func() {
		c.preLock.Lock()
		defer c.preLock.Unlock()
		delete(p.running, k)
		if p.active--; p.active == 0 {
			close(p.idle)
			p.idle = make(chan struct{})
		}
	}, true
}

// storeNext keeps a shared successor unless the room was rotated since stamp was taken.
func (c *storeCache) storeNext(k outboundKey, stamp rotationStamp, sess *crypto.OutboundGroupSession) bool {
	c.preLock.Lock()
	defer c.preLock.Unlock()
	if c.pre.closed || c.stampLocked(k.room) != stamp {
		return false
	}
	if c.pre.next == nil {
		c.pre.next = make(map[outboundKey]*crypto.OutboundGroupSession)
	}
	c.pre.next[k] = sess
	return true
}

// takeNext removes and returns k's successor (nil if none) and the room's current stamp.
func (c *storeCache) takeNext(k outboundKey) (*crypto.OutboundGroupSession, rotationStamp) {
	c.preLock.Lock()
	defer c.preLock.Unlock()
	sess := c.pre.next[k]
	delete(c.pre.next, k)
	return sess, c.stampLocked(k.room)
}

func (c *storeCache) stamp(room id.RoomID) rotationStamp {
	c.preLock.Lock()
	defer c.preLock.Unlock()
	return c.stampLocked(room)
}

func (c *storeCache) stampValid(room id.RoomID, stamp rotationStamp) bool {
	c.preLock.Lock()
	defer c.preLock.Unlock()
	return c.stampLocked(room) == stamp
}

// waitPreshare waits until no background share runs, or ctx ends.
func (c *storeCache) waitPreshare(ctx context.Context) error {
	for {
		c.preLock.Lock()
		active, idle := c.pre.active, c.pre.idle
		c.preLock.Unlock()
		if active == 0 {
			return nil
		}
		select {
		case <-idle:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// closePreshare stops new background shares and forgets the prepared successors (at Stop: they are not written).
func (c *storeCache) closePreshare() {
	c.preLock.Lock()
	c.pre.closed = true
	c.pre.next = nil
	c.preLock.Unlock()
}

// nearLimit reports whether sess is close enough to its rotation limits to share its successor: within the last
// tenth of its messages, or of its age (at most preshareMaxAgeMargin before it).
func nearLimit(sess *crypto.OutboundGroupSession) bool {
	margin := max(sess.MaxMessages/10, 1)
	if sess.MessageCount >= sess.MaxMessages-margin {
		return true
	}
	if sess.MaxAge > 0 {
		ageMargin := min(sess.MaxAge/10, preshareMaxAgeMargin)
		if time.Since(sess.CreationTime) >= sess.MaxAge-ageMargin {
			return true
		}
	}
	return false
}

// maybePreshare starts sharing the successor of this device's session in roomID in the background when the
// session nears its limits. It returns at once.
func (d *device) maybePreshare(ctx context.Context, roomID id.RoomID, users func(context.Context) ([]id.UserID, error), policy sharePolicy) {
	c := d.olm.c
	k := outboundKey{d.olm.AccountID, roomID}
	sess := c.cachedOutbound(k)
	if sess == nil || !sess.Shared || !nearLimit(sess) {
		return
	}
	stamp, done, ok := c.startPreshare(k)
	if !ok {
		return
	}
	log := zerolog.Ctx(ctx).With().Stringer("room_id", roomID).Stringer("sender", d.userID).Logger()
	// A context of its own: the message's may end first, and may carry a database transaction that will not
	// outlive the message.
	bg, cancel := context.WithTimeout(log.WithContext(context.Background()), preshareTimeout)
	go func() {
		defer done()
		defer cancel()
		if err := d.preshare(bg, k, stamp, users, policy); err != nil {
			log.Warn().Err(err).Msg("Failed to share the next room key ahead of time; the session's expiry will share one")
		}
	}()
}

// preshare creates the successor session and shares it with the room's members now, then keeps it for the
// encrypt path unless the room was rotated meanwhile.
func (d *device) preshare(ctx context.Context, k outboundKey, stamp rotationStamp, users func(context.Context) ([]id.UserID, error), policy sharePolicy) error {
	// The members are read after the stamp was taken: a member who leaves later rotates the room and changes it.
	members, err := users(ctx)
	if err != nil {
		return err
	}
	start := time.Now()
	session, inbound, err := d.createSession(ctx, k.room, policy)
	if err != nil {
		return err
	}
	stats, err := d.shareSession(ctx, session, inbound, members, policy, start)
	if err != nil {
		return err
	}
	session.Shared = true
	log := zerolog.Ctx(ctx)
	if !d.olm.c.storeNext(k, stamp, session) {
		log.Debug().Stringer("session_id", session.ID()).Msg("Dropped a room key shared ahead of time: the room was rotated meanwhile")
		return d.olm.c.forgetSuccessors(ctx, d.store.DB, []*crypto.OutboundGroupSession{session})
	}
	log.Debug().Stringer("session_id", session.ID()).Int("shared", stats.Shared).Int("withheld", stats.Withheld).
		Dur("elapsed", time.Since(start)).Msg("Shared the next room key ahead of time")
	return nil
}

// promoteNext installs this device's prepared successor in roomID as its outbound session when the current one
// is missing or expired. It reports whether the device now has a usable session.
func (d *device) promoteNext(ctx context.Context, roomID id.RoomID) (bool, error) {
	defer d.shareLock.WithLock(roomID)()
	cur, err := d.olm.GetOutboundGroupSession(ctx, roomID)
	if err != nil {
		return false, err
	} else if cur != nil && cur.Shared && !cur.Expired() {
		// Replaced while this message waited for the lock.
		return true, nil
	}
	k := outboundKey{d.olm.AccountID, roomID}
	next, stamp := d.olm.c.takeNext(k)
	if next == nil {
		return false, nil
	} else if next.Expired() {
		return false, d.olm.c.forgetSuccessors(ctx, d.store.DB, []*crypto.OutboundGroupSession{next})
	}
	if err = d.olm.AddOutboundGroupSession(ctx, next); err != nil {
		return false, err
	}
	if !d.olm.c.stampValid(roomID, stamp) {
		// A forced rotation ran while it was written: it must not be used.
		return false, d.withdraw(ctx, roomID, next)
	}
	zerolog.Ctx(ctx).Debug().Stringer("room_id", roomID).Stringer("sender", d.userID).Stringer("session_id", next.ID()).
		Msg("Switched to the room key shared ahead of time")
	return true, nil
}

// encryptPrepared encrypts with the prepared successor when the current session cannot be used. ok is false
// when there was none (or it could not be installed): the caller shares a session now.
func (d *device) encryptPrepared(ctx context.Context, roomID id.RoomID, evtType event.Type, content *event.Content) (enc *event.EncryptedEventContent, ok bool) {
	promoted, err := d.promoteNext(ctx, roomID)
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", roomID).Msg("Failed to install the room key shared ahead of time")
		return nil, false
	} else if !promoted {
		return nil, false
	}
	enc, err = d.mach.EncryptMegolmEvent(ctx, roomID, evtType, content)
	return enc, err == nil
}
