package bridge

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/id"
)

func TestPermissionsGet(t *testing.T) {
	perms := Permissions{
		"*":                 LevelRelay,
		"example.com":       LevelUser,
		"@boss:example.com": LevelAdmin,
		"@spam:example.com": LevelBlock,
		"port.org:8448":     LevelAdmin,
		"blocked.org":       LevelBlock,
	}
	for name, tc := range map[string]struct {
		perms Permissions
		user  id.UserID
		want  Level
	}{
		"exact user ID beats server":       {perms, "@boss:example.com", LevelAdmin},
		"exact block beats server":         {perms, "@spam:example.com", LevelBlock},
		"server beats wildcard":            {perms, "@alice:example.com", LevelUser},
		"server with port":                 {perms, "@bob:port.org:8448", LevelAdmin},
		"server block beats wildcard":      {perms, "@eve:blocked.org", LevelBlock},
		"wildcard":                         {perms, "@carol:elsewhere.net", LevelRelay},
		"subdomain is another server":      {perms, "@dave:sub.example.com", LevelRelay},
		"no match without wildcard":        {Permissions{"example.com": LevelUser}, "@x:other.org", LevelBlock},
		"empty table blocks":               {Permissions{}, "@x:example.com", LevelBlock},
		"nil table blocks":                 {nil, "@x:example.com", LevelBlock},
		"malformed user ID gets wildcard":  {perms, "not-a-user", LevelRelay},
		"user ID is not matched as server": {Permissions{"@boss:example.com": LevelAdmin}, "@other:example.com", LevelBlock},
	} {
		t.Run(name, func(t *testing.T) {
			if got := tc.perms.Get(tc.user); got != tc.want {
				t.Errorf("Get(%s) = %s, want %s", tc.user, got, tc.want)
			}
		})
	}
}

func TestParseLevel(t *testing.T) {
	for _, level := range []Level{LevelBlock, LevelRelay, LevelUser, LevelAdmin} {
		t.Run(level.String(), func(t *testing.T) {
			got, err := ParseLevel(level.String())
			if err != nil || got != level {
				t.Errorf("ParseLevel(%q) = %s, %v", level.String(), got, err)
			}
			text, err := level.MarshalText()
			if err != nil || string(text) != level.String() {
				t.Errorf("MarshalText = %q, %v", text, err)
			}
		})
	}
	for name, input := range map[string]string{"unknown": "superuser", "wrong case": "Admin", "empty": "", "number": "3"} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseLevel(input)
			if !errors.Is(err, ErrUnknownLevel) {
				t.Fatalf("ParseLevel(%q) error = %v, want ErrUnknownLevel", input, err)
			}
			if !strings.Contains(err.Error(), "block, relay, user, admin") {
				t.Errorf("error %q does not list the allowed names", err)
			}
		})
	}
	if got := Level(7).String(); got != "Level(7)" {
		t.Errorf("Level(7).String() = %q", got)
	}
}

func TestPermissionsUnmarshalYAML(t *testing.T) {
	for name, tc := range map[string]struct {
		yaml    string
		want    Permissions
		wantErr string
	}{
		"all levels": {
			yaml: "permissions:\n  \"*\": block\n  example.com: relay\n  \"@u:example.com\": user\n  \"@a:example.com\": admin\n",
			want: Permissions{"*": LevelBlock, "example.com": LevelRelay, "@u:example.com": LevelUser, "@a:example.com": LevelAdmin},
		},
		"empty": {
			yaml: "permissions:\n",
			want: Permissions{},
		},
		"unknown level": {
			yaml:    "permissions:\n  \"*\": relay\n  \"@bob:example.com\": owner\n",
			wantErr: `line 3: "@bob:example.com": unknown permission level "owner" (allowed: block, relay, user, admin)`,
		},
		"level not a string": {
			yaml:    "permissions:\n  \"*\": 3\n",
			wantErr: `line 2: "*": expected a level name (block, relay, user, admin)`,
		},
		"invalid key": {
			yaml:    "permissions:\n  \"@bob\": admin\n",
			wantErr: `line 2: invalid permissions key "@bob": not a valid user ID`,
		},
		"key with a scheme": {
			yaml:    "permissions:\n  \"https://example.com\": admin\n",
			wantErr: `line 2: invalid permissions key "https://example.com": expected "*", a user ID (@user:server) or a server name`,
		},
		"duplicate key": {
			yaml:    "permissions:\n  example.com: user\n  example.com: admin\n",
			wantErr: `line 3: duplicate permissions key "example.com"`,
		},
		"not a mapping": {
			yaml:    "permissions: [admin]\n",
			wantErr: `line 1: expected a mapping of user IDs, server names or "*" to levels (block, relay, user, admin)`,
		},
	} {
		t.Run(name, func(t *testing.T) {
			var out struct {
				Permissions Permissions `yaml:"permissions"`
			}
			err := yaml.Unmarshal([]byte(tc.yaml), &out)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if out.Permissions == nil {
				out.Permissions = Permissions{}
			}
			if !reflect.DeepEqual(out.Permissions, tc.want) {
				t.Errorf("got %v, want %v", out.Permissions, tc.want)
			}
		})
	}
}

func TestPermissionsMarshalYAML(t *testing.T) {
	in := Permissions{"*": LevelRelay, "@a:example.com": LevelAdmin}
	data, err := yaml.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out Permissions
	if err = yaml.Unmarshal(data, &out); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip: got %v from %q", out, data)
	}
}

func TestCheckPermissionKey(t *testing.T) {
	for key, valid := range map[string]bool{
		"*": true, "example.com": true, "example.com:8448": true, "[::1]:8448": true, "@a:example.com": true,
		"@a=b:example.com": true, "": false, "@a": false, "a b": false, "**": false, "https://example.com": false,
	} {
		t.Run(key, func(t *testing.T) {
			err := CheckPermissionKey(key)
			if (err == nil) != valid {
				t.Errorf("CheckPermissionKey(%q) = %v, want valid=%v", key, err, valid)
			}
			if err != nil && !errors.Is(err, ErrInvalidPermissionKey) {
				t.Errorf("error %v is not ErrInvalidPermissionKey", err)
			}
		})
	}
}

func TestCompileDisplaynameTemplate(t *testing.T) {
	for name, tc := range map[string]struct {
		template string
		wantErr  bool
	}{
		"default":       {DefaultDisplaynameTemplate, false},
		"user ID":       {"{{.UserID}}", false},
		"syntax error":  {"{{.DisplayName", true},
		"unknown field": {"{{.Nick}}", true},
		"empty output":  {"  ", true},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.DisplaynameTemplate = tc.template
			err := cfg.CompileDisplaynameTemplate()
			if (err != nil) != tc.wantErr {
				t.Fatalf("error = %v, want error %v", err, tc.wantErr)
			}
			if !tc.wantErr && cfg.DisplaynameTmpl == nil {
				t.Error("DisplaynameTmpl not set")
			}
		})
	}
}
