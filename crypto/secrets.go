package crypto

import (
	"context"
	"database/sql"
	"fmt"

	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/goolm/libolmpickle"
	"maunium.net/go/mautrix/id"
)

// secretStore reads and writes one account's secrets: the crypto store itself, or a secretCache over it.
type secretStore interface {
	GetSecret(ctx context.Context, name id.Secret) (string, error)
	PutSecret(ctx context.Context, name id.Secret, value string) error
	DeleteSecret(ctx context.Context, name id.Secret) error
}

var (
	_ secretStore = (*crypto.SQLCryptoStore)(nil)
	_ secretStore = (*secretCache)(nil)
)

// secretCache is one account's secrets as a set-up reads and writes them: a new ghost's device asks for a dozen
// (its password, access token, cross-signing seeds and the markers of what it published and signed), each its own
// statement through the store. The cache reads them all in one statement when first asked and answers from
// memory after that; writes go to the store at once, as before (each step is recorded before the next), and
// into memory.
//
// It is valid only while nothing else writes the account's secrets: make one per set-up, under the lock that
// keeps other set-ups of the same account away (ghostCreate for a ghost, Init for the bot, adminLock's single
// login for the admin helper), and drop it afterwards.
type secretCache struct {
	store *crypto.SQLCryptoStore
	vals  map[id.Secret]string
	// bad holds the secrets that could not be unpickled: asking for one returns its error, as the store would.
	bad map[id.Secret]error
}

func newSecretCache(store *crypto.SQLCryptoStore) *secretCache {
	return &secretCache{store: store}
}

func (c *secretCache) load(ctx context.Context) error {
	if c.vals != nil {
		return nil
	}
	_, err := c.loadWithDevice(ctx)
	return err
}

// loadWithDevice reads the account's secrets and, in the same query, the device ID of its stored Olm account
// ("" when none is stored), which a ghost's set-up needs first (the store's FindDeviceID); load, for the
// accounts that need only the secrets, drops it.
func (c *secretCache) loadWithDevice(ctx context.Context) (id.DeviceID, error) {
	rows, err := c.store.DB.Query(ctx, sqlAccountDeviceAndSecrets, c.store.AccountID)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var deviceID id.DeviceID
	vals, bad := make(map[id.Secret]string), make(map[id.Secret]error)
	for rows.Next() {
		var device, name sql.NullString
		var pickled []byte
		if err = rows.Scan(&device, &name, &pickled); err != nil {
			return "", err
		}
		if device.Valid {
			deviceID = id.DeviceID(device.String)
		} else {
			c.unpickle(vals, bad, id.Secret(name.String), pickled)
		}
	}
	if err = rows.Err(); err != nil {
		return "", err
	}
	c.vals, c.bad = vals, bad
	return deviceID, nil
}

func (c *secretCache) unpickle(vals map[id.Secret]string, bad map[id.Secret]error, name id.Secret, pickled []byte) {
	if plain, err := libolmpickle.Unpickle(c.store.PickleKey, pickled); err != nil {
		bad[name] = err
	} else {
		vals[name] = string(plain)
	}
}

// GetSecret returns the named secret, "" when the account has none.
func (c *secretCache) GetSecret(ctx context.Context, name id.Secret) (string, error) {
	if err := c.load(ctx); err != nil {
		return "", err
	}
	if err := c.bad[name]; err != nil {
		return "", err
	}
	return c.vals[name], nil
}

// PutSecret stores the named secret.
func (c *secretCache) PutSecret(ctx context.Context, name id.Secret, value string) error {
	if err := c.store.PutSecret(ctx, name, value); err != nil {
		return err
	}
	c.remember(name, value)
	return nil
}

// PutSecrets stores several secrets in one statement: all or none.
func (c *secretCache) PutSecrets(ctx context.Context, names []id.Secret, values []string) error {
	rows, err := c.rows(names, values)
	if err != nil {
		return err
	}
	if _, err := c.store.DB.Exec(ctx, rows.statement(1), rows.Args...); err != nil {
		return err
	}
	c.stored(names, values)
	return nil
}

// rows renders secrets as the rows PutSecrets writes, for a statement that writes them with others (then
// stored, once it committed).
func (c *secretCache) rows(names []id.Secret, values []string) (*RowInsert, error) {
	args := make([]any, 0, len(names)*sqlPutSecretsRowWidth)
	for i, name := range names {
		pickled, err := libolmpickle.Pickle(c.store.PickleKey, []byte(values[i]))
		if err != nil {
			return nil, fmt.Errorf("failed to pickle secret %s: %w", name, err)
		}
		args = append(args, c.store.AccountID, name, pickled)
	}
	return &RowInsert{Head: sqlPutSecretsHead, Tail: sqlPutSecretsTail, Width: sqlPutSecretsRowWidth, Args: args}, nil
}

// stored records secrets written by a statement of rows.
func (c *secretCache) stored(names []id.Secret, values []string) {
	for i, name := range names {
		c.remember(name, values[i])
	}
}

// DeleteSecret removes the named secret. Once the account's secrets are read, deleting one it does not have
// writes nothing (a new ghost's set-up drops the marker of a signed device it never had).
func (c *secretCache) DeleteSecret(ctx context.Context, name id.Secret) error {
	if c.vals != nil {
		if _, ok := c.vals[name]; !ok && c.bad[name] == nil {
			return nil
		}
	}
	if err := c.store.DeleteSecret(ctx, name); err != nil {
		return err
	}
	if c.vals != nil {
		delete(c.vals, name)
		delete(c.bad, name)
	}
	return nil
}

func (c *secretCache) remember(name id.Secret, value string) {
	if c.vals != nil {
		c.vals[name] = value
		delete(c.bad, name)
	}
}
