package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// firstRelease is config.example.yaml as the first release of ferry shipped it.
const firstRelease = "testdata/config-first-release.yaml"

// exampleComments returns every comment line of the current example.
func exampleComments(t *testing.T) []string {
	t.Helper()
	var comments []string
	for _, line := range strings.Split(string(readExample(t)), "\n") {
		if trimmed := strings.TrimSpace(line); strings.HasPrefix(trimmed, "#") {
			comments = append(comments, trimmed)
		}
	}
	return comments
}

// checkCurrent fails unless text holds every key of the current layout on a line of its own and every comment of
// the example.
func checkCurrent(t *testing.T, text string) {
	t.Helper()
	cfg, err := parseConfig("config.yaml", []byte(text), noEnv)
	if err != nil {
		t.Fatalf("the upgraded file does not load: %v", err)
	}
	for _, key := range configKeys(reflect.TypeFor[Config](), nil) {
		if cfg.src.lines[key.dotted()] == 0 {
			t.Errorf("%s is missing from the upgraded file", key.dotted())
		}
	}
	for _, comment := range exampleComments(t) {
		if !strings.Contains(text, comment) {
			t.Errorf("comment lost: %s", comment)
		}
	}
}

// TestUpgradeFirstRelease upgrades the example of the first release, edited as an operator would have, and checks
// that every value stays, the keys added since are there with their defaults, renamed keys moved and the
// current example's comments are kept.
func TestUpgradeFirstRelease(t *testing.T) {
	old, err := os.ReadFile(firstRelease)
	if err != nil {
		t.Fatal(err)
	}
	text := fixPlaceholders(string(old))
	for _, edit := range [][2]string{
		{"  max_idle_conns: 2", "  max_idle_conns: 2"}, // the first release's default, not today's
		{"  as_token: \"\"", "  as_token: as-0123"},
		{"  hs_token: \"\"", "  hs_token: hs-4567"},
		{"  pickle_key: generate", "  pickle_key: pk-89abcdef0123456789abcdef0123456789"},
		{"  key_wait: 5s", "  key_wait: 7s"},
		{"  format: console", "  format: json"},
		{"  file: \"\"", "  file: /var/log/ferry/ferry.log"},
	} {
		if !strings.Contains(text, edit[0]) {
			t.Fatalf("%q not in the first release's example", edit[0])
		}
		text = strings.Replace(text, edit[0], edit[1], 1)
	}
	before, err := parseConfig("config.yaml", []byte(text), noEnv)
	if err != nil {
		t.Fatalf("the first release's config does not load: %v", err)
	}
	path := writeConfig(t, text)
	if err = os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	upgrade, err := UpgradeFile(path)
	if err != nil {
		t.Fatal(err)
	}
	wantMoved := []string{"logging.format -> logging.stdout.format", "logging.file -> logging.file.path"}
	if !reflect.DeepEqual(upgrade.Moved, wantMoved) {
		t.Errorf("moved %v, want %v", upgrade.Moved, wantMoved)
	}
	for _, key := range []string{"bridge.disappear_key_idle", "logging.file.max_size"} {
		if !strings.Contains(strings.Join(upgrade.Added, " "), key) {
			t.Errorf("%s not reported as added: %v", key, upgrade.Added)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o600 {
		t.Errorf("mode %o after the upgrade, want 600", info.Mode().Perm())
	}
	checkCurrent(t, string(data))
	after, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !sameValues(before, after) {
		t.Errorf("values changed:\nbefore %+v\nafter  %+v", before, after)
	}
	for name, tc := range map[string]struct{ got, want any }{
		"max_idle_conns":        {after.Database.MaxIdleConns, 2},
		"as_token":              {after.Appservice.ASToken, "as-0123"},
		"pickle_key":            {after.Encryption.PickleKey, "pk-89abcdef0123456789abcdef0123456789"},
		"key_wait":              {after.Bridge.KeyWait.String(), "7s"},
		"logging.stdout.format": {after.Logging.Stdout.Format, "json"},
		"logging.file.path":     {after.Logging.File.Path, "/var/log/ferry/ferry.log"},
		"disappear_key_idle":    {after.Bridge.DisappearKeyIdle.String(), "1m0s"},
		"permissions":           {len(after.Permissions), 3},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %v, want %v", name, tc.got, tc.want)
		}
	}

	// Upgraded once, the file is current: a second start leaves it alone.
	again, err := UpgradeFile(path)
	if err != nil || again.Changed() {
		t.Fatalf("second upgrade: %+v, %v", again, err)
	}
	if data2, _ := os.ReadFile(path); string(data2) != string(data) {
		t.Error("a second upgrade changed the file")
	}
}

// TestUpgradeLeavesFilesAlone: a current file is not rewritten, and a file that does not load strictly is
// neither (the error names the key and line of the original file).
func TestUpgradeLeavesFilesAlone(t *testing.T) {
	current := fixPlaceholders(string(readExample(t)))
	for name, tc := range map[string]struct {
		text, wantErr string
	}{
		"current example":           {text: current},
		"unknown key":               {text: strings.Replace(validConfig, "  key_wait: 5s", "  key_wiat: 5s", 1), wantErr: "config.yaml:10: unknown key bridge.key_wiat"},
		"wrong type":                {text: strings.Replace(validConfig, "port: 29340", "port: many", 1), wantErr: "config.yaml:5: appservice.port: expected an integer"},
		"old and new name both set": {text: validConfig + "  format: json\n", wantErr: "config.yaml:19: logging.format was renamed to logging.stdout.format, which is set too"},
	} {
		t.Run(name, func(t *testing.T) {
			path := writeConfig(t, tc.text)
			upgrade, err := UpgradeFile(path)
			if tc.wantErr == "" && (err != nil || upgrade.Changed()) {
				t.Fatalf("upgrade %+v, %v; want nothing to do", upgrade, err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			if data, _ := os.ReadFile(path); string(data) != tc.text {
				t.Error("the file changed")
			}
		})
	}
}

// TestUpgradeMinimalFile: a hand-written file with a few keys gets every other key with its default, and keys
// that have no default are not filled with the example's placeholders.
func TestUpgradeMinimalFile(t *testing.T) {
	path := writeConfig(t, "# mine\nhomeserver:\n  address: https://matrix.test.org\nappservice:\n  port: 8080\n")
	before, err := parseConfig(path, []byte("homeserver:\n  address: https://matrix.test.org\nappservice:\n  port: 8080\n"), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if _, err = UpgradeFile(path); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	checkCurrent(t, string(data))
	after, err := parseConfig(path, data, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if !sameValues(before, after) {
		t.Errorf("values changed:\n%s", data)
	}
	if after.Homeserver.Domain != "" || len(after.Permissions) != 0 {
		t.Errorf("an absent key took the example's placeholder: domain %q, permissions %v", after.Homeserver.Domain, after.Permissions)
	}
}

func TestWriteValues(t *testing.T) {
	example := fixPlaceholders(string(readExample(t)))
	values := map[string]string{"encryption.pickle_key": "pk-0123456789abcdef", "appservice.as_token": "12345", "appservice.hs_token": "a: #b"}
	for name, text := range map[string]string{
		"example":          example,
		"first release":    fixPlaceholders(readFile(t, firstRelease)),
		"hand-written":     "appservice:\n  # the token\n  as_token: # set by ferry -g\n  port: 1\n",
		"flow mapping":     "# head comment\nencryption: {pickle_key: generate}\n",
		"multi-line value": "encryption:\n  pickle_key: |\n    generate\n",
		"empty file":       "",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "config.yaml")
			if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
				t.Fatal(err)
			}
			before, err := parseConfig(path, []byte(text), noEnv)
			if err != nil {
				t.Fatal(err)
			}
			if err = WriteValues(path, values); err != nil {
				t.Fatal(err)
			}
			if info, _ := os.Stat(path); info.Mode().Perm() != 0o600 {
				t.Errorf("mode %o, want 600", info.Mode().Perm())
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 1 {
				t.Errorf("temporary files left behind: %v", entries)
			}
			data, _ := os.ReadFile(path)
			checkCurrent(t, string(data))
			after, err := parseConfig(path, data, noEnv)
			if err != nil {
				t.Fatal(err)
			}
			before.Encryption.PickleKey, before.Appservice.ASToken, before.Appservice.HSToken = values["encryption.pickle_key"], values["appservice.as_token"], values["appservice.hs_token"]
			if !sameValues(before, after) {
				t.Errorf("values other than those written changed:\n%s", data)
			}
			// The raw YAML holds the strings as strings, whatever they look like.
			var raw map[string]map[string]any
			if err = yaml.Unmarshal(data, &raw); err != nil || raw["appservice"]["as_token"] != "12345" {
				t.Errorf("as_token = %#v (%v)", raw["appservice"]["as_token"], err)
			}
		})
	}

	t.Run("written config loads and validates", func(t *testing.T) {
		path := writeConfig(t, example)
		const pk = "pk-0123456789abcdef0123456789abcdef"
		if err := WriteValues(path, map[string]string{"encryption.pickle_key": pk, "appservice.as_token": "a", "appservice.hs_token": "h"}); err != nil {
			t.Fatal(err)
		}
		cfg, err := Load(path)
		if err != nil {
			t.Fatal(err)
		}
		if err = cfg.ValidateForRun(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("symlink is followed", func(t *testing.T) {
		dir := t.TempDir()
		target := filepath.Join(dir, "real.yaml")
		link := filepath.Join(dir, "config.yaml")
		if err := os.WriteFile(target, []byte("encryption:\n  pickle_key: generate\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("real.yaml", link); err != nil {
			t.Skip("symlinks unsupported:", err)
		}
		if err := WriteValues(link, map[string]string{"encryption.pickle_key": "pk"}); err != nil {
			t.Fatal(err)
		}
		if info, err := os.Lstat(link); err != nil || info.Mode()&os.ModeSymlink == 0 {
			t.Errorf("the symlink was replaced (%v)", err)
		}
		if cfg, err := parseConfig(target, []byte(readFile(t, target)), noEnv); err != nil || cfg.Encryption.PickleKey != "pk" {
			t.Errorf("target not written: %v", err)
		}
	})

	t.Run("errors", func(t *testing.T) {
		for name, tc := range map[string]struct {
			text   string
			values map[string]string
		}{
			"line break in value":  {"a: b\n", map[string]string{"appservice.as_token": "a\nb"}},
			"empty key segment":    {"appservice:\n  port: 1\n", map[string]string{"appservice..as_token": "x"}},
			"not a string key":     {"appservice:\n  port: 1\n", map[string]string{"appservice.port": "x"}},
			"section is a value":   {"appservice: 3\n", map[string]string{"appservice.as_token": "x"}},
			"value is a section":   {"appservice:\n  as_token:\n    x: 1\n", map[string]string{"appservice.as_token": "x"}},
			"file is not a config": {"- a\n- b\n", map[string]string{"appservice.as_token": "x"}},
			"unknown key":          {"appservice:\n  tokn: 1\n", map[string]string{"appservice.as_token": "x"}},
		} {
			t.Run(name, func(t *testing.T) {
				path := writeConfig(t, tc.text)
				if err := WriteValues(path, tc.values); err == nil {
					t.Error("no error")
				}
				if data, _ := os.ReadFile(path); string(data) != tc.text {
					t.Errorf("file changed to %q", data)
				}
			})
		}
		if err := WriteValues(filepath.Join(t.TempDir(), "missing.yaml"), map[string]string{"appservice.as_token": "c"}); err == nil {
			t.Error("no error for a missing file")
		}
	})
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}
