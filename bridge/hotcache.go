package bridge

import (
	"context"
	"slices"
	"sync"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// hotCache keeps in memory what every relayed message would otherwise read from the state store although it
// rarely changes: which rooms are encrypted, and which ghosts are already in a target room with an up-to-date
// name and avatar.
type hotCache struct {
	// encrypted holds rooms known to be encrypted. Matrix has no way to turn encryption off, so an entry never
	// goes stale; rooms not (yet) encrypted are not cached.
	encrypted sync.Map // id.RoomID → struct{}

	lock sync.Mutex
	// roomGen counts, per room, the name and alias changes handled there (and failed sends into it), memberGen
	// the member events per room and member, and epoch counts clears of both: an entry computed while a change
	// that would have forgotten it was handled (see stateChanged) is not stored. Other changes (other ghosts
	// joining the same busy room, at every new sender of a room just linked) leave it alone.
	roomGen   map[id.RoomID]uint64
	memberGen map[roomMember]uint64
	epoch     uint64
	// ghosts holds (source room, real user, target room), with the ghost's user ID, whose ghost was in the
	// target with the name and avatar derived from the source the last time it was checked, and since then no
	// name or alias event was handled in the source, nor a member event of the real user there, nor one of the
	// real user or the ghost in the target.
	ghosts map[ghostKey]id.UserID
	// sent holds, per room and ghost, the last member event ferry sent for the ghost (its join or profile
	// change, recorded in the state store; the bot's invite of it, which need not be), so that their echoes are
	// known as ferry's own without reading the store (ownJoinEcho, ownInviteEcho). An entry goes when the join's
	// echo came or a member event of the ghost in the room was applied (stateChanged).
	sent map[roomMember]sentMember
}

// sentMember is what a member event ferry sent set.
type sentMember struct {
	membership event.Membership
	name       string
	avatar     id.ContentURIString
}

// hotGen is what an entry's rooms had seen when its computation began (see generation).
type hotGen struct{ epoch, changes uint64 }

type ghostKey struct {
	source id.RoomID
	real   id.UserID
	target id.RoomID
}

type roomMember struct {
	room   id.RoomID
	member id.UserID
}

func (h *hotCache) ghostReady(k ghostKey) bool {
	h.lock.Lock()
	defer h.lock.Unlock()
	_, ok := h.ghosts[k]
	return ok
}

// generation is taken before the entry of ghost is computed and handed to setGhostReady after. It sums the
// counters of what the entry depends on (memberAffects, and both rooms' names): they only grow, so the sum changes
// whenever one does.
func (h *hotCache) generation(k ghostKey, ghost id.UserID) hotGen {
	h.lock.Lock()
	defer h.lock.Unlock()
	return h.genLocked(k, ghost)
}

func (h *hotCache) genLocked(k ghostKey, ghost id.UserID) hotGen {
	changes := h.roomGen[k.source] + h.roomGen[k.target]
	for _, dep := range memberDeps(k, ghost) {
		changes += h.memberGen[dep]
	}
	return hotGen{h.epoch, changes}
}

func (h *hotCache) setGhostReady(k ghostKey, ghost id.UserID, gen hotGen) {
	h.lock.Lock()
	defer h.lock.Unlock()
	if h.genLocked(k, ghost) != gen {
		return
	}
	if h.ghosts == nil || boundedCacheFull(len(h.ghosts)) {
		h.ghosts = make(map[ghostKey]id.UserID)
	}
	h.ghosts[k] = ghost
}

// changedLocked counts a change of room itself (its name or alias). A full counter map starts both again empty
// under a new epoch, which every computation under way then misses.
func (h *hotCache) changedLocked(room id.RoomID) {
	if h.roomGen == nil || boundedCacheFull(len(h.roomGen)) {
		h.clearCountersLocked()
	}
	h.roomGen[room]++
}

// memberChangedLocked counts a member event of member in room, like changedLocked.
func (h *hotCache) memberChangedLocked(room id.RoomID, member id.UserID) {
	if h.memberGen == nil || boundedCacheFull(len(h.memberGen)) {
		h.clearCountersLocked()
	}
	h.memberGen[roomMember{room, member}]++
}

func (h *hotCache) clearCountersLocked() {
	h.roomGen = make(map[id.RoomID]uint64)
	h.memberGen = make(map[roomMember]uint64)
	h.epoch++
}

// stateChanged forgets the ghost entries a state event in room may change: those of the member a member event is
// about (the real user in the source; the real user or the ghost in the target: a kick, a ban, a profile change),
// or all of the room's for a rename used by the name template. Other state events, and other rooms' entries, are
// left alone: ghosts joining a busy room one after another do not make each other's entries computed again.
func (h *hotCache) stateChanged(t event.Type, room id.RoomID, stateKey string) {
	switch t {
	case event.StateMember, event.StateRoomName, event.StateCanonicalAlias:
	default:
		return
	}
	member := id.UserID(stateKey)
	h.lock.Lock()
	defer h.lock.Unlock()
	if t == event.StateMember {
		h.memberChangedLocked(room, member)
		delete(h.sent, roomMember{room, member})
	} else {
		h.changedLocked(room)
	}
	for k, ghost := range h.ghosts {
		switch {
		case t != event.StateMember:
			if k.source == room || k.target == room {
				delete(h.ghosts, k)
			}
		case memberAffects(k, ghost, room, member):
			delete(h.ghosts, k)
		}
	}
}

// memberDeps are the member events the entry k of ghost depends on: the real user's own in the source (their name
// and avatar), the real user's and the ghost's in the target (a kick, a ban). Eviction (memberAffects) and the
// in-flight check (genLocked) both go by it.
func memberDeps(k ghostKey, ghost id.UserID) [3]roomMember {
	return [3]roomMember{{k.source, k.real}, {k.target, k.real}, {k.target, ghost}}
}

// memberAffects reports whether member's member event in room can change the entry k of ghost (memberDeps).
func memberAffects(k ghostKey, ghost id.UserID, room id.RoomID, member id.UserID) bool {
	deps := memberDeps(k, ghost)
	return slices.Contains(deps[:], roomMember{room, member})
}

// forgetGhost forgets one entry (a send as that ghost failed: its membership is checked again next time).
func (h *hotCache) forgetGhost(k ghostKey) {
	h.lock.Lock()
	defer h.lock.Unlock()
	h.changedLocked(k.target)
	delete(h.ghosts, k)
}

// noteSent records the member event ferry just sent for ghost in room (sent).
func (h *hotCache) noteSent(room id.RoomID, ghost id.UserID, content *event.MemberEventContent) {
	h.lock.Lock()
	defer h.lock.Unlock()
	if h.sent == nil || boundedCacheFull(len(h.sent)) {
		h.sent = make(map[roomMember]sentMember)
	}
	h.sent[roomMember{room, ghost}] = sentMember{content.Membership, content.Displayname, content.AvatarURL}
}

// lastSent is the member event ferry last sent for ghost in room, if sent still holds it.
func (h *hotCache) lastSent(room id.RoomID, ghost id.UserID) (sentMember, bool) {
	h.lock.Lock()
	defer h.lock.Unlock()
	m, ok := h.sent[roomMember{room, ghost}]
	return m, ok
}

// takeSent reports whether the member event ferry last sent for ghost in room is want, and drops it if so.
func (h *hotCache) takeSent(room id.RoomID, ghost id.UserID, want sentMember) bool {
	h.lock.Lock()
	defer h.lock.Unlock()
	if m, ok := h.sent[roomMember{room, ghost}]; !ok || m != want {
		return false
	}
	delete(h.sent, roomMember{room, ghost})
	return true
}

// isEncrypted is StateStore.IsEncrypted, remembering rooms found encrypted.
func (b *Bridge) isEncrypted(ctx context.Context, room id.RoomID) (bool, error) {
	if _, ok := b.hot.encrypted.Load(room); ok {
		return true, nil
	}
	enc, err := b.StateStore.IsEncrypted(ctx, room)
	if err == nil && enc {
		b.hot.encrypted.Store(room, struct{}{})
	}
	return enc, err
}

// ownJoinEcho reports whether evt is the homeserver's echo of a join (or profile change) a ghost of ferry's sent
// itself and the state store already holds as the event has it: writing it again would change nothing, and the
// ghost's entries were (or are being) computed with it, so forgetting them, or keeping one being computed from being
// stored, would only make the ghost's next messages check it all again.
func (b *Bridge) ownJoinEcho(ctx context.Context, evt *event.Event) bool {
	if evt.Type != event.StateMember || evt.StateKey == nil || id.UserID(*evt.StateKey) != evt.Sender || !b.Ghosts.IsOwn(evt.Sender) {
		return false
	}
	content := evt.Content.AsMember()
	if content.Membership != event.MembershipJoin {
		return false
	}
	// What ferry sent, when it still knows: the store holds that (a later change of the ghost there would have
	// dropped it). The echo of the ghost's join is the last one it waits for.
	if b.hot.takeSent(evt.RoomID, evt.Sender, sentMember{event.MembershipJoin, content.Displayname, content.AvatarURL}) {
		return true
	}
	stored, err := b.StateStore.TryGetMember(ctx, evt.RoomID, evt.Sender)
	return err == nil && stored != nil && stored.Membership == event.MembershipJoin &&
		stored.Displayname == content.Displayname && stored.AvatarURL == content.AvatarURL
}

// ownInviteEcho reports whether evt is the homeserver's echo of the bot's invite of one of ferry's ghosts that
// changes nothing the state store holds: the invite itself as the event has it (mautrix's client recorded it when
// the bot sent it), or the ghost's join since (recorded when the ghost sent it; a joined member cannot be
// invited, so the invite is older than the join). Applied, the first would write the same row again, the second
// would record the ghost as only invited until the join's echo; either would forget the ghost's cached entries.
func (b *Bridge) ownInviteEcho(ctx context.Context, evt *event.Event) bool {
	if evt.Type != event.StateMember || evt.StateKey == nil || evt.Sender != b.AS.BotMXID() || !b.Ghosts.IsOwn(id.UserID(*evt.StateKey)) {
		return false
	}
	content := evt.Content.AsMember()
	if content.Membership != event.MembershipInvite {
		return false
	}
	// What ferry sent since, when it still knows: the ghost's join, or this invite (which the store need not hold:
	// the join follows it, and a ghost found not joined is invited again).
	if sent, ok := b.hot.lastSent(evt.RoomID, id.UserID(*evt.StateKey)); ok &&
		(sent.membership == event.MembershipJoin || sent == (sentMember{event.MembershipInvite, content.Displayname, content.AvatarURL})) {
		return true
	}
	stored, err := b.StateStore.TryGetMember(ctx, evt.RoomID, id.UserID(*evt.StateKey))
	if err != nil || stored == nil {
		return false
	}
	return stored.Membership == event.MembershipJoin ||
		(stored.Membership == event.MembershipInvite && stored.Displayname == content.Displayname && stored.AvatarURL == content.AvatarURL)
}
