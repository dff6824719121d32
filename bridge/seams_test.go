package bridge

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// hiddenInputPackages are the directories (from this package's) whose code must not switch behaviour on values
// hidden in a context.Context: what an event's handling depends on is passed as a parameter (eventRun).
var hiddenInputPackages = []string{".", "../crypto", "../database"}

// hiddenInputAllowed lists the context.WithValue calls that stay, by file (from the repository root) and
// enclosing function, each with the reason it cannot be a parameter.
var hiddenInputAllowed = map[string]string{
	"crypto/share.go withShareBatch": "mautrix's crypto.Store methods receive nothing per call but the context",
	"crypto/todevice.go handleUnit":  "the same: the Olm writes of one to-device message are told apart only by it",
	"crypto/trustbatch.go withTrustBatch": "the same: the cross-signing keys and signatures mautrix stores while an account " +
		"publishes its identity or signs its device, or while a member's keys are fetched, are told apart only by it",
}

// TestNoHiddenInputs fails when a context.WithValue call appears in bridge, crypto or database outside tests
// (zerolog's logger in the context is not one: it changes no behaviour and is attached with Logger.WithContext).
func TestNoHiddenInputs(t *testing.T) {
	found := map[string]bool{}
	for _, dir := range hiddenInputPackages {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				if d.Name() == "testdata" {
					return filepath.SkipDir
				}
				return nil
			}
			if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			for _, site := range withValueCalls(t, path) {
				found[site] = true
				if _, ok := hiddenInputAllowed[site]; !ok {
					t.Errorf("%s calls context.WithValue: pass the value as a parameter instead", site)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for site := range hiddenInputAllowed {
		if !found[site] {
			t.Errorf("%s is allowed a context.WithValue call it no longer makes: remove it from hiddenInputAllowed", site)
		}
	}
}

// withValueCalls returns "<file from the repository root> <enclosing function>" for every use of
// context.WithValue in a Go file, whatever name it imports the context package under.
func withValueCalls(t *testing.T, path string) []string {
	t.Helper()
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	contextName := ""
	for _, imp := range file.Imports {
		if p, _ := strconv.Unquote(imp.Path.Value); p == "context" {
			contextName = "context"
			if imp.Name != nil {
				contextName = imp.Name.Name
			}
		}
	}
	if contextName == "" || contextName == "_" {
		return nil
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(root, abs)
	if err != nil {
		t.Fatal(err)
	}
	rel = filepath.ToSlash(rel)
	var sites []string
	for _, decl := range file.Decls {
		name := "(package level)"
		if fn, ok := decl.(*ast.FuncDecl); ok {
			name = fn.Name.Name
		}
		ast.Inspect(decl, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok || sel.Sel.Name != "WithValue" {
				return true
			}
			if x, ok := sel.X.(*ast.Ident); ok && x.Name == contextName {
				sites = append(sites, rel+" "+name)
			}
			return true
		})
	}
	return sites
}
