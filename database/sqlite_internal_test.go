package database

import "testing"

func TestSQLitePath(t *testing.T) {
	for uri, want := range map[string]string{
		"file:ferry.db?_txlock=immediate":    "ferry.db",
		"file:/var/lib/ferry/ferry.db":       "/var/lib/ferry/ferry.db",
		"file:///var/lib/ferry/ferry.db?x=1": "/var/lib/ferry/ferry.db",
		"ferry.db":                           "ferry.db",
		"file::memory:?cache=shared":         "",
		"file:x?mode=memory":                 "",
	} {
		if got := sqlitePath(uri); got != want {
			t.Errorf("sqlitePath(%q) = %q, want %q", uri, got, want)
		}
	}
}
