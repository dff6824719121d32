package crypto

import "context"

// ForgetCleanStop makes the next Init rotate every outbound Megolm session, as after an unclean stop. cmd/ferry
// calls it before Init when the database was restored from a backup: the stored sessions may lag behind messages
// sent after the backup was taken, and using them again would repeat Megolm message indices.
func (m *Machine) ForgetCleanStop(ctx context.Context) error {
	if err := m.open(ctx); err != nil {
		return err
	}
	return m.storeFor(m.client.UserID).PutSecret(ctx, outboundCleanSecret, "no")
}
