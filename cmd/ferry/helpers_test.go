package main

import (
	"os"
	"path/filepath"
	"testing"
)

// validConfig is a small config that passes validation; tests edit it to break or change one thing.
const validConfig = `homeserver:
  address: https://matrix.test.org
  domain: test.org
appservice:
  port: 29340
  as_token: as-secret
  hs_token: hs-secret
bridge:
  command_prefix: "!ferry"
  key_wait: 5s
encryption:
  device_mode: per_ghost
permissions:
  "*": relay
  "@boss:test.org": admin
logging:
  format: console
`

// writeConfig writes text to config.yaml in a fresh directory and returns its path.
func writeConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
