package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry"
	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
)

// exampleConfigPath is the example shipped at the repository root.
const exampleConfigPath = "../../config.example.yaml"

// validConfig is a small config that passes Validate; tests edit it to break one thing at a time. Line numbers
// in the tests below count from its first line.
const validConfig = `homeserver:
  address: https://matrix.test.org
  domain: test.org
appservice:
  port: 29340
  as_token: as-secret
  hs_token: hs-secret
bridge:
  command_prefix: "!ferry"
  key_wait: 5s
encryption:
  device_mode: per_ghost
permissions:
  "*": relay
  "@boss:test.org": admin
logging:
  stdout:
    format: pretty
`

func readExample(t *testing.T) []byte {
	t.Helper()
	data, err := os.ReadFile(exampleConfigPath)
	if err != nil {
		t.Fatalf("failed to read the example config: %v", err)
	}
	return data
}

// writeConfig writes text to config.yaml in a fresh directory and returns its path.
func writeConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// fixPlaceholders replaces the example's placeholders with real values, except those named in keep.
func fixPlaceholders(text string, keep ...string) string {
	fixes := map[string][2]string{
		"homeserver.address":             {"address: https://matrix.example.com", "address: https://matrix.test.org"},
		"homeserver.domain":              {"domain: example.com", "domain: test.org"},
		"permissions.example.com":        {`"example.com": user`, `"test.org": user`},
		"permissions.@admin:example.com": {`"@admin:example.com": admin`, `"@boss:test.org": admin`},
	}
	for key, fix := range fixes {
		if !slices.Contains(keep, key) {
			text = strings.Replace(text, fix[0], fix[1], 1)
		}
	}
	return text
}

// lineOf returns the 1-based line of the first line of text containing substr.
func lineOf(t *testing.T, text, substr string) int {
	t.Helper()
	for i, line := range strings.Split(text, "\n") {
		if strings.Contains(line, substr) {
			return i + 1
		}
	}
	t.Fatalf("%q not found", substr)
	return 0
}

func TestExampleConfigDecodesStrictly(t *testing.T) {
	data := readExample(t)
	if string(data) != string(ferry.ExampleConfig) {
		t.Fatal("ferry.ExampleConfig differs from config.example.yaml")
	}
	cfg, err := parseConfig("config.example.yaml", data, noEnv)
	if err != nil {
		t.Fatalf("example config does not decode strictly: %v", err)
	}

	t.Run("every key present", func(t *testing.T) {
		for _, key := range configKeys(reflect.TypeFor[Config](), nil) {
			if cfg.src.lines[key.dotted()] == 0 {
				t.Errorf("%s is missing from the example", key.dotted())
			}
		}
	})

	t.Run("every key commented", func(t *testing.T) {
		var root yaml.Node
		if err := yaml.Unmarshal(data, &root); err != nil {
			t.Fatal(err)
		}
		var check func(n *yaml.Node, path string)
		check = func(n *yaml.Node, path string) {
			prevComment := ""
			for i := 0; i+1 < len(n.Content); i += 2 {
				key, value := n.Content[i], n.Content[i+1]
				dotted := joinKey(path, key.Value)
				comment := key.HeadComment + key.LineComment + value.LineComment
				if comment == "" && !strings.Contains(prevComment, key.Value) {
					t.Errorf("line %d: %s has no comment", key.Line, dotted)
				}
				if comment != "" {
					prevComment = comment
				}
				if value.Kind == yaml.MappingNode && dotted != "permissions" {
					check(value, dotted)
				}
			}
		}
		check(root.Content[0], "")
	})

	t.Run("example values are the defaults", func(t *testing.T) {
		want := Default()
		if !reflect.DeepEqual(cfg.Appservice, want.Appservice) {
			t.Errorf("appservice: example %+v, defaults %+v", cfg.Appservice, want.Appservice)
		}
		if cfg.Database != want.Database {
			t.Errorf("database: example %+v, defaults %+v", cfg.Database, want.Database)
		}
		gotBridge, wantBridge := cfg.Bridge, want.Bridge
		gotBridge.DisplaynameTmpl, wantBridge.DisplaynameTmpl = nil, nil
		if gotBridge != wantBridge {
			t.Errorf("bridge: example %+v, defaults %+v", gotBridge, wantBridge)
		}
		if cfg.Encryption != want.Encryption {
			t.Errorf("encryption: example %+v, defaults %+v", cfg.Encryption, want.Encryption)
		}
		if cfg.Logging != want.Logging {
			t.Errorf("logging: example %+v, defaults %+v", cfg.Logging, want.Logging)
		}
		if cfg.Homeserver.RegistrationSharedSecret != "" {
			t.Error("homeserver.registration_shared_secret should be empty in the example")
		}
	})

	t.Run("documented defaults", func(t *testing.T) {
		d := Default()
		for name, tc := range map[string]struct{ got, want any }{
			"command_prefix":            {d.Bridge.CommandPrefix, "!ferry"},
			"ghost_prefix":              {d.Bridge.GhostPrefix, "_ferry_"},
			"displayname_template":      {d.Bridge.DisplaynameTemplate, "{{.DisplayName}} ({{.RoomName}})"},
			"allow_unencrypted_targets": {d.Bridge.AllowUnencryptedTargets, false},
			"key_wait":                  {d.Bridge.KeyWait, 5 * time.Second},
			"key_notice_after":          {d.Bridge.KeyNoticeAfter, 60 * time.Second},
			"redact_originals":          {d.Bridge.RedactOriginals, true},
			"disappear_key_idle":        {d.Bridge.DisappearKeyIdle, time.Minute},
			"peer_users":                {d.Bridge.PeerUsers, ""},
			"give_up_after":             {d.Bridge.GiveUpAfter, 10 * time.Minute},
			"ghost_join_wait":           {d.Bridge.GhostJoinWait, 250 * time.Millisecond},
			"pickle_key":                {d.Encryption.PickleKey, crypto.PickleKeyGenerate},
			"device_mode":               {d.Encryption.DeviceMode, "per_ghost"},
			"appservice":                {d.Encryption.Appservice, false},
			"share_min_trust":           {d.Encryption.ShareMinTrust, "cross_signed_tofu"},
			"receive_min_trust":         {d.Encryption.ReceiveMinTrust, "unverified"},
			"untrusted_messages":        {d.Encryption.UntrustedMessages, "mark"},
			"database.type":             {d.Database.Type, "sqlite3-fk-wal"},
			"database.uri":              {d.Database.URI, "file:ferry.db?_txlock=immediate"},
			"logging.min_level":         {d.Logging.MinLevel, "info"},
			"metrics.enabled":           {d.Metrics.Enabled, false},
			"metrics.listen":            {d.Metrics.Listen, "127.0.0.1:29341"},
			"logging.stdout.format":     {d.Logging.Stdout.Format, "pretty"},
			"logging.file.path":         {d.Logging.File.Path, ""},
			"logging.file.format":       {d.Logging.File.Format, "json"},
			"logging.file.max_size":     {d.Logging.File.MaxSize, 100},
			"logging.file.max_backups":  {d.Logging.File.MaxBackups, 10},
			"logging.file.max_age":      {d.Logging.File.MaxAge, 0},
			"logging.file.compress":     {d.Logging.File.Compress, false},
		} {
			t.Run(name, func(t *testing.T) {
				if tc.got != tc.want {
					t.Errorf("got %v, want %v", tc.got, tc.want)
				}
			})
		}
	})

	t.Run("example permissions", func(t *testing.T) {
		want := bridge.Permissions{"*": bridge.LevelRelay, "example.com": bridge.LevelUser, "@admin:example.com": bridge.LevelAdmin}
		if !reflect.DeepEqual(cfg.Permissions, want) {
			t.Errorf("got %v, want %v", cfg.Permissions, want)
		}
	})

	t.Run("fixed example validates", func(t *testing.T) {
		cfg, err := parseConfig("config.yaml", []byte(fixPlaceholders(string(data))), noEnv)
		if err != nil {
			t.Fatal(err)
		}
		if err = cfg.Validate(); err != nil {
			t.Fatalf("example with placeholders replaced does not validate: %v", err)
		}
		if cfg.Bridge.DisplaynameTmpl == nil {
			t.Error("Validate did not compile bridge.displayname_template")
		}
	})
}

func TestExamplePlaceholdersRejected(t *testing.T) {
	example := string(readExample(t))
	placeholders := map[string]string{
		"homeserver.address":             "address: https://matrix.example.com",
		"homeserver.domain":              "domain: example.com",
		"permissions.example.com":        `"example.com": user`,
		"permissions.@admin:example.com": `"@admin:example.com": admin`,
	}

	t.Run("unchanged example", func(t *testing.T) {
		_, err := Load(writeConfig(t, example))
		if err == nil {
			t.Fatal("the unchanged example loaded")
		}
		for key, line := range placeholders {
			want := "config.yaml:" + strconv.Itoa(lineOf(t, example, line)) + ": " + key + ": "
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error does not name %s with its line (%q):\n%v", key, want, err)
			}
		}
	})

	for key, line := range placeholders {
		t.Run(key, func(t *testing.T) {
			text := fixPlaceholders(example, key)
			_, err := Load(writeConfig(t, text))
			if err == nil {
				t.Fatalf("config with the example %s loaded", key)
			}
			want := "config.yaml:" + strconv.Itoa(lineOf(t, text, line)) + ": " + key + ": "
			if got := err.Error(); !strings.Contains(got, want) || strings.Contains(got, "\n") {
				t.Errorf("got %q, want one line containing %q", got, want)
			}
		})
	}
}

// loadText writes text as config.yaml and loads it like ferry does, returning the error text with the
// temporary directory removed, so cases can expect "config.yaml:N: ...".
func loadText(t *testing.T, text string) (*Config, string) {
	t.Helper()
	path := writeConfig(t, text)
	cfg, err := Load(path)
	if err != nil {
		return nil, strings.ReplaceAll(err.Error(), filepath.Dir(path)+string(filepath.Separator), "")
	}
	return cfg, ""
}

// edit returns validConfig with old replaced by new (old must occur).
func edit(t *testing.T, old, new string) string {
	t.Helper()
	if !strings.Contains(validConfig, old) {
		t.Fatalf("%q not in validConfig", old)
	}
	return strings.Replace(validConfig, old, new, 1)
}

func TestValidConfig(t *testing.T) {
	cfg, err := loadText(t, validConfig)
	if err != "" {
		t.Fatalf("validConfig does not load: %s", err)
	}
	if err := cfg.ValidateForRun(); err != nil {
		t.Fatalf("validConfig does not validate for run: %v", err)
	}
	if got := cfg.Permissions.Get("@boss:test.org"); got != bridge.LevelAdmin {
		t.Errorf("permission of @boss:test.org = %s, want admin", got)
	}
	if cfg.Homeserver.Domain != "test.org" || cfg.Appservice.ASToken != "as-secret" {
		t.Errorf("values not decoded: %+v", cfg)
	}
}

func TestDecodeErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		old, new string
		want     string // the whole error
	}{
		"unknown key in section": {
			old: `  command_prefix: "!ferry"`, new: `  comand_prefix: "!ferry"`,
			want: "config.yaml:9: unknown key bridge.comand_prefix (did you mean bridge.command_prefix?)",
		},
		"unknown section": {
			old: "logging:", new: "loging:",
			want: "config.yaml:16: unknown key loging (did you mean logging?)",
		},
		"unknown key nested": {
			old: "  port: 29340\n", new: "  port: 29340\n  bot:\n    usrname: bot\n",
			want: "config.yaml:7: unknown key appservice.bot.usrname (did you mean appservice.bot.username?)",
		},
		"key in the wrong section": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  pickle_key: abc",
			want: "config.yaml:11: unknown key bridge.pickle_key (did you mean encryption.pickle_key?)",
		},
		"unknown key without suggestion": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  frobnicate: true",
			want: "config.yaml:11: unknown key bridge.frobnicate",
		},
		"duplicate key": {
			old: "  domain: test.org", new: "  domain: test.org\n  domain: other.org",
			want: "config.yaml:4: duplicate key homeserver.domain (first at line 3)",
		},
		"port not a number": {
			old: "port: 29340", new: "port: abc",
			want: `config.yaml:5: appservice.port: expected an integer from 1 to 65535, got "abc"`,
		},
		"port too large": {
			old: "port: 29340", new: "port: 70000",
			want: `config.yaml:5: appservice.port: expected an integer from 1 to 65535, got "70000"`,
		},
		"port zero": {
			old: "port: 29340", new: "port: 0",
			want: `config.yaml:5: appservice.port: expected an integer from 1 to 65535, got "0"`,
		},
		"port quoted": {
			old: "port: 29340", new: `port: "29340"`,
			want: `config.yaml:5: appservice.port: expected an integer from 1 to 65535, got "29340"`,
		},
		"max_open_conns zero": {
			old: "logging:", new: "database:\n  max_open_conns: 0\nlogging:",
			want: `config.yaml:17: database.max_open_conns: expected an integer of at least 1, got "0"`,
		},
		"duration without unit": {
			old: "key_wait: 5s", new: "key_wait: 5",
			want: `config.yaml:10: bridge.key_wait: expected a duration such as "5s" or "1m30s", got "5"`,
		},
		"duration garbage": {
			old: "key_wait: 5s", new: "key_wait: soon",
			want: `config.yaml:10: bridge.key_wait: expected a duration such as "5s" or "1m30s", got "soon"`,
		},
		"bool as yes": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  redact_originals: yes",
			want: `config.yaml:11: bridge.redact_originals: expected true or false, got "yes"`,
		},
		"bool quoted": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  allow_unencrypted_targets: \"true\"",
			want: `config.yaml:11: bridge.allow_unencrypted_targets: expected true or false, got "true"`,
		},
		"string given a mapping": {
			old: "  domain: test.org", new: "  domain:\n    name: test.org",
			want: "config.yaml:4: homeserver.domain: expected a string, got a mapping",
		},
		"string given a list": {
			old: "  domain: test.org", new: "  domain: [test.org]",
			want: "config.yaml:3: homeserver.domain: expected a string, got a list",
		},
		"section given a value": {
			old: "logging:\n  stdout:\n    format: pretty\n", new: "logging: console\n",
			want: `config.yaml:16: logging: expected a section of keys, got "console"`,
		},
		"unknown permission level": {
			old: `"*": relay`, new: `"*": superuser`,
			want: `config.yaml:14: permissions.*: unknown permission level "superuser" (allowed: block, relay, user, admin)`,
		},
		"permission level missing": {
			old: `"*": relay`, new: `"*":`,
			want: `config.yaml:14: permissions.*: expected a level (block, relay, user, admin), got nothing`,
		},
		"bad permission key": {
			old: `"@boss:test.org": admin`, new: `"@boss": admin`,
			want: `config.yaml:15: permissions: invalid permissions key "@boss": not a valid user ID`,
		},
		"permissions not a mapping": {
			old: "permissions:\n  \"*\": relay\n  \"@boss:test.org\": admin\n", new: "permissions: [relay]\n",
			want: "config.yaml:13: permissions: expected a mapping of user IDs, server names or \"*\" to levels (block, relay, user, admin), got a list",
		},
		"yaml syntax": {
			old: "  domain: test.org", new: "  domain: test.org\n   bad: indentation",
			want: "config.yaml:4: mapping values are not allowed in this context",
		},
		"two documents": {
			old: "logging:", new: "---\nlogging:",
			want: "config.yaml:16: more than one YAML document; the config is one mapping",
		},
		"merge keys": {
			old: "logging:", new: "<<: {}\nlogging:",
			want: "config.yaml:16: unknown key <<",
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, got := loadText(t, edit(t, tc.old, tc.new))
			if got != tc.want {
				t.Errorf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

func TestValidateErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		old, new string
		want     string
	}{
		"database.type": {
			old: "logging:", new: "database:\n  type: mysql\nlogging:",
			want: `config.yaml:17: database.type: expected one of postgres, sqlite3-fk-wal, got "mysql"`,
		},
		"encryption.device_mode": {
			old: "device_mode: per_ghost", new: "device_mode: per-ghost",
			want: `config.yaml:12: encryption.device_mode: expected one of per_ghost, single_device, got "per-ghost"`,
		},
		"encryption.share_min_trust": {
			old: "  device_mode: per_ghost", new: "  device_mode: per_ghost\n  share_min_trust: trusted",
			want: `config.yaml:13: encryption.share_min_trust: expected one of unverified, cross_signed_tofu, verified, got "trusted"`,
		},
		"encryption.untrusted_messages": {
			old: "  device_mode: per_ghost", new: "  device_mode: per_ghost\n  untrusted_messages: hide",
			want: `config.yaml:13: encryption.untrusted_messages: expected one of mark, refuse, got "hide"`,
		},
		"encryption.receive_min_trust": {
			old: "  device_mode: per_ghost", new: "  device_mode: per_ghost\n  receive_min_trust: Verified",
			want: `config.yaml:13: encryption.receive_min_trust: expected one of unverified, cross_signed_tofu, verified, got "Verified"`,
		},
		"logging.min_level": {
			old: "  stdout:\n    format: pretty", new: "  min_level: verbose",
			want: `config.yaml:17: logging.min_level: expected one of trace, debug, info, warn, error, got "verbose"`,
		},
		"logging.stdout.format": {
			old: "format: pretty", new: "format: xml",
			want: `config.yaml:18: logging.stdout.format: expected one of pretty, json, off, got "xml"`,
		},
		"logging.format, renamed, names its own line": {
			old: "  stdout:\n    format: pretty", new: "  format: xml",
			want: `config.yaml:17: logging.stdout.format: expected one of pretty, json, off, got "xml"`,
		},
		"logging.file.max_size zero": {
			old: "    format: pretty", new: "    format: pretty\n  file:\n    max_size: 0",
			want: `config.yaml:20: logging.file.max_size: expected an integer of at least 1, got "0"`,
		},
		"homeserver.address not a URL": {
			old: "address: https://matrix.test.org", new: "address: matrix.test.org",
			want: `config.yaml:2: homeserver.address: expected an http:// or https:// URL, got "matrix.test.org"`,
		},
		"homeserver.domain with scheme": {
			old: "domain: test.org", new: "domain: https://test.org",
			want: `config.yaml:3: homeserver.domain: expected a server name such as matrix.org, got "https://test.org"`,
		},
		"homeserver.domain missing": {
			old: "  domain: test.org\n", new: "",
			want: `config.yaml: homeserver.domain: not configured`,
		},
		"homeserver.domain empty": {
			old: "domain: test.org", new: `domain: ""`,
			want: `config.yaml:3: homeserver.domain: not configured`,
		},
		"displayname_template does not parse": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  displayname_template: \"{{.DisplayName\"",
			want: `config.yaml:11: bridge.displayname_template: template: displayname_template:1: unclosed action`,
		},
		"displayname_template unknown field": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  displayname_template: \"{{.Nick}}\"",
			want: `config.yaml:11: bridge.displayname_template: template: displayname_template:1:2: executing "displayname_template" at <.Nick>: can't evaluate field Nick in type bridge.GhostNameParams`,
		},
		"displayname_template empty output": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  displayname_template: \" \"",
			want: `config.yaml:11: bridge.displayname_template: renders an empty display name`,
		},
		"peer_users not a regular expression": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  peer_users: \"@(_ferry2_.*:example\\\\.org\"",
			want: "config.yaml:11: bridge.peer_users: not a valid regular expression: error parsing regexp: missing closing ): `^(?:@(_ferry2_.*:example\\.org)$`",
		},
		"ghost_join_wait too long": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  ghost_join_wait: 1m",
			want: `config.yaml:11: bridge.ghost_join_wait: must be between 0 and 10s, got 1m0s`,
		},
		"ghost_join_wait negative": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  ghost_join_wait: -1s",
			want: `config.yaml:11: bridge.ghost_join_wait: must be between 0 and 10s, got -1s`,
		},
		"key_wait zero": {
			old: "key_wait: 5s", new: "key_wait: 0s",
			want: `config.yaml:10: bridge.key_wait: must be positive, got 0s`,
		},
		"command_prefix with space": {
			old: `command_prefix: "!ferry"`, new: `command_prefix: "! ferry"`,
			want: `config.yaml:9: bridge.command_prefix: must not contain spaces, got "! ferry"`,
		},
		"ghost_prefix upper case": {
			old: "  key_wait: 5s", new: "  key_wait: 5s\n  ghost_prefix: Ferry_",
			want: `config.yaml:11: bridge.ghost_prefix: expected user ID localpart characters (a-z, 0-9, ._=-/+), got "Ferry_"`,
		},
		"bot username inside ghost namespace": {
			old: "  port: 29340\n", new: "  port: 29340\n  bot:\n    username: _ferry_bot\n",
			want: `config.yaml:7: appservice.bot.username: must not start with bridge.ghost_prefix "_ferry_"`,
		},
		"bot avatar not mxc": {
			old: "  port: 29340\n", new: "  port: 29340\n  bot:\n    avatar: https://test.org/a.png\n",
			want: `config.yaml:7: appservice.bot.avatar: expected an mxc:// URI or "", got "https://test.org/a.png"`,
		},
		"equal tokens": {
			old: "hs_token: hs-secret", new: "hs_token: as-secret",
			want: `config.yaml:7: appservice.hs_token: must differ from appservice.as_token`,
		},
		"postgres with a sqlite uri": {
			old: "logging:", new: "database:\n  type: postgres\nlogging:",
			want: `config.yaml: database.uri: is a SQLite URI but database.type is postgres`,
		},
		"metrics.listen without a port": {
			old: "logging:", new: "metrics:\n  listen: localhost\nlogging:",
			want: `config.yaml:17: metrics.listen: expected host:port, such as 127.0.0.1:29341, got "localhost"`,
		},
		"metrics.listen port out of range": {
			old: "logging:", new: "metrics:\n  listen: 127.0.0.1:99999\nlogging:",
			want: `config.yaml:17: metrics.listen: expected a port from 1 to 65535, got "99999"`,
		},
		"metrics.listen on the appservice's port": {
			old: "logging:", new: "metrics:\n  enabled: true\n  listen: 127.0.0.1:29340\nlogging:",
			want: `config.yaml:18: metrics.listen: must differ from the appservice's hostname and port`,
		},
		"pickle key too short": {
			old: "  device_mode: per_ghost", new: "  device_mode: per_ghost\n  pickle_key: hunter2",
			want: `config.yaml:13: encryption.pickle_key: must be at least 32 characters (got 7), or "generate"`,
		},
		"pickle key empty": {
			old: "  device_mode: per_ghost", new: "  device_mode: per_ghost\n  pickle_key: \"\"",
			want: `config.yaml:13: encryption.pickle_key: not configured`,
		},
		"several problems, one per line": {
			old: "    format: pretty", new: "    format: xml\n  min_level: verbose",
			want: "config.yaml:18: logging.stdout.format: expected one of pretty, json, off, got \"xml\"\n" +
				"config.yaml:19: logging.min_level: expected one of trace, debug, info, warn, error, got \"verbose\"",
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, got := loadText(t, edit(t, tc.old, tc.new))
			if got != tc.want {
				t.Errorf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

func TestValidateForRun(t *testing.T) {
	text := edit(t, "  as_token: as-secret\n  hs_token: hs-secret\n", "  as_token:\n")
	cfg, err := loadText(t, text)
	if err != "" {
		t.Fatalf("config without tokens does not load (tokens are only needed to run): %s", err)
	}
	runErr := cfg.ValidateForRun()
	if runErr == nil {
		t.Fatal("ValidateForRun accepted a config without tokens")
	}
	for _, want := range []string{
		"appservice.as_token: not configured; run ferry -g",
		"appservice.hs_token: not configured; run ferry -g",
	} {
		if !strings.Contains(runErr.Error(), want) {
			t.Errorf("error %q does not contain %q", runErr, want)
		}
	}
	var cfgErr *Error
	if !errors.As(runErr, &cfgErr) || cfgErr.Key != "appservice.as_token" {
		t.Errorf("errors.As found %+v, want the Error of appservice.as_token", cfgErr)
	}
}

func TestDefaultsForAbsentAndEmptyKeys(t *testing.T) {
	text := edit(t, "  key_wait: 5s", "  key_wait:\n  redact_originals:")
	cfg, err := loadText(t, text)
	if err != "" {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct{ got, want any }{
		"empty duration":  {cfg.Bridge.KeyWait, bridge.DefaultKeyWait},
		"empty bool":      {cfg.Bridge.RedactOriginals, true},
		"absent string":   {cfg.Bridge.GhostPrefix, bridge.DefaultGhostPrefix},
		"absent section":  {cfg.Database.URI, "file:ferry.db?_txlock=immediate"},
		"absent int":      {cfg.Database.MaxOpenConns, 20},
		"absent trust":    {cfg.Encryption.ShareMinTrust, crypto.TrustCrossSignedTOFU},
		"absent level":    {cfg.Logging.MinLevel, "info"},
		"absent hostname": {cfg.Appservice.Hostname, "127.0.0.1"},
	} {
		t.Run(name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Errorf("got %v, want %v", tc.got, tc.want)
			}
		})
	}
}

func TestEnvOverrides(t *testing.T) {
	for name, tc := range map[string]struct {
		env   map[string]string
		text  string // config text; validConfig when empty
		check func(t *testing.T, cfg *Config)
		want  string // the whole error, when one is expected
	}{
		"string": {
			env: map[string]string{"FERRY_DATABASE_URI": "file:other.db"},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Database.URI != "file:other.db" {
					t.Errorf("database.uri = %q", cfg.Database.URI)
				}
			},
		},
		"string replacing the file's value": {
			env: map[string]string{"FERRY_HOMESERVER_DOMAIN": "env.org"},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Homeserver.Domain != "env.org" {
					t.Errorf("homeserver.domain = %q", cfg.Homeserver.Domain)
				}
			},
		},
		"string that looks like a number": {
			env: map[string]string{"FERRY_APPSERVICE_BOT_USERNAME": "1234"},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Appservice.Bot.Username != "1234" {
					t.Errorf("appservice.bot.username = %q", cfg.Appservice.Bot.Username)
				}
			},
		},
		"secret": {
			env: map[string]string{"FERRY_ENCRYPTION_PICKLE_KEY": "from-the-environment-0123456789abcdef"},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Encryption.PickleKey != "from-the-environment-0123456789abcdef" {
					t.Errorf("encryption.pickle_key = %q", cfg.Encryption.PickleKey)
				}
			},
		},
		"int": {
			env: map[string]string{"FERRY_APPSERVICE_PORT": "8080"},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Appservice.Port != 8080 {
					t.Errorf("appservice.port = %d", cfg.Appservice.Port)
				}
			},
		},
		"bool": {
			env: map[string]string{"FERRY_BRIDGE_REDACT_ORIGINALS": "false", "FERRY_ENCRYPTION_APPSERVICE": "true"},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Bridge.RedactOriginals || !cfg.Encryption.Appservice {
					t.Errorf("redact_originals = %v, appservice = %v", cfg.Bridge.RedactOriginals, cfg.Encryption.Appservice)
				}
			},
		},
		"duration": {
			env: map[string]string{"FERRY_BRIDGE_KEY_WAIT": "1m30s"},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Bridge.KeyWait != 90*time.Second {
					t.Errorf("bridge.key_wait = %s", cfg.Bridge.KeyWait)
				}
			},
		},
		"section absent from the file": {
			env:  map[string]string{"FERRY_LOGGING_STDOUT_FORMAT": "json", "FERRY_HOMESERVER_ADDRESS": "http://localhost:8008", "FERRY_HOMESERVER_DOMAIN": "localhost"},
			text: "# nothing but environment\n",
			check: func(t *testing.T, cfg *Config) {
				if cfg.Logging.Stdout.Format != "json" || cfg.Homeserver.Domain != "localhost" {
					t.Errorf("logging.stdout.format = %q, homeserver.domain = %q", cfg.Logging.Stdout.Format, cfg.Homeserver.Domain)
				}
			},
		},
		"empty variable is ignored": {
			env: map[string]string{"FERRY_APPSERVICE_PORT": ""},
			check: func(t *testing.T, cfg *Config) {
				if cfg.Appservice.Port != 29340 {
					t.Errorf("appservice.port = %d", cfg.Appservice.Port)
				}
			},
		},
		"permissions": {
			env: map[string]string{"FERRY_PERMISSIONS": "*=block, test.org=user ,@a=b:test.org=admin"},
			check: func(t *testing.T, cfg *Config) {
				want := bridge.Permissions{"*": bridge.LevelBlock, "test.org": bridge.LevelUser, "@a=b:test.org": bridge.LevelAdmin}
				if !reflect.DeepEqual(cfg.Permissions, want) {
					t.Errorf("permissions = %v, want %v", cfg.Permissions, want)
				}
			},
		},
		"int with a bad type": {
			env:  map[string]string{"FERRY_APPSERVICE_PORT": "abc"},
			want: `environment variable FERRY_APPSERVICE_PORT: appservice.port: expected an integer from 1 to 65535, got "abc"`,
		},
		"bool with a bad type": {
			env:  map[string]string{"FERRY_BRIDGE_REDACT_ORIGINALS": "nope"},
			want: `environment variable FERRY_BRIDGE_REDACT_ORIGINALS: bridge.redact_originals: expected true or false, got "nope"`,
		},
		"null is not a default": {
			env:  map[string]string{"FERRY_APPSERVICE_PORT": "null"},
			want: `environment variable FERRY_APPSERVICE_PORT: appservice.port: expected an integer from 1 to 65535, got "null"`,
		},
		"duration with a bad type": {
			env:  map[string]string{"FERRY_BRIDGE_KEY_NOTICE_AFTER": "60"},
			want: `environment variable FERRY_BRIDGE_KEY_NOTICE_AFTER: bridge.key_notice_after: expected a duration such as "5s" or "1m30s", got "60"`,
		},
		"invalid enum value": {
			env:  map[string]string{"FERRY_ENCRYPTION_DEVICE_MODE": "shared"},
			want: `environment variable FERRY_ENCRYPTION_DEVICE_MODE: encryption.device_mode: expected one of per_ghost, single_device, got "shared"`,
		},
		"permissions malformed": {
			env:  map[string]string{"FERRY_PERMISSIONS": "*=relay,test.org"},
			want: `environment variable FERRY_PERMISSIONS: permissions: expected comma-separated who=level pairs, got "test.org"`,
		},
		"pickle key generate from the environment": {
			env:  map[string]string{"FERRY_ENCRYPTION_PICKLE_KEY": "generate"},
			want: `environment variable FERRY_ENCRYPTION_PICKLE_KEY: encryption.pickle_key: "generate" cannot come from the environment: ferry would make a new key at every start; set a key of at least 32 random characters instead`,
		},
		"pickle key too short from the environment": {
			env:  map[string]string{"FERRY_ENCRYPTION_PICKLE_KEY": "short"},
			want: `environment variable FERRY_ENCRYPTION_PICKLE_KEY: encryption.pickle_key: must be at least 32 characters (got 5), or "generate"`,
		},
		"permissions unknown level": {
			env:  map[string]string{"FERRY_PERMISSIONS": "*=everything"},
			want: `environment variable FERRY_PERMISSIONS: permissions.*: unknown permission level "everything" (allowed: block, relay, user, admin)`,
		},
	} {
		t.Run(name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			text := tc.text
			if text == "" {
				text = validConfig
			}
			cfg, err := loadText(t, text)
			if tc.want != "" {
				if err != tc.want {
					t.Errorf("got  %s\nwant %s", err, tc.want)
				}
				return
			}
			if err != "" {
				t.Fatal(err)
			}
			tc.check(t, cfg)
		})
	}
}

func TestEnvNames(t *testing.T) {
	names := make(map[string]bool)
	for _, key := range configKeys(reflect.TypeFor[Config](), nil) {
		names[key.envName()] = true
	}
	for _, want := range []string{
		"FERRY_DATABASE_URI", "FERRY_APPSERVICE_BOT_USERNAME", "FERRY_ENCRYPTION_PICKLE_KEY",
		"FERRY_HOMESERVER_REGISTRATION_SHARED_SECRET", "FERRY_BRIDGE_KEY_WAIT", "FERRY_PERMISSIONS", "FERRY_LOGGING_FILE_PATH",
	} {
		if !names[want] {
			t.Errorf("%s overrides no key", want)
		}
	}
	got := UnknownEnvOverrides([]string{"FERRY_DATABASE_URI=x", "FERRY_DATABSE_URI=x", "FERRY_TEST_PG=x", "HOME=/root"})
	if !reflect.DeepEqual(got, []string{"FERRY_DATABSE_URI"}) {
		t.Errorf("UnknownEnvOverrides = %v", got)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	for name, tc := range map[string]struct {
		existing bool
		perm     os.FileMode
	}{
		"new file":                      {false, 0o600},
		"replaces a world-readable one": {true, 0o600},
		"other mode":                    {false, 0o640},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "registration.yaml")
			if tc.existing {
				if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if err := WriteFileAtomic(path, []byte("new"), tc.perm); err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(path)
			if err != nil || string(data) != "new" {
				t.Fatalf("read %q, %v", data, err)
			}
			info, _ := os.Stat(path)
			if info.Mode().Perm() != tc.perm {
				t.Errorf("mode %o, want %o", info.Mode().Perm(), tc.perm)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 1 {
				t.Errorf("temporary files left behind: %v", entries)
			}
		})
	}
	if err := WriteFileAtomic(filepath.Join(t.TempDir(), "no", "such", "dir"), []byte("x"), 0o600); err == nil {
		t.Error("no error writing into a missing directory")
	}
}

func TestConfigErrorFormat(t *testing.T) {
	for name, tc := range map[string]struct {
		err  Error
		want string
	}{
		"file and line": {Error{File: "config.yaml", Line: 7, Key: "a.b", Msg: "a.b: bad"}, "config.yaml:7: a.b: bad"},
		"file only":     {Error{File: "config.yaml", Key: "a.b", Msg: "a.b: bad"}, "config.yaml: a.b: bad"},
		"environment":   {Error{File: "config.yaml", Env: "FERRY_A_B", Key: "a.b", Msg: "a.b: bad"}, "environment variable FERRY_A_B: a.b: bad"},
		"in code":       {Error{Key: "a.b", Msg: "a.b: bad"}, "a.b: bad"},
	} {
		t.Run(name, func(t *testing.T) {
			if got := tc.err.Error(); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestValidateConfigBuiltInCode(t *testing.T) {
	cfg := Default()
	cfg.Homeserver = Homeserver{Address: "https://matrix.test.org", Domain: "test.org"}
	cfg.Permissions = bridge.Permissions{"@boss:test.org": bridge.LevelAdmin, "bad key": bridge.LevelUser, "test.org": bridge.Level(9)}
	err := cfg.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	want := "permissions.bad key: invalid permissions key \"bad key\": expected \"*\", a user ID (@user:server) or a server name\n" +
		"permissions.test.org: expected a level (block, relay, user, admin), got 9"
	if err.Error() != want {
		t.Errorf("got  %s\nwant %s", err, want)
	}
	if got := cfg.Permissions.Get(id.UserID("@boss:test.org")); got != bridge.LevelAdmin {
		t.Errorf("Get = %s", got)
	}
}
