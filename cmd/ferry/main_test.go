package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestGenerateRegistration runs `ferry -g` as an admin would and checks what the homeserver will read.
func TestGenerateRegistration(t *testing.T) {
	for name, tc := range map[string]struct {
		appserviceMode bool
	}{
		"login and sync (Dendrite)": {false},
		"appservice mode (Synapse)": {true},
	} {
		t.Run(name, func(t *testing.T) {
			cfgText := strings.Replace(validConfig, "  as_token: as-secret\n  hs_token: hs-secret\n", "", 1)
			cfgText = strings.Replace(cfgText, "  device_mode: per_ghost\n", "  device_mode: per_ghost\n  appservice: "+map[bool]string{true: "true", false: "false"}[tc.appserviceMode]+"\n", 1)
			cfgPath := writeConfig(t, cfgText)
			regPath := filepath.Join(filepath.Dir(cfgPath), "registration.yaml")
			if code := run([]string{"-g", "-c", cfgPath, "-r", regPath}); code != exitOK {
				t.Fatalf("ferry -g exited %d", code)
			}
			info, err := os.Stat(regPath)
			if err != nil || info.Mode().Perm() != 0600 {
				t.Fatalf("registration file: %v, mode %v; want mode 0600", err, info.Mode().Perm())
			}
			data, _ := os.ReadFile(regPath)
			var reg map[string]any
			if err = yaml.Unmarshal(data, &reg); err != nil {
				t.Fatal(err)
			}
			asToken, _ := reg["as_token"].(string)
			hsToken, _ := reg["hs_token"].(string)
			if len(asToken) != 64 || len(hsToken) != 64 || asToken == hsToken {
				t.Fatalf("tokens %q %q: want two different random 64-character tokens", asToken, hsToken)
			}
			if reg["rate_limited"] != false || reg["url"] != "http://localhost:29340" {
				t.Fatalf("registration = %v", reg)
			}
			// The sender is not the bot (Synapse refuses /sync to an appservice's sender, and the bot's device may
			// need one), and it is no user ferry acts as.
			sender, _ := reg["sender_localpart"].(string)
			if !strings.HasPrefix(sender, "ferry-as-") || len(sender) != len("ferry-as-")+24 {
				t.Fatalf("sender_localpart %q: want ferry-as- and 24 hex digits", sender)
			}
			users := reg["namespaces"].(map[string]any)["users"].([]any)[0].(map[string]any)
			if users["exclusive"] != true {
				t.Fatalf("user namespace not exclusive: %v", users)
			}
			re := regexp.MustCompile(users["regex"].(string))
			for user, want := range map[string]bool{
				"@ferrybot:test.org":                true,
				"@" + sender + ":test.org":          false, // the sender is not in the namespace ferry acts in
				"@_ferry_alice=3atest.org:test.org": true,
				"@alice:test.org":                   false,
				"@_ferry_x:testXorg":                false, // the dot in the server name is escaped
				"@ferrybot:test.org.evil":           false,
			} {
				if re.MatchString(user) != want {
					t.Errorf("namespace %q matches %s = %v, want %v", re, user, !want, want)
				}
			}
			for _, key := range []string{"receive_ephemeral", "org.matrix.msc3202", "io.element.msc4190"} {
				if (reg[key] == true) != tc.appserviceMode {
					t.Errorf("%s = %v with appservice mode %v", key, reg[key], tc.appserviceMode)
				}
			}
			// The tokens went back into the config, which stays loadable and private.
			cfg, err := LoadConfig(cfgPath)
			if err != nil || cfg.Appservice.ASToken != asToken || cfg.Appservice.HSToken != hsToken {
				t.Fatalf("config after -g: %v, tokens match: %v", err, cfg != nil && cfg.Appservice.ASToken == asToken)
			}
			if info, _ = os.Stat(cfgPath); info.Mode().Perm() != 0600 {
				t.Fatalf("config mode %v after write-back", info.Mode().Perm())
			}
			// Running -g again keeps the tokens the homeserver already knows.
			if code := run([]string{"-g", "-c", cfgPath, "-r", regPath}); code != exitOK {
				t.Fatalf("second -g exited %d", code)
			}
			again, _ := os.ReadFile(regPath)
			if !strings.Contains(string(again), asToken) {
				t.Fatal("a second -g changed the tokens")
			}
			if !strings.Contains(string(again), "sender_localpart: "+sender) {
				t.Fatal("a second -g changed the sender")
			}
		})
	}
}

func TestExampleAndVersionFlags(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	if code := run([]string{"-e", "-c", path}); code != exitOK {
		t.Fatalf("-e exited %d", code)
	}
	if code := run([]string{"-e", "-c", path}); code != exitConfig {
		t.Fatalf("-e over an existing file exited %d, want %d (never overwrite a config)", code, exitConfig)
	}
	if code := run([]string{"-c", path}); code != exitConfig {
		t.Fatalf("running the unedited example exited %d, want %d", code, exitConfig)
	}
	if code := run([]string{"-version"}); code != exitOK {
		t.Fatalf("-version exited %d", code)
	}
}
