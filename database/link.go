package database

import (
	"context"
	"database/sql"
	"errors"
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

// maxLinkCache bounds LinkQuery's cache of links by room; past it the cache starts over.
const maxLinkCache = 10000

// LinkQuery reads and writes links. It keeps the link of each room it was asked about in memory (every relayed
// message asks): links change only through its own methods, which drop the cache.
type LinkQuery struct {
	db *dbutil.Database

	cacheLock sync.Mutex
	// gen counts writes; a lookup caches its result only when no write started or ended while it ran.
	gen   uint64
	cache map[id.RoomID]*Link // nil value: the room is not linked
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
	lq.cacheLock.Lock()
	cached, ok := lq.cache[roomID]
	gen := lq.gen
	lq.cacheLock.Unlock()
	if ok {
		if cached == nil {
			return nil, ErrLinkNotFound
		}
		return cached.clone(), nil
	}
	link, err := lq.getByRoom(ctx, roomID)
	if err != nil && !errors.Is(err, ErrLinkNotFound) {
		return nil, err
	}
	lq.cacheLock.Lock()
	if lq.gen == gen {
		if lq.cache == nil || len(lq.cache) >= maxLinkCache {
			// Most rooms asked about are not linked: a flood of them must not grow the cache without bound.
			lq.cache = make(map[id.RoomID]*Link)
		}
		if link != nil {
			lq.cache[roomID] = link.clone()
		} else {
			lq.cache[roomID] = nil
		}
	}
	lq.cacheLock.Unlock()
	return link, err
}

func (l *Link) clone() *Link {
	c := *l
	c.Rooms = append([]id.RoomID(nil), l.Rooms...)
	return &c
}

// getByRoom reads the link of a room from the database (inside a transaction, or to fill the cache).
func (lq *LinkQuery) getByRoom(ctx context.Context, roomID id.RoomID) (*Link, error) {
	var linkID string
	err := lq.db.QueryRow(ctx, `SELECT link_id FROM link_room WHERE room_id=$1`, roomID).Scan(&linkID)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrLinkNotFound
	} else if err != nil {
		return nil, err
	}
	return lq.Get(ctx, linkID)
}

// Get returns a link with its rooms, or ErrLinkNotFound.
func (lq *LinkQuery) Get(ctx context.Context, linkID string) (*Link, error) {
	var link Link
	var createdAt, disappearMS int64
	err := lq.db.QueryRow(ctx, `SELECT id, created_by, created_at, require_encryption, disappear_ms FROM link WHERE id=$1`, linkID).
		Scan(&link.ID, &link.CreatedBy, &createdAt, &link.RequireEncryption, &disappearMS)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrLinkNotFound
	} else if err != nil {
		return nil, err
	}
	link.CreatedAt = time.UnixMilli(createdAt)
	link.DisappearAfter = time.Duration(disappearMS) * time.Millisecond
	rows, err := lq.db.Query(ctx, `SELECT room_id FROM link_room WHERE link_id=$1 ORDER BY added_at, room_id`, linkID)
	link.Rooms, err = dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.RoomID], err).AsList()
	if err != nil {
		return nil, err
	}
	return &link, nil
}

// All lists every link.
func (lq *LinkQuery) All(ctx context.Context) ([]*Link, error) {
	rows, err := lq.db.Query(ctx, `SELECT id FROM link ORDER BY created_at, id`)
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
			if _, err = lq.db.Exec(ctx, `INSERT INTO link (id, created_by, created_at) VALUES ($1, $2, $3)`, newLinkID, by, now.UnixMilli()); err != nil {
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
	_, err := lq.db.Exec(ctx, `INSERT INTO link_room (room_id, link_id, added_by, added_at) VALUES ($1, $2, $3, $4)`, room, linkID, by, now.UnixMilli())
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
			_, err = lq.db.Exec(ctx, `DELETE FROM link_room WHERE link_id=$1`, before.ID)
			if err == nil {
				_, err = lq.db.Exec(ctx, `DELETE FROM link WHERE id=$1`, before.ID)
			}
			return err
		}
		_, err = lq.db.Exec(ctx, `DELETE FROM link_room WHERE room_id=$1`, room)
		return err
	})
	return before, err
}

// SetRequireEncryption changes a link's encryption policy.
func (lq *LinkQuery) SetRequireEncryption(ctx context.Context, linkID string, require bool) error {
	lq.invalidate()
	defer lq.invalidate()
	_, err := lq.db.Exec(ctx, `UPDATE link SET require_encryption=$2 WHERE id=$1`, linkID, require)
	return err
}

// SetDisappear changes a link's disappearing-message timer (0 = off).
func (lq *LinkQuery) SetDisappear(ctx context.Context, linkID string, after time.Duration) error {
	lq.invalidate()
	defer lq.invalidate()
	_, err := lq.db.Exec(ctx, `UPDATE link SET disappear_ms=$2 WHERE id=$1`, linkID, after.Milliseconds())
	return err
}
