package main

import (
	"context"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"go.ferry.im/ferry/internal/metrics"
)

// operatingGuide is the operator's guide these tests keep true.
var operatingGuide = filepath.Join(repoRoot, "docs", "OPERATING.md")

func readGuide(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(operatingGuide)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// guideSection returns the text of the "## title" section of the guide, up to the next "## ".
func guideSection(t *testing.T, guide, title string) string {
	t.Helper()
	start := strings.Index(guide, "\n## "+title+"\n")
	if start < 0 {
		t.Fatalf("docs/OPERATING.md has no section %q", title)
	}
	rest := guide[start+len(title)+5:]
	if end := strings.Index(rest, "\n## "); end >= 0 {
		rest = rest[:end]
	}
	return rest
}

// logLevels maps zerolog's event starters to the level they log at.
var logLevels = map[string]string{"Warn": "warn", "Error": "error", "Err": "error", "Info": "info", "Debug": "debug", "Trace": "trace"}

// stringValue evaluates a string literal or a concatenation of them.
func stringValue(e ast.Expr) (string, bool) {
	switch v := e.(type) {
	case *ast.BasicLit:
		if v.Kind == token.STRING {
			s, err := strconv.Unquote(v.Value)
			return s, err == nil
		}
	case *ast.BinaryExpr:
		if v.Op == token.ADD {
			a, okA := stringValue(v.X)
			b, okB := stringValue(v.Y)
			return a + b, okA && okB
		}
	case *ast.ParenExpr:
		return stringValue(v.X)
	}
	return "", false
}

// loggedMessages finds every message ferry's non-test Go code logs at warn or error level: calls of Msg or Msgf
// whose chain starts with Warn(), Error() or Err(...) (the innermost level call decides, as in zerolog). A Msgf
// message is its format string.
func loggedMessages(t *testing.T) map[string]string {
	t.Helper()
	out := make(map[string]string)
	err := filepath.WalkDir(repoRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != repoRoot && (strings.HasPrefix(d.Name(), ".") || d.Name() == "node_modules" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		fset := token.NewFileSet()
		file, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(file, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || (sel.Sel.Name != "Msg" && sel.Sel.Name != "Msgf") || len(call.Args) == 0 {
				return true
			}
			level := ""
			for x := sel.X; ; {
				inner, ok := x.(*ast.CallExpr)
				if !ok {
					break
				}
				s, ok := inner.Fun.(*ast.SelectorExpr)
				if !ok {
					break
				}
				if l, ok := logLevels[s.Sel.Name]; ok {
					level = l
				}
				x = s.X
			}
			if level != "warn" && level != "error" {
				return true
			}
			msg, ok := stringValue(call.Args[0])
			if !ok {
				t.Errorf("%s: a %s message that is not a constant string", fset.Position(call.Pos()), level)
				return true
			}
			out[msg] = level
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// guideRow matches a row of the guide's log message table: | level | `message` | meaning | action |.
var guideRow = regexp.MustCompile("^\\| (warn|error) \\| `([^`]+)` \\|([^|]+)\\|([^|]+)\\|$")

// TestGuideListsEveryLogMessage: every warning and error ferry's code logs is in the guide's table with its level,
// a meaning and an action, and the table lists nothing the code no longer logs.
func TestGuideListsEveryLogMessage(t *testing.T) {
	section := guideSection(t, readGuide(t), "Log messages")
	documented := make(map[string]string)
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "| warn") && !strings.HasPrefix(line, "| error") {
			continue
		}
		m := guideRow.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("malformed row (want | level | `message` | meaning | action |): %s", line)
			continue
		}
		if _, dup := documented[m[2]]; dup {
			t.Errorf("listed twice: %s", m[2])
		}
		if strings.TrimSpace(m[3]) == "" || strings.TrimSpace(m[4]) == "" {
			t.Errorf("no meaning or action for: %s", m[2])
		}
		documented[m[2]] = m[1]
	}
	logged := loggedMessages(t)
	if len(logged) < 50 {
		t.Fatalf("found only %d messages in the code: the scan is broken", len(logged))
	}
	for _, msg := range slices.Sorted(mapKeys(logged)) {
		switch level, ok := documented[msg]; {
		case !ok:
			t.Errorf("logged at %s but not in docs/OPERATING.md: | %s | `%s` | ... | ... |", logged[msg], logged[msg], msg)
		case level != logged[msg]:
			t.Errorf("logged at %s but listed as %s: %s", logged[msg], level, msg)
		}
	}
	for _, msg := range slices.Sorted(mapKeys(documented)) {
		if _, ok := logged[msg]; !ok {
			t.Errorf("listed in docs/OPERATING.md but no longer logged: %s", msg)
		}
	}
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// TestGuideListsEveryMetric: the guide's metrics table names every metric ferry exposes, and no other.
func TestGuideListsEveryMetric(t *testing.T) {
	section := guideSection(t, readGuide(t), "Metrics")
	documented := make(map[string]bool)
	for _, m := range regexp.MustCompile("(?m)^\\| `(ferry_[a-z_]+)` \\|").FindAllStringSubmatch(section, -1) {
		documented[m[1]] = true
	}
	registry := prometheus.NewRegistry()
	state := metrics.NewStateCollector(func(context.Context) (metrics.Snapshot, error) {
		return metrics.Snapshot{Inbox: map[string]metrics.Backlog{"pending": {}}}, nil
	})
	registry.MustRegister(state)
	exposed := make(map[string]bool)
	for _, g := range []prometheus.Gatherer{metrics.Registry, registry} {
		families, err := g.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range families {
			if strings.HasPrefix(f.GetName(), "ferry_") {
				exposed[f.GetName()] = true
			}
		}
	}
	// Counters with labels appear once used; make sure each family has a series.
	metrics.Relayed("m.room.message", metrics.OutcomeSent)
	metrics.HomeserverRequests.WithLabelValues("GET", "/", metrics.ErrcodeNone)
	metrics.SetBuildInfo("test", "test")
	families, _ := metrics.Registry.Gather()
	for _, f := range families {
		if strings.HasPrefix(f.GetName(), "ferry_") {
			exposed[f.GetName()] = true
		}
	}
	for name := range exposed {
		if !documented[name] {
			t.Errorf("exposed but not in the guide's metrics table: %s", name)
		}
	}
	for name := range documented {
		if !exposed[name] {
			t.Errorf("in the guide's metrics table but not exposed: %s", name)
		}
	}
}

// TestGuideSynapseSetupIsTheReadmes: the guide's homeserver.yaml for Synapse is the README's, which the end-to-end
// suite checks against the Synapse it runs (e2e/tests/02-docs).
func TestGuideSynapseSetupIsTheReadmes(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)```yaml\n(app_service_config_files:.*?)```")
	fromReadme := block.FindStringSubmatch(string(readme))
	fromGuide := block.FindStringSubmatch(readGuide(t))
	if fromReadme == nil || fromGuide == nil {
		t.Fatalf("homeserver.yaml block found in README: %v, in the guide: %v", fromReadme != nil, fromGuide != nil)
	}
	if fromReadme[1] != fromGuide[1] {
		t.Errorf("the guide's homeserver.yaml differs from the README's:\n%s\nREADME:\n%s", fromGuide[1], fromReadme[1])
	}
}

// guideCommands are the programs the guide's shell blocks may run: what a fresh clone has after make build, what
// the README has one install (Go, PostgreSQL's binaries), and the base system's.
var guideCommands = map[string]bool{
	"make": true, "bin/ferry": true, "bin/ferry-keycheck": true, "sudo": true, "install": true, "useradd": true,
	"systemctl": true, "journalctl": true, "pg_dump": true, "pg_restore": true, "psql": true, "createuser": true,
	"createdb": true, "dropdb": true, "cp": true, "mv": true, "kill": true, "sha256sum": true, "curl": true,
	"cd": true, "git": true, "chmod": true, "ls": true, "cat": true, "export": true,
	"/usr/local/bin/ferry": true, "scripts/synapse.sh": true, "scripts/dendrite.sh": true,
}

// ferryFlags are the flags and subcommands of bin/ferry.
var ferryFlags = map[string]bool{"-c": true, "-r": true, "-g": true, "-e": true, "-version": true, "doctor": true}

// TestGuideCommandsExist: every command in the guide's shell blocks is one a fresh clone has (after make build and
// what the README installs), every make target exists, every ferry flag is one ferry takes, every repository path
// exists.
func TestGuideCommandsExist(t *testing.T) {
	makefile, err := os.ReadFile(filepath.Join(repoRoot, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```sh\n(.*?)```").FindAllStringSubmatch(readGuide(t), -1)
	if len(blocks) < 5 {
		t.Fatalf("only %d shell blocks in the guide", len(blocks))
	}
	for _, block := range blocks {
		for _, line := range strings.Split(block[1], "\n") {
			line, _, _ = strings.Cut(line, " #")
			fields := strings.Fields(line)
			if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
				continue
			}
			fields[0] = strings.TrimPrefix(fields[0], "(") // a subshell
			if fields[0] == "sudo" || strings.Contains(fields[0], "=") {
				fields = fields[1:]
				if len(fields) > 1 && fields[0] == "-u" {
					fields = fields[2:] // sudo -u user
				}
			}
			if len(fields) == 0 {
				continue
			}
			if !guideCommands[fields[0]] {
				t.Errorf("command %q is not one a fresh clone has: %s", fields[0], line)
			}
			switch fields[0] {
			case "make":
				for _, target := range fields[1:] {
					if !strings.Contains(target, "=") && !regexp.MustCompile("(?m)^"+regexp.QuoteMeta(target)+":").Match(makefile) {
						t.Errorf("make target %q does not exist: %s", target, line)
					}
				}
			case "bin/ferry", "/usr/local/bin/ferry":
				for _, arg := range fields[1:] {
					if (strings.HasPrefix(arg, "-") || arg == "doctor") && !ferryFlags[arg] {
						t.Errorf("ferry takes no %s: %s", arg, line)
					}
				}
			}
			for _, arg := range fields {
				if strings.HasPrefix(arg, "docs/") || strings.HasPrefix(arg, "scripts/") {
					if _, err := os.Stat(filepath.Join(repoRoot, strings.Trim(arg, `"'`))); err != nil {
						t.Errorf("%s does not exist in the repository: %s", arg, line)
					}
				}
			}
		}
	}
}
