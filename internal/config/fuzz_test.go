package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzLoadConfig: any config file is either loaded (and then valid) or refused with errors that each name a key
// or the file, one line each; it never panics and never accepts a config Validate would refuse.
func FuzzLoadConfig(f *testing.F) {
	f.Add(validConfig)
	example, err := os.ReadFile("../../config.example.yaml")
	if err == nil {
		f.Add(string(example))
	}
	f.Add("homeserver: [1, 2]\n")
	f.Add("bridge:\n  key_wait: 5\n  peer_users: \"(\"\n")
	f.Add("permissions:\n  \"*\": admin\n  \"@a:b\": nope\n")
	f.Add("a: &x {b: *x}\n")
	f.Add("encryption:\n  pickle_key: short\n")
	path := filepath.Join(f.TempDir(), "config.yaml")
	f.Fuzz(func(t *testing.T, text string) {
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := Load(path)
		if err != nil {
			for _, line := range strings.Split(err.Error(), "\n") {
				if line == "" {
					t.Fatalf("empty error line in %q", err)
				}
			}
			return
		}
		if err = cfg.Validate(); err != nil {
			t.Fatalf("Load accepted a config Validate refuses: %v", err)
		}
	})
}
