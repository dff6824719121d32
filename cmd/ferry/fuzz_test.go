package main

import (
	"testing"

	"go.ferry.im/ferry/bridge"
)

// FuzzParseLevel: a permission level name from the config is either one of the four names or refused.
func FuzzParseLevel(f *testing.F) {
	for _, s := range []string{"block", "relay", "user", "admin", "Admin", "", "root"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		level, err := bridge.ParseLevel(name)
		if err == nil && level.String() != name {
			t.Fatalf("%q parsed to %s", name, level)
		}
	})
}
