package bridge

import "context"

// ForgetCleanStop makes the next Start read back recent sends before relaying, as after an unclean stop. cmd/ferry
// calls it when the database was restored from a backup: events relayed after the backup was taken are pending
// again in it, and reading back finds their copies instead of posting them twice.
func (b *Bridge) ForgetCleanStop(ctx context.Context) error {
	return b.DB.KV.Set(ctx, runningKey, "yes")
}
