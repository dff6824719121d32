package crypto

import (
	"context"
	"strconv"
	"strings"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// The statements of a user's device list written at once (cachedStore.PutDevices). mautrix's store writes it in a
// transaction of three statements: the user tracked and up to date, every device of theirs marked deleted, the
// listed ones upserted (an existing device keeps its signing key). On Postgres ferry writes the same in one
// statement, and reads back the rows as stored for the trust cache.
const (
	sqlPutDevicesTracked = `WITH tracked AS (
		INSERT INTO crypto_tracked_user (user_id, devices_outdated, last_attempt, error_count) VALUES ($1, false, $2, 0)
		ON CONFLICT (user_id) DO UPDATE SET devices_outdated=excluded.devices_outdated,
			last_attempt=excluded.last_attempt, error_count=excluded.error_count)`
	sqlPutDevicesNone   = sqlPutDevicesTracked + ` UPDATE crypto_device SET deleted=true WHERE user_id=$1`
	sqlPutDevicesGone   = `, gone AS (UPDATE crypto_device SET deleted=true WHERE user_id=$1 AND device_id NOT IN (`
	sqlPutDevicesInsert = `)) INSERT INTO crypto_device (user_id, device_id, identity_key, signing_key, trust, deleted, name) VALUES `
	sqlPutDevicesTail   = ` ON CONFLICT (user_id, device_id) DO UPDATE SET identity_key=excluded.identity_key,
		deleted=excluded.deleted, trust=excluded.trust, name=excluded.name
		RETURNING device_id, identity_key, signing_key, trust, deleted, name`
	putDevicesRowWidth = 6 // device_id, identity_key, signing_key, trust, deleted, name; $1 is the user
	// maxPutDevices bounds the devices one statement writes (mautrix writes 100 a statement); a longer list
	// goes through mautrix's transaction.
	maxPutDevices = 100
)

// sqlPutDevices writes a user's list of n devices ($1 the user, $2 the time, then putDevicesRowWidth values each).
func sqlPutDevices(n int) string {
	if n == 0 {
		return sqlPutDevicesNone
	}
	var sb strings.Builder
	sb.WriteString(sqlPutDevicesTracked)
	sb.WriteString(sqlPutDevicesGone)
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString("$" + strconv.Itoa(3+i*putDevicesRowWidth))
	}
	sb.WriteString(sqlPutDevicesInsert)
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString("($1")
		for c := range putDevicesRowWidth {
			sb.WriteString(",$" + strconv.Itoa(3+i*putDevicesRowWidth+c))
		}
		sb.WriteByte(')')
	}
	sb.WriteString(sqlPutDevicesTail)
	return sb.String()
}

// putDevices writes userID's device list in one statement and returns the listed devices as stored. ok is false
// where that does not apply (SQLite, a longer list than one statement takes); nothing is written then.
func (s *cachedStore) putDevices(ctx context.Context, userID id.UserID, devices map[id.DeviceID]*id.Device) (stored []*id.Device, ok bool, err error) {
	if s.DB.Dialect != dbutil.Postgres || len(devices) > maxPutDevices {
		return nil, false, nil
	}
	args := make([]any, 0, 2+len(devices)*putDevicesRowWidth)
	args = append(args, userID, time.Now().Unix())
	for _, d := range devices {
		args = append(args, d.DeviceID, d.IdentityKey, d.SigningKey, d.Trust, d.Deleted, d.Name)
	}
	if len(devices) == 0 {
		_, err = s.DB.Exec(ctx, sqlPutDevicesNone, args...)
		return nil, true, err
	}
	rows, err := s.DB.Query(ctx, sqlPutDevices(len(devices)), args...)
	if err != nil {
		return nil, true, err
	}
	stored, err = dbutil.NewRowIterWithError(rows, func(row dbutil.Scannable) (*id.Device, error) {
		d := &id.Device{UserID: userID}
		return d, row.Scan(&d.DeviceID, &d.IdentityKey, &d.SigningKey, &d.Trust, &d.Deleted, &d.Name)
	}, nil).AsList()
	return stored, true, err
}

// devicesWritten ends a write of user's device list that began at since (trustWrite). A device list changes no
// cross-signing key or signature, so those stay cached; the devices found by key are replaced by what the write
// stored when it committed on its own and no other write about user overlapped it, and dropped otherwise.
func (c *storeCache) devicesWritten(user id.UserID, since uint64, done bool, stored []*id.Device) {
	c.lock.Lock()
	defer c.lock.Unlock()
	stale := !done || c.allGen > since || c.trustGen[user] > since
	c.writtenLocked(user)
	t := c.trust[user]
	if stale {
		if t != nil {
			t.devByKey = nil
		}
		return
	}
	c.entryLocked(user).devicesStored(stored)
}

// devicesStored applies a committed write of the user's device list, which stored these rows: the devices it no
// longer lists are marked deleted, as the store marks them.
func (t *cachedTrust) devicesStored(stored []*id.Device) {
	listed := make(map[id.DeviceID]bool, len(stored))
	for _, d := range stored {
		listed[d.DeviceID] = true
	}
	byKey := make(map[id.IdentityKey]*id.Device, len(stored)+len(t.devByKey))
	for key, d := range t.devByKey {
		if !listed[d.DeviceID] {
			cp := *d
			cp.Deleted = true
			byKey[key] = &cp
		}
	}
	for _, d := range stored {
		if _, twice := byKey[d.IdentityKey]; twice {
			t.devByKey = nil // two devices with one key: the store's answer is not known
			return
		}
		byKey[d.IdentityKey] = d
	}
	t.devByKey = byKey
}
