package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// repoRoot is the repository, seen from this package's directory.
const repoRoot = "../.."

// TestRelease runs the release build (scripts/release.sh, what make release runs) for linux/amd64, the platform
// that can run here: the binaries are named for their version and platform, static, with pure-Go Olm, their
// checksums verify, the version is built in, and a static ferry refuses SQLite with a clear line.
func TestRelease(t *testing.T) {
	if testing.Short() {
		t.Skip("builds release binaries")
	}
	dist := t.TempDir()
	cmd := exec.Command("scripts/release.sh")
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "VERSION=v9.8.7-test", "COMMIT=abc1234", "DIST="+dist, "RELEASE_PLATFORMS=linux/amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("release.sh: %v\n%s", err, out)
	}
	sums, err := os.ReadFile(filepath.Join(dist, "SHA256SUMS"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"ferry-keycheck-v9.8.7-test-linux-amd64", "ferry-v9.8.7-test-linux-amd64"}
	lines := strings.Split(strings.TrimSpace(string(sums)), "\n")
	if len(lines) != len(want) {
		t.Fatalf("SHA256SUMS:\n%s\nwant %v", sums, want)
	}
	for i, line := range lines {
		sum, name, _ := strings.Cut(line, "  ")
		if name != want[i] {
			t.Errorf("SHA256SUMS line %d names %q, want %q", i+1, name, want[i])
			continue
		}
		data, err := os.ReadFile(filepath.Join(dist, name))
		if err != nil {
			t.Fatal(err)
		}
		if got := sha256.Sum256(data); hex.EncodeToString(got[:]) != sum {
			t.Errorf("%s: checksum does not match", name)
		}
	}
	bin := filepath.Join(dist, "ferry-v9.8.7-test-linux-amd64")
	out, err := exec.Command(bin, "-version").Output()
	if err != nil || string(out) != "ferry v9.8.7-test (commit abc1234)\n" {
		t.Errorf("-version: %q, %v", out, err)
	}

	// The static binary has no SQLite: it says so and stops instead of failing obscurely.
	cfgPath := writeConfig(t, strings.Replace(validConfig, "logging:", "database:\n  type: sqlite3-fk-wal\n  uri: file:"+filepath.Join(t.TempDir(), "f.db")+"\nlogging:", 1))
	run := exec.Command(bin, "-c", cfgPath)
	out, err = run.CombinedOutput()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != exitDatabase {
		t.Fatalf("static ferry on SQLite: %v, want exit status %d\n%s", err, exitDatabase, out)
	}
	if !strings.Contains(string(out), "release binaries are built without cgo and support postgres only") {
		t.Errorf("no clear line about SQLite:\n%s", out)
	}
}

// TestSystemdUnit checks docs/ferry.service with systemd-analyze: verify finds nothing to say about it, and its
// sandboxing keeps the exposure level low. ExecStart points at a stand-in, since ferry is not installed here.
func TestSystemdUnit(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed on this machine; the unit is checked where it is")
	}
	unit, err := os.ReadFile(filepath.Join(repoRoot, "docs", "ferry.service"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	stand := filepath.Join(dir, "ferry")
	if err = os.WriteFile(stand, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "ExecStart=/usr/local/bin/ferry ") {
		t.Fatal("the unit does not start /usr/local/bin/ferry")
	}
	path := filepath.Join(dir, "ferry.service")
	if err = os.WriteFile(path, []byte(strings.Replace(string(unit), "ExecStart=/usr/local/bin/ferry", "ExecStart="+stand, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// verify exits 0 on mere warnings (an unknown or misspelt setting is ignored with one): none may name the unit.
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "ferry.service") {
			t.Errorf("systemd-analyze verify: %s", line)
		}
	}
	out, err = exec.Command(analyze, "security", "--offline=true", path).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for ferry\.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	// systemd rates 0-10; up to 2 is "OK", the best band it gives a networked service.
	if level, _ := strconv.ParseFloat(string(m[1]), 64); level > 2 {
		t.Errorf("exposure level %s, want at most 2: the sandboxing was weakened", m[1])
	}
}
