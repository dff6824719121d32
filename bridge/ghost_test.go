package bridge

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"maunium.net/go/mautrix/id"
)

func TestGhost(t *testing.T) {
	long := "@" + strings.Repeat("a", 200) + ":example.org"                          // fits: 1+7+200+3+11+1+13 = 236 bytes
	tooLong := "@" + strings.Repeat("A", 130) + ":example.org"                       // 130 upper-case letters encode to 260 bytes
	maxLen := "@" + strings.Repeat("x", 255-1-1-len("example.org")) + ":example.org" // a 255-byte real ID
	for name, tc := range map[string]struct {
		real    id.UserID
		want    id.UserID
		wantErr error
	}{
		"common":              {"@alice:example.org", "@_ferry_alice=3aexample.org:ferry.example", nil},
		"upper case":          {"@Alice:Example.ORG", "@_ferry__alice=3a_example._o_r_g:ferry.example", nil},
		"underscore":          {"@john_doe:matrix.org", "@_ferry_john__doe=3amatrix.org:ferry.example", nil},
		"dash and digits":     {"@r2-d2:ex-ample.org", "@_ferry_r2-d2=3aex-ample.org:ferry.example", nil},
		"escape characters":   {"@a=b/c+d:server.com:8448", "@_ferry_a=3db=2fc=2bd=3aserver.com=3a8448:ferry.example", nil},
		"non-ASCII":           {"@émile:example.org", "@_ferry_=c3=a9mile=3aexample.org:ferry.example", nil},
		"IPv6 server":         {"@1234:[::1]:8448", "@_ferry_1234=3a=5b=3a=3a1=5d=3a8448:ferry.example", nil},
		"control byte":        {"@a\x00b:example.org", "@_ferry_a=00b=3aexample.org:ferry.example", nil},
		"another ferry ghost": {"@_ferry_bob=3amatrix.org:other.example", "@_ferry___ferry__bob=3d3amatrix.org=3aother.example:ferry.example", nil},
		"own ghost":           {"@_ferry_bob=3amatrix.org:ferry.example", "@_ferry___ferry__bob=3d3amatrix.org=3aferry.example:ferry.example", nil},
		"long but fits":       {id.UserID(long), id.UserID("@_ferry_" + strings.Repeat("a", 200) + "=3aexample.org:ferry.example"), nil},
		"too long":            {id.UserID(tooLong), "", ErrGhostTooLong},
		"255-byte ID":         {id.UserID(maxLen), "", ErrGhostTooLong},
		"256-byte ID":         {id.UserID(maxLen[:1] + "x" + maxLen[1:]), "", ErrInvalidUserID},
		"empty":               {"", "", ErrInvalidUserID},
		"no sigil":            {"alice:example.org", "", ErrInvalidUserID},
		"room ID":             {"!room:example.org", "", ErrInvalidUserID},
		"no server":           {"@alice", "", ErrInvalidUserID},
		"empty server":        {"@alice:", "", ErrInvalidUserID},
		"empty localpart":     {"@:example.org", "", ErrInvalidUserID},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := testNamer.GhostChecked(tc.real)
			if !errors.Is(err, tc.wantErr) || got != tc.want {
				t.Fatalf("GhostChecked(%q) = %q, %v; want %q, %v", tc.real, got, err, tc.want, tc.wantErr)
			}
			ghost := testNamer.Ghost(tc.real)
			if !testNamer.IsGhost(ghost) || !testNamer.IsOwn(ghost) {
				t.Errorf("Ghost(%q) = %q is not recognised as a ghost", tc.real, ghost)
			}
			if len(ghost) > maxUserIDLength || !validLocalpart(ghostLocalpartForTest(t, ghost)) {
				t.Errorf("Ghost(%q) = %q is not a valid user ID", tc.real, ghost)
			}
			real, ok := testNamer.Real(ghost)
			if tc.wantErr != nil {
				// The hashed fallback: recognisable, deterministic, not reversible.
				if ok || !strings.HasPrefix(string(ghost), "@_ferry_"+ghostHashMarker) || ghost != testNamer.Ghost(tc.real) {
					t.Errorf("Ghost(%q) = %q, Real = %q, %v; want a stable hashed ghost", tc.real, ghost, real, ok)
				}
				return
			}
			if ghost != tc.want || !ok || real != tc.real {
				t.Errorf("Ghost(%q) = %q, Real = %q, %v", tc.real, ghost, real, ok)
			}
		})
	}
}

func ghostLocalpartForTest(t *testing.T, u id.UserID) string {
	t.Helper()
	localpart, server, err := u.Parse()
	if err != nil || server != testNamer.Domain {
		t.Fatalf("%q does not parse as a user of %s: %v", u, testNamer.Domain, err)
	}
	return localpart
}

func TestGhostInvalidPrefix(t *testing.T) {
	gn := GhostNamer{Prefix: "Ferry_", Domain: "ferry.example"}
	if _, err := gn.GhostChecked("@alice:example.org"); err == nil {
		t.Error("GhostChecked accepted a prefix with an upper-case letter")
	}
}

func TestGhostReal(t *testing.T) {
	for name, tc := range map[string]struct {
		ghost   id.UserID
		real    id.UserID // "" when Real must fail
		isGhost bool
	}{
		"common":                    {"@_ferry_alice=3aexample.org:ferry.example", "@alice:example.org", true},
		"upper case":                {"@_ferry__alice=3aexample.org:ferry.example", "@Alice:example.org", true},
		"hex for a plain letter":    {"@_ferry_=61lice=3aexample.org:ferry.example", "", true},
		"hex for an upper letter":   {"@_ferry_=41lice=3aexample.org:ferry.example", "", true},
		"upper-case hex":            {"@_ferry_alice=3Aexample.org:ferry.example", "", true},
		"truncated escape":          {"@_ferry_alice=3:ferry.example", "", true},
		"trailing escape":           {"@_ferry_alice=:ferry.example", "", true},
		"lone underscore":           {"@_ferry_alice_:ferry.example", "", true},
		"underscore before a digit": {"@_ferry__1=3aexample.org:ferry.example", "", true},
		"no server in decoded ID":   {"@_ferry_alice:ferry.example", "", true},
		"empty rest":                {"@_ferry_:ferry.example", "", true},
		"hashed":                    {testNamer.Ghost(""), "", true},
		"other domain":              {"@_ferry_alice=3aexample.org:other.example", "", false},
		"domain is only a suffix":   {"@_ferry_alice=3aexample.org:evil-ferry.example", "", false},
		"domain with extra suffix":  {"@_ferry_alice=3aexample.org:ferry.example.evil", "", false},
		"colon in localpart":        {"@_ferry_alice:evil:ferry.example", "", false},
		"no prefix":                 {"@alice=3aexample.org:ferry.example", "", false},
		"bot":                       {"@ferrybot:ferry.example", "", false},
		"real user":                 {"@alice:example.org", "", false},
		"empty":                     {"", "", false},
	} {
		t.Run(name, func(t *testing.T) {
			real, ok := testNamer.Real(tc.ghost)
			if ok != (tc.real != "") || real != tc.real {
				t.Errorf("Real(%q) = %q, %v; want %q", tc.ghost, real, ok, tc.real)
			}
			if got := testNamer.IsGhost(tc.ghost); got != tc.isGhost {
				t.Errorf("IsGhost(%q) = %v, want %v", tc.ghost, got, tc.isGhost)
			}
		})
	}
}

func TestGhostIsOwn(t *testing.T) {
	for u, want := range map[id.UserID]bool{
		"@ferrybot:ferry.example":                   true,
		"@_ferry_alice=3aexample.org:ferry.example": true,
		"@_ferry_anything:ferry.example":            true,
		"@alice:example.org":                        false,
		"@ferrybot:other.example":                   false,
		"":                                          false,
	} {
		if got := testNamer.IsOwn(u); got != want {
			t.Errorf("IsOwn(%q) = %v, want %v", u, got, want)
		}
	}
	noBot := GhostNamer{Prefix: "_ferry_", Domain: "ferry.example"}
	if noBot.IsOwn("") {
		t.Error(`IsOwn("") with no bot configured`)
	}
}

func FuzzGhostRoundTrip(f *testing.F) {
	for _, seed := range []string{
		"@alice:example.org", "@Alice:Example.ORG", "@john_doe:matrix.org", "@a=b/c+d:server.com:8448", "@émile:example.org",
		"@1234:[::1]:8448", "@_ferry_bob=3amatrix.org:ferry.example", "@a\x00b:c", "", "@", "@:", "@a:", "alice:example.org",
		"@" + strings.Repeat("Z", 120) + ":example.org", "@_ferry_=61:ferry.example", "@_ferry___:ferry.example",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u := id.UserID(s)
		ghost, err := testNamer.GhostChecked(u)
		if err == nil {
			if len(ghost) > maxUserIDLength {
				t.Fatalf("ghost %q is %d bytes", ghost, len(ghost))
			}
			localpart, server, perr := ghost.Parse()
			if perr != nil || server != testNamer.Domain || !validLocalpart(localpart) {
				t.Fatalf("ghost %q of %q is not a valid user ID of %s", ghost, s, testNamer.Domain)
			}
			if real, ok := testNamer.Real(ghost); !ok || real != u {
				t.Fatalf("Real(Ghost(%q)) = %q, %v", s, real, ok)
			}
		}
		fallback := testNamer.Ghost(u)
		if fallback == "" || !testNamer.IsGhost(fallback) || !testNamer.IsOwn(fallback) {
			t.Fatalf("Ghost(%q) = %q is not recognised as a ghost", s, fallback)
		}
		if err == nil && fallback != ghost {
			t.Fatalf("Ghost(%q) = %q, GhostChecked = %q", s, fallback, ghost)
		}
		// The other direction: whatever Real accepts is exactly what Ghost produces.
		if real, ok := testNamer.Real(u); ok {
			if back, err := testNamer.GhostChecked(real); err != nil || back != u {
				t.Fatalf("Ghost(Real(%q)) = %q, %v", s, back, err)
			}
		}
	})
}

func ExampleGhostNamer() {
	gn := GhostNamer{Prefix: "_ferry_", Domain: "ferry.example", BotUserID: "@ferrybot:ferry.example"}
	ghost := gn.Ghost("@Alice_B:example.org")
	real, ok := gn.Real(ghost)
	fmt.Println(ghost)
	fmt.Println(real, ok)
	// Output:
	// @_ferry__alice___b=3aexample.org:ferry.example
	// @Alice_B:example.org true
}

func TestCleanName(t *testing.T) {
	for name, tc := range map[string]struct {
		in   string
		max  int
		want string
	}{
		"plain":                  {"Alice", 48, "Alice"},
		"line breaks and tabs":   {"Alice\nSmith\tJr", 48, "Alice Smith Jr"},
		"bidi override dropped":  {"Ali\u202ece", 48, "Alice"},
		"spaces collapse, trim":  {"  Alice   Smith  ", 48, "Alice Smith"},
		"shortened with …":       {"abcdefghij", 5, "abcd…"},
		"counted in runes":       {"ééééé", 5, "ééééé"},
		"only controls is empty": {"\n\t", 48, ""},
	} {
		t.Run(name, func(t *testing.T) {
			if got := cleanName(tc.in, tc.max); got != tc.want {
				t.Fatalf("cleanName(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
			}
		})
	}
}
