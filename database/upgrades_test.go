package database_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.mau.fi/util/dbutil"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/database/dbtest"
)

// upgradeHeader is the first line dbutil reads from an upgrade file ("-- v4: ..." or "-- v0 -> v1: ...", with an
// optional "(compatible with vN+)"); dbutil takes the versions from it, never from the file's name.
var upgradeHeader = regexp.MustCompile(`^-- (?:v(\d+) -> )?v(\d+)(?: \(compatible with v\d+\+\))?: .+$`)

// upgradeFileName is NN-what-it-holds.sql.
var upgradeFileName = regexp.MustCompile(`^(\d{2})-[a-z0-9-]+\.sql$`)

// TestUpgradeFilesNamedForTheirVersion: each file in upgrades/ is named NN-what-it-holds.sql, where NN is the
// version its header upgrades to, from the version before it; together they cover v1 to the latest once each.
// The names only guide readers (dbutil reads the header), so this test keeps them honest.
func TestUpgradeFilesNamedForTheirVersion(t *testing.T) {
	files, err := os.ReadDir("upgrades")
	if err != nil {
		t.Fatal(err)
	}
	var versions []int
	for _, f := range files {
		name := f.Name()
		m := upgradeFileName.FindStringSubmatch(name)
		if m == nil {
			t.Errorf("%s: name is not NN-what-it-holds.sql", name)
			continue
		}
		data, err := os.ReadFile(filepath.Join("upgrades", name))
		if err != nil {
			t.Fatal(err)
		}
		first, _, _ := strings.Cut(string(data), "\n")
		h := upgradeHeader.FindStringSubmatch(first)
		if h == nil {
			t.Errorf("%s: no dbutil upgrade header in %q", name, first)
			continue
		}
		num, _ := strconv.Atoi(m[1])
		to, _ := strconv.Atoi(h[2])
		if num != to {
			t.Errorf("%s: named %02d but its header upgrades to v%d", name, num, to)
		}
		if h[1] != "" {
			if from, _ := strconv.Atoi(h[1]); from != to-1 {
				t.Errorf("%s: upgrades from v%d to v%d, skipping versions", name, from, to)
			}
		}
		versions = append(versions, to)
	}
	slices.Sort(versions)
	for i, v := range versions {
		if v != i+1 {
			t.Fatalf("versions %v, want 1 to %d, each once", versions, len(versions))
		}
	}
	if len(versions) != len(database.UpgradeTable) {
		t.Fatalf("%d upgrade files, but the upgrade table has %d steps", len(versions), len(database.UpgradeTable))
	}
}

// TestUpgradedSchemaMatchesFresh: a database created by this ferry and one that started at v1 and was upgraded
// one version at a time (each step its own start, as successive releases would run) end with the same schema:
// tables, columns with their types, defaults and nullability, indexes and constraints.
func TestUpgradedSchemaMatchesFresh(t *testing.T) {
	for _, dialect := range dbtest.Dialects {
		t.Run(dialect, func(t *testing.T) {
			ctx := context.Background()
			fresh := database.New(dbtest.Open(t, dialect), dbutil.NoopLogger)
			if err := fresh.Upgrade(ctx); err != nil {
				t.Fatal(err)
			}
			steps := dbtest.Open(t, dialect)
			for n := 1; n <= len(database.UpgradeTable); n++ {
				step := steps.Child(database.VersionTable, database.UpgradeTable[:n], dbutil.NoopLogger)
				if err := step.Upgrade(ctx); err != nil {
					t.Fatalf("upgrade to v%d: %v", n, err)
				}
			}
			for name, db := range map[string]*dbutil.Database{"fresh": fresh.Database, "upgraded": steps} {
				var version int
				if err := db.QueryRow(ctx, `SELECT version FROM `+database.VersionTable).Scan(&version); err != nil || version != len(database.UpgradeTable) {
					t.Fatalf("%s database at v%d (%v), want v%d", name, version, err, len(database.UpgradeTable))
				}
			}
			want, got := schemaOf(t, fresh.Database), schemaOf(t, steps)
			if len(want) == 0 {
				t.Fatal("read no schema")
			}
			if !slices.Equal(want, got) {
				for _, line := range want {
					if !slices.Contains(got, line) {
						t.Errorf("only fresh: %s", line)
					}
				}
				for _, line := range got {
					if !slices.Contains(want, line) {
						t.Errorf("only upgraded: %s", line)
					}
				}
			}
		})
	}
}

// Schema queries: one line per column, index and constraint.
const (
	pgColumnsQuery = `SELECT table_name, column_name, ordinal_position, data_type, COALESCE(column_default, ''), is_nullable
		FROM information_schema.columns WHERE table_schema=current_schema()`
	pgIndexesQuery     = `SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname=current_schema()`
	pgConstraintsQuery = `SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
		WHERE connamespace=current_schema()::regnamespace`
	sqliteSchemaQuery = `SELECT type, name, tbl_name, COALESCE(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'`
)

// schemaOf describes a database's schema, one sorted line per item.
func schemaOf(t *testing.T, db *dbutil.Database) []string {
	t.Helper()
	var queries []string
	if db.Dialect == dbutil.Postgres {
		queries = []string{pgColumnsQuery, pgIndexesQuery, pgConstraintsQuery}
	} else {
		queries = []string{sqliteSchemaQuery}
	}
	var out []string
	for i, q := range queries {
		rows, err := db.Query(context.Background(), q)
		if err != nil {
			t.Fatal(err)
		}
		cols, _ := rows.Columns()
		for rows.Next() {
			vals := make([]any, len(cols))
			ptrs := make([]any, len(cols))
			for j := range vals {
				ptrs[j] = &vals[j]
			}
			if err = rows.Scan(ptrs...); err != nil {
				t.Fatal(err)
			}
			line := fmt.Sprint(i)
			for _, v := range vals {
				if b, ok := v.([]byte); ok {
					v = string(b)
				}
				line += fmt.Sprintf(" | %v", v)
			}
			out = append(out, line)
		}
		if err = rows.Close(); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(out)
	return out
}
