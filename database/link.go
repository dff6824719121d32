package database

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// ErrLinkNotFound is returned when a room is not part of any link. Callers ignore the event (nothing to relay)
// or tell the user the room is not linked.
var ErrLinkNotFound = errors.New("room is not linked")

// ErrRoomAlreadyLinked is returned by AddRoom when the room already belongs to a link: a room belongs to at most one.
var ErrRoomAlreadyLinked = errors.New("room already belongs to a link")

// Link joins two or more rooms.
type Link struct {
	ID                string
	CreatedBy         id.UserID
	CreatedAt         time.Time
	RequireEncryption bool
	DisappearAfter    time.Duration
	Rooms             []id.RoomID
	// Retired lists the rooms the link moved out of when they were upgraded, oldest first.
	Retired []RetiredRoom
}

// RetiredRoom is a room a link moved out of when it was upgraded: Successor replaced it, and Current (a room of
// the link) stands for it now, at the end of its chain of successors.
type RetiredRoom struct {
	RoomID    id.RoomID
	Successor id.RoomID
	Current   id.RoomID
	MovedAt   time.Time
}

// Predecessors returns the rooms room replaced (directly or through earlier upgrades), newest first: where the
// events from before its upgrades live.
func (l *Link) Predecessors(room id.RoomID) []id.RoomID {
	var out []id.RoomID
	for i := len(l.Retired) - 1; i >= 0; i-- {
		if l.Retired[i].Current == room {
			out = append(out, l.Retired[i].RoomID)
		}
	}
	return out
}

// CurrentOf returns the room of the link that stands for room: room itself when it belongs to the link, the end
// of its chain of successors when it was upgraded, or "" when it is neither.
func (l *Link) CurrentOf(room id.RoomID) id.RoomID {
	for _, r := range l.Rooms {
		if r == room {
			return r
		}
	}
	for _, r := range l.Retired {
		if r.RoomID == room {
			return r.Current
		}
	}
	return ""
}

// Others returns the link's rooms except the given one.
func (l *Link) Others(roomID id.RoomID) []id.RoomID {
	out := make([]id.RoomID, 0, len(l.Rooms))
	for _, r := range l.Rooms {
		if r != roomID {
			out = append(out, r)
		}
	}
	return out
}

// SQL on link, link_room and link_predecessor.
const (
	allLinkIDsQuery        = `SELECT id FROM link ORDER BY created_at, id`
	insertLinkQuery        = `INSERT INTO link (id, created_by, created_at) VALUES ($1, $2, $3)`
	deleteLinkQuery        = `DELETE FROM link WHERE id=$1`
	setLinkEncryptionQuery = `UPDATE link SET require_encryption=$2 WHERE id=$1`
	setLinkDisappearQuery  = `UPDATE link SET disappear_ms=$2 WHERE id=$1`

	insertLinkRoomQuery  = `INSERT INTO link_room (room_id, link_id, added_by, added_at) VALUES ($1, $2, $3, $4)`
	deleteLinkRoomQuery  = `DELETE FROM link_room WHERE room_id=$1`
	deleteLinkRoomsQuery = `DELETE FROM link_room WHERE link_id=$1`
	moveLinkRoomQuery    = `UPDATE link_room SET room_id=$2 WHERE room_id=$1`

	getSuccessorQuery = `SELECT successor FROM link_predecessor WHERE room_id=$1`
	// A retired room's successor is its current room until that is upgraded too (moveRetiredQuery).
	insertRetiredQuery   = `INSERT INTO link_predecessor (room_id, successor, current_room, link_id, moved_at) VALUES ($1, $2, $2, $3, $4)`
	moveRetiredQuery     = `UPDATE link_predecessor SET current_room=$2 WHERE current_room=$1`
	deleteRetiredOfQuery = `DELETE FROM link_predecessor WHERE current_room=$1`
)

// maxLinkCache bounds LinkQuery's cache of links by room; past it the cache starts over.
const maxLinkCache = 10000

// LinkQuery reads and writes links. It keeps the link of each room it was asked about in memory (every relayed
// message asks): links change only through its own methods, which drop the cache.
type LinkQuery struct {
	db *dbutil.Database

	cacheLock sync.Mutex
	// gen counts writes; a lookup caches its result only when no write started or ended while it ran.
	gen   uint64
	cache map[linkCacheKey]*Link // nil value: the room is not linked (or not retired from a link)
}

// linkCacheKey is a room, looked up as a room of a link or as a room a link moved out of (GetByRetired).
type linkCacheKey struct {
	room    id.RoomID
	retired bool
}

// invalidate drops the cache. Writers call it before and after their transaction.
func (lq *LinkQuery) invalidate() {
	lq.cacheLock.Lock()
	lq.gen++
	lq.cache = nil
	lq.cacheLock.Unlock()
}

// GetByRoom returns the link a room belongs to, or ErrLinkNotFound.
func (lq *LinkQuery) GetByRoom(ctx context.Context, roomID id.RoomID) (*Link, error) {
	return lq.cached(ctx, linkCacheKey{room: roomID})
}

// GetByRetired returns the link a room was part of until it was upgraded and the link moved to its successor,
// or ErrLinkNotFound.
func (lq *LinkQuery) GetByRetired(ctx context.Context, roomID id.RoomID) (*Link, error) {
	return lq.cached(ctx, linkCacheKey{room: roomID, retired: true})
}

func (lq *LinkQuery) cached(ctx context.Context, key linkCacheKey) (*Link, error) {
	lq.cacheLock.Lock()
	cached, ok := lq.cache[key]
	gen := lq.gen
	lq.cacheLock.Unlock()
	if ok {
		if cached == nil {
			return nil, ErrLinkNotFound
		}
		return cached.clone(), nil
	}
	var link *Link
	var err error
	if key.retired {
		link, err = lq.getByRetired(ctx, key.room)
	} else {
		link, err = lq.getByRoom(ctx, key.room)
	}
	if err != nil && !errors.Is(err, ErrLinkNotFound) {
		return nil, err
	}
	lq.cacheLock.Lock()
	if lq.gen == gen {
		if lq.cache == nil || len(lq.cache) >= maxLinkCache {
			// Most rooms asked about are not linked: a flood of them must not grow the cache without bound.
			lq.cache = make(map[linkCacheKey]*Link)
		}
		if link != nil {
			lq.cache[key] = link.clone()
		} else {
			lq.cache[key] = nil
		}
	}
	lq.cacheLock.Unlock()
	return link, err
}

func (l *Link) clone() *Link {
	c := *l
	c.Rooms = append([]id.RoomID(nil), l.Rooms...)
	c.Retired = append([]RetiredRoom(nil), l.Retired...)
	return &c
}

// getByRoom reads the link of a room from the database (inside a transaction, or to fill the cache).
func (lq *LinkQuery) getByRoom(ctx context.Context, roomID id.RoomID) (*Link, error) {
	return lq.read(ctx, linkWholeOfRoom, string(roomID))
}

// getByRetired reads the link a room was upgraded out of.
func (lq *LinkQuery) getByRetired(ctx context.Context, roomID id.RoomID) (*Link, error) {
	return lq.read(ctx, linkWholeOfRetired, string(roomID))
}

// Get returns a link with its rooms, or ErrLinkNotFound.
func (lq *LinkQuery) Get(ctx context.Context, linkID string) (*Link, error) {
	return lq.read(ctx, linkWholeOfID, linkID)
}

// How read finds the link it reads: by its ID, as the link of a room, or as the link a room was upgraded out of.
const (
	linkOfID      = `$1`
	linkOfRoom    = `(SELECT link_id FROM link_room WHERE room_id=$1)`
	linkOfRetired = `(SELECT link_id FROM link_predecessor WHERE room_id=$1)`
)

// sqlLinkWhole reads a link (kind 0), its rooms (1) and the rooms it moved out of (2) in one statement, each
// kind in the order of the queries it replaces (rooms by added_at, retired rooms by moved_at, then room ID);
// %s finds the link (linkOfID, linkOfRoom, linkOfRetired).
const sqlLinkWhole = `WITH l AS (SELECT id, created_by, created_at, require_encryption, disappear_ms FROM link WHERE id=%s)
	SELECT 0, id, created_by, created_at, require_encryption, disappear_ms, NULL FROM l
	UNION ALL SELECT 1, room_id, NULL, added_at, NULL, NULL, NULL FROM link_room WHERE link_id=(SELECT id FROM l)
	UNION ALL SELECT 2, room_id, successor, moved_at, NULL, NULL, current_room FROM link_predecessor WHERE link_id=(SELECT id FROM l)
	ORDER BY 1, 4, 2`

var (
	linkWholeOfID      = fmt.Sprintf(sqlLinkWhole, linkOfID)
	linkWholeOfRoom    = fmt.Sprintf(sqlLinkWhole, linkOfRoom)
	linkWholeOfRetired = fmt.Sprintf(sqlLinkWhole, linkOfRetired)
)

// read returns the link query (linkWholeOf…) finds for arg, with its rooms, or ErrLinkNotFound: one statement,
// where reading the link, its rooms and its retired rooms took four (with the lookup of a room's link).
func (lq *LinkQuery) read(ctx context.Context, query, arg string) (*Link, error) {
	rows, err := lq.db.Query(ctx, query, arg)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var link *Link
	for rows.Next() {
		var kind int
		var a string
		var b, f sql.NullString
		var at, disappearMS sql.NullInt64
		var requireEnc sql.NullBool
		if err = rows.Scan(&kind, &a, &b, &at, &requireEnc, &disappearMS, &f); err != nil {
			return nil, err
		}
		switch {
		case kind == 0:
			link = &Link{ID: a, CreatedBy: id.UserID(b.String), CreatedAt: time.UnixMilli(at.Int64),
				RequireEncryption: requireEnc.Bool, DisappearAfter: time.Duration(disappearMS.Int64) * time.Millisecond}
		case link == nil:
			return nil, fmt.Errorf("link rows before the link itself (kind %d)", kind)
		case kind == 1:
			link.Rooms = append(link.Rooms, id.RoomID(a))
		case kind == 2:
			link.Retired = append(link.Retired, RetiredRoom{RoomID: id.RoomID(a), Successor: id.RoomID(b.String),
				Current: id.RoomID(f.String), MovedAt: time.UnixMilli(at.Int64)})
		}
	}
	if err = rows.Err(); err != nil {
		return nil, err
	}
	if link == nil {
		return nil, ErrLinkNotFound
	}
	return link, nil
}

// All lists every link.
func (lq *LinkQuery) All(ctx context.Context) ([]*Link, error) {
	rows, err := lq.db.Query(ctx, allLinkIDsQuery)
	ids, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[string], err).AsList()
	if err != nil {
		return nil, err
	}
	out := make([]*Link, 0, len(ids))
	for _, linkID := range ids {
		link, err := lq.Get(ctx, linkID)
		if err != nil {
			return nil, err
		}
		out = append(out, link)
	}
	return out, nil
}

// Join links rooms a and b: when one of them already belongs to a link, the other joins that link; when
// neither does, a new link with the given ID is created. It fails with ErrRoomAlreadyLinked when both already
// belong to links. One transaction.
func (lq *LinkQuery) Join(ctx context.Context, newLinkID string, a, b id.RoomID, by id.UserID, now time.Time) (*Link, error) {
	var link *Link
	lq.invalidate()
	defer lq.invalidate()
	err := lq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		linkA, err := lq.getByRoom(ctx, a)
		if err != nil && !errors.Is(err, ErrLinkNotFound) {
			return err
		}
		linkB, err := lq.getByRoom(ctx, b)
		if err != nil && !errors.Is(err, ErrLinkNotFound) {
			return err
		}
		switch {
		case linkA != nil && linkB != nil:
			return ErrRoomAlreadyLinked
		case linkA != nil:
			err = lq.addRoom(ctx, linkA.ID, b, by, now)
			link = linkA
		case linkB != nil:
			err = lq.addRoom(ctx, linkB.ID, a, by, now)
			link = linkB
		default:
			if _, err = lq.db.Exec(ctx, insertLinkQuery, newLinkID, by, now.UnixMilli()); err != nil {
				return err
			}
			if err = lq.addRoom(ctx, newLinkID, a, by, now); err != nil {
				return err
			}
			err = lq.addRoom(ctx, newLinkID, b, by, now.Add(time.Millisecond))
			link = &Link{ID: newLinkID}
		}
		if err != nil {
			return err
		}
		link, err = lq.Get(ctx, link.ID)
		return err
	})
	return link, err
}

func (lq *LinkQuery) addRoom(ctx context.Context, linkID string, room id.RoomID, by id.UserID, now time.Time) error {
	_, err := lq.db.Exec(ctx, insertLinkRoomQuery, room, linkID, by, now.UnixMilli())
	return err
}

// Leave removes a room from its link. When fewer than two rooms would remain, the whole link is dissolved.
// It returns the link as it was before.
func (lq *LinkQuery) Leave(ctx context.Context, room id.RoomID) (*Link, error) {
	var before *Link
	lq.invalidate()
	defer lq.invalidate()
	err := lq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		var err error
		before, err = lq.getByRoom(ctx, room)
		if err != nil {
			return err
		}
		if len(before.Rooms) <= 2 {
			_, err = lq.db.Exec(ctx, deleteLinkRoomsQuery, before.ID)
			if err == nil {
				_, err = lq.db.Exec(ctx, deleteLinkQuery, before.ID)
			}
			return err
		}
		if _, err = lq.db.Exec(ctx, deleteRetiredOfQuery, room); err != nil {
			return err
		}
		_, err = lq.db.Exec(ctx, deleteLinkRoomQuery, room)
		return err
	})
	return before, err
}

// MoveRoom moves old's place in its link to successor, because old was upgraded (replaced by successor). old is
// remembered as a retired room of the link (see Link.Retired). moved is false when old's link had already moved
// to successor (a second call changes nothing). It fails with ErrLinkNotFound when old is in no link, and with
// ErrRoomAlreadyLinked when successor belongs to a link already. One transaction.
func (lq *LinkQuery) MoveRoom(ctx context.Context, old, successor id.RoomID, now time.Time) (link *Link, moved bool, err error) {
	lq.invalidate()
	defer lq.invalidate()
	err = lq.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		var err error
		link, err = lq.getByRoom(ctx, old)
		if errors.Is(err, ErrLinkNotFound) {
			// Moved already (by the tombstone or by the invite into the new room, whichever came second)?
			var was id.RoomID
			if qerr := lq.db.QueryRow(ctx, getSuccessorQuery, old).Scan(&was); qerr == nil && was == successor {
				link, err = lq.getByRoom(ctx, successor)
			}
			return err
		} else if err != nil {
			return err
		}
		if other, err := lq.getByRoom(ctx, successor); err == nil {
			if other.ID == link.ID {
				return nil // linked already, e.g. by a link command: nothing to move
			}
			return ErrRoomAlreadyLinked
		} else if !errors.Is(err, ErrLinkNotFound) {
			return err
		}
		if _, err = lq.db.Exec(ctx, moveRetiredQuery, old, successor); err != nil {
			return err
		}
		if _, err = lq.db.Exec(ctx, insertRetiredQuery, old, successor, link.ID, now.UnixMilli()); err != nil {
			return err
		}
		if _, err = lq.db.Exec(ctx, moveLinkRoomQuery, old, successor); err != nil {
			return err
		}
		moved = true
		link, err = lq.Get(ctx, link.ID)
		return err
	})
	return link, moved, err
}

// SetRequireEncryption changes a link's encryption policy.
func (lq *LinkQuery) SetRequireEncryption(ctx context.Context, linkID string, require bool) error {
	lq.invalidate()
	defer lq.invalidate()
	_, err := lq.db.Exec(ctx, setLinkEncryptionQuery, linkID, require)
	return err
}

// SetDisappear changes a link's disappearing-message timer (0 = off).
func (lq *LinkQuery) SetDisappear(ctx context.Context, linkID string, after time.Duration) error {
	lq.invalidate()
	defer lq.invalidate()
	_, err := lq.db.Exec(ctx, setLinkDisappearQuery, linkID, after.Milliseconds())
	return err
}
