package main

import (
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// modulePath is ferry's Go module: imports under it are ferry's own packages.
const modulePath = "go.ferry.im/ferry"

// importRules reads the "imports" block of docs/ARCHITECTURE.md: one line per package, "pkg: allowed allowed …",
// plus the line "tests: …" naming the test kit that test files may import besides.
func importRules(t *testing.T) (rules map[string][]string, testKit []string) {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join(repoRoot, "docs", "ARCHITECTURE.md"))
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)```imports\n(.*?)```").FindSubmatch(doc)
	if block == nil {
		t.Fatal("docs/ARCHITECTURE.md has no ```imports block")
	}
	rules = make(map[string][]string)
	for _, line := range strings.Split(strings.TrimSpace(string(block[1])), "\n") {
		pkg, allowed, ok := strings.Cut(line, ":")
		if !ok {
			t.Fatalf("docs/ARCHITECTURE.md: an imports line without a colon: %q", line)
		}
		pkg = strings.TrimSpace(pkg)
		deps := strings.Fields(allowed)
		if slices.Contains(deps, "-") {
			deps = nil // "-": none of ferry's packages
		}
		if pkg == "tests" {
			testKit = deps
			continue
		}
		if _, dup := rules[pkg]; dup {
			t.Fatalf("docs/ARCHITECTURE.md: %s is listed twice", pkg)
		}
		rules[pkg] = deps
	}
	return rules, testKit
}

// ferryImports returns, for each of ferry's packages (by its path in the module), the ferry packages its non-test
// files import and those its test files import.
func ferryImports(t *testing.T) (code, tests map[string][]string) {
	t.Helper()
	root := repoRoot
	code, tests = make(map[string][]string), make(map[string][]string)
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			if path != root && (strings.HasPrefix(name, ".") || name == "node_modules" || name == "testdata" || name == "e2e" || name == "dist" || name == "bin") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		rel, _ := filepath.Rel(root, filepath.Dir(path))
		pkg := filepath.ToSlash(rel)
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		into := code
		if strings.HasSuffix(path, "_test.go") {
			into = tests
		}
		if _, ok := into[pkg]; !ok {
			into[pkg] = nil
		}
		for _, spec := range f.Imports {
			imp, _ := strconv.Unquote(spec.Path.Value)
			dep, ok := strings.CutPrefix(imp, modulePath+"/")
			if imp == modulePath {
				dep, ok = ".", true // the root package: the embedded example config
			}
			if ok && dep != pkg && !slices.Contains(into[pkg], dep) {
				into[pkg] = append(into[pkg], dep)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return code, tests
}

// TestImportRules: every package of ferry imports only what docs/ARCHITECTURE.md allows it (test files also the
// test kit it names), and every package is listed there, so a new package or a new edge is a decision written
// down, not an accident.
func TestImportRules(t *testing.T) {
	rules, testKit := importRules(t)
	code, tests := ferryImports(t)
	for pkg, deps := range code {
		allowed, listed := rules[pkg]
		if !listed {
			t.Errorf("%s is not listed in docs/ARCHITECTURE.md's imports block", pkg)
			continue
		}
		for _, dep := range deps {
			if !slices.Contains(allowed, dep) {
				t.Errorf("%s imports %s, which docs/ARCHITECTURE.md does not allow", pkg, dep)
			}
		}
	}
	for pkg, deps := range tests {
		allowed := append(slices.Clone(rules[pkg]), testKit...)
		for _, dep := range deps {
			if !slices.Contains(allowed, dep) {
				t.Errorf("tests of %s import %s, which is neither allowed to %s nor test kit", pkg, dep, pkg)
			}
		}
	}
	for pkg := range rules {
		if _, ok := code[pkg]; !ok {
			t.Errorf("docs/ARCHITECTURE.md lists %s, which has no code", pkg)
		}
	}
	for _, kit := range testKit {
		if _, ok := code[kit]; !ok {
			t.Errorf("docs/ARCHITECTURE.md names %s as test kit, which has no code", kit)
		}
		for pkg, allowed := range rules {
			if slices.Contains(allowed, kit) && !strings.HasPrefix(pkg, "cmd/") && !slices.Contains(testKit, pkg) {
				t.Errorf("%s may import the test kit %s outside its tests", pkg, kit)
			}
		}
	}
}

// TestImportRulesCatchAnEdge: the rules are not vacuous: bridge may not import internal/config, and crypto and
// database may not import bridge (a cycle the compiler would not even allow, stated here as the design).
func TestImportRulesCatchAnEdge(t *testing.T) {
	rules, _ := importRules(t)
	for pkg, forbidden := range map[string][]string{
		"bridge":   {"internal/config", "internal/fakehs", "internal/faultproxy"},
		"crypto":   {"bridge", "database", "internal/config"},
		"database": {"bridge", "crypto", "internal/config"},
	} {
		for _, dep := range forbidden {
			if slices.Contains(rules[pkg], dep) {
				t.Errorf("docs/ARCHITECTURE.md allows %s to import %s", pkg, dep)
			}
		}
	}
}

// TestArchitectureNamesRealFunctions: every function docs/ARCHITECTURE.md names as `pkg.Func` or `pkg.Type.Method`
// exists in that package, so the event's path it describes stays true when code moves.
func TestArchitectureNamesRealFunctions(t *testing.T) {
	root := repoRoot
	doc, err := os.ReadFile(filepath.Join(root, "docs", "ARCHITECTURE.md"))
	if err != nil {
		t.Fatal(err)
	}
	names := regexp.MustCompile("`((?:bridge|crypto|database|config|metrics|fakehs|faultproxy)\\.[A-Za-z_][A-Za-z0-9_]*(?:\\.[A-Za-z_][A-Za-z0-9_]*)?)`").FindAllSubmatch(doc, -1)
	if len(names) < 10 {
		t.Fatalf("docs/ARCHITECTURE.md names only %d functions", len(names))
	}
	dirs := map[string]string{"config": "internal/config", "metrics": "internal/metrics", "fakehs": "internal/fakehs", "faultproxy": "internal/faultproxy"}
	sources := make(map[string]string)
	for _, m := range names {
		parts := strings.Split(string(m[1]), ".")
		dir := parts[0]
		if d, ok := dirs[dir]; ok {
			dir = d
		}
		src, ok := sources[dir]
		if !ok {
			files, _ := filepath.Glob(filepath.Join(root, dir, "*.go"))
			var sb strings.Builder
			for _, f := range files {
				if strings.HasSuffix(f, "_test.go") {
					continue
				}
				b, err := os.ReadFile(f)
				if err != nil {
					t.Fatal(err)
				}
				sb.Write(b)
			}
			src = sb.String()
			sources[dir] = src
		}
		var re string
		if len(parts) == 3 {
			// A method: func (x *Type) Method( or func (x Type) Method(
			re = `func \(\w+ \*?` + parts[1] + `\) ` + parts[2] + `[\[(]`
		} else {
			// A function, type, constant or variable.
			re = `(?m)(^func ` + parts[1] + `[\[(]|^type ` + parts[1] + `\b|^\s*` + parts[1] + `\s*=|^(const|var) ` + parts[1] + `\b)`
		}
		if !regexp.MustCompile(re).MatchString(src) {
			t.Errorf("docs/ARCHITECTURE.md names %s, which %s does not define", m[1], dir)
		}
	}
}
