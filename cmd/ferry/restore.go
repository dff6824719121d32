package main

import (
	"context"
	"errors"
	"strconv"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"

	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/database"
)

// Store generation: a counter ferry raises at every start, in its database (kv) and in the bot's account data on
// the homeserver, database first. A database whose generation is behind the homeserver's was restored from a
// backup taken before ferry last ran: its Megolm sessions and its inbox are behind what ferry already sent.
const storeGenerationKey = "store_generation"

// storeGenerationType is the bot's account data holding the homeserver's copy of the generation.
var storeGenerationType = event.Type{Type: "im.ferry.store_generation", Class: event.AccountDataEventType}

// storeGeneration is the content of storeGenerationType.
type storeGeneration struct {
	Generation int64 `json:"generation"`
}

// restoredFrom is what a restored database needs before encryption and the relay start: both treat the last
// stop as unclean (outbound sessions rotated, recent sends read back).
type restoredFrom interface {
	ForgetCleanStop(ctx context.Context) error
}

// checkRestored compares the store generations, makes mach and br treat a restored database as after an unclean
// stop, and raises the generation. A homeserver that cannot be asked leaves the check out, with a warning.
func checkRestored(ctx context.Context, db *database.Database, bot *mautrix.Client, log zerolog.Logger, parts ...restoredFrom) error {
	stored, err := db.KV.Get(ctx, storeGenerationKey)
	if err != nil {
		return err
	}
	dbGen, _ := strconv.ParseInt(stored, 10, 64)
	var hs storeGeneration
	if err = bot.GetAccountData(ctx, storeGenerationType.Type, &hs); err != nil && bridge.Transient(err) {
		return err // a rate limit or a homeserver that is away: the start-up step is retried
	} else if err != nil && !errors.Is(err, mautrix.MNotFound) {
		log.Warn().Err(err).Msg("Failed to read the store generation from the homeserver; not checking whether the database was restored from a backup")
		return nil
	}
	if hs.Generation > dbGen {
		log.Warn().Int64("database_generation", dbGen).Int64("homeserver_generation", hs.Generation).
			Msg("The database is older than the one ferry last ran with (restored from a backup?): rotating every outbound Megolm session and reading back recent sends, as after an unclean stop")
		for _, part := range parts {
			if err = part.ForgetCleanStop(ctx); err != nil {
				return err
			}
		}
	}
	next := max(dbGen, hs.Generation) + 1
	if err = db.KV.Set(ctx, storeGenerationKey, strconv.FormatInt(next, 10)); err != nil {
		return err
	}
	if err = bot.SetAccountData(ctx, storeGenerationType.Type, &storeGeneration{Generation: next}); err != nil && bridge.Transient(err) {
		return err // retried as a whole: the database's generation is ahead already, so no restore is seen
	} else if err != nil {
		log.Warn().Err(err).Msg("Failed to write the store generation to the homeserver; a restore of this database will not be noticed")
	}
	return nil
}
