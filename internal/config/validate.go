package config

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
)

// Validate checks the values of a decoded config: required keys set, URLs and names well-formed, enumerated
// values known, example placeholders replaced. It compiles derived values (bridge.displayname_template into
// Bridge.DisplaynameTmpl). It does not require the tokens that `ferry -g` writes; see ValidateForRun. For a
// config from Load each error names the key's line or environment variable.
func (c *Config) Validate() error {
	return c.validate(false)
}

// ValidateForRun is Validate plus what serving needs: appservice.as_token and appservice.hs_token set.
func (c *Config) ValidateForRun() error {
	return c.validate(true)
}

// validator collects the problems found by Config.validate.
type validator struct {
	errs []*Error
}

func (v *validator) fail(key, format string, args ...any) {
	v.errs = append(v.errs, &Error{Key: key, Msg: key + ": " + fmt.Sprintf(format, args...)})
}

func (v *validator) required(key, value string) bool {
	if value == "" {
		v.fail(key, "not configured")
		return false
	}
	return true
}

func (v *validator) oneOf(key, value string, allowed []string) {
	if !slices.Contains(allowed, value) {
		v.fail(key, "expected one of %s, got %q", strings.Join(allowed, ", "), value)
	}
}

func (v *validator) httpURL(key, value string) {
	if !v.required(key, value) {
		return
	}
	u, err := url.Parse(value)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		v.fail(key, "expected an http:// or https:// URL, got %q", value)
	}
}

func (v *validator) noSpace(key, value string) {
	if strings.ContainsFunc(value, func(r rune) bool { return r == ' ' || r == '\t' || r == '\n' || r == '\r' }) {
		v.fail(key, "must not contain spaces, got %q", value)
	}
}

func (v *validator) intIn(key string, value int64) {
	if r := intRanges[key]; value < r.min || value > r.max {
		v.fail(key, "expected %s, got %d", r.describe(), value)
	}
}

func (c *Config) validate(forRun bool) error {
	var v validator
	for _, p := range examplePlaceholders {
		if p.get(c) == p.value {
			v.fail(p.key, "still holds the example value %q; %s", p.value, p.hint)
		}
	}

	hs := c.Homeserver
	v.httpURL("homeserver.address", hs.Address)
	if v.required("homeserver.domain", hs.Domain) && !id.ValidateServerName(hs.Domain) {
		v.fail("homeserver.domain", "expected a server name such as matrix.org, got %q", hs.Domain)
	}

	as := c.Appservice
	v.httpURL("appservice.address", as.Address)
	v.required("appservice.hostname", as.Hostname)
	v.intIn("appservice.port", int64(as.Port))
	if v.required("appservice.id", as.ID) {
		v.noSpace("appservice.id", as.ID)
	}
	if err := id.ValidateUserLocalpart(as.Bot.Username); err != nil {
		v.fail("appservice.bot.username", "expected a user ID localpart (a-z, 0-9, ._=-/+), got %q", as.Bot.Username)
	} else if c.Bridge.GhostPrefix != "" && strings.HasPrefix(as.Bot.Username, c.Bridge.GhostPrefix) {
		v.fail("appservice.bot.username", "must not start with bridge.ghost_prefix %q", c.Bridge.GhostPrefix)
	}
	if as.Bot.Avatar != "" {
		if uri, err := id.ParseContentURI(as.Bot.Avatar); err != nil || uri.IsEmpty() {
			v.fail("appservice.bot.avatar", "expected an mxc:// URI or \"\", got %q", as.Bot.Avatar)
		}
	}
	if forRun {
		const hint = "run ferry -g to generate the registration and the tokens"
		if as.ASToken == "" {
			v.fail("appservice.as_token", "not configured; %s", hint)
		}
		if as.HSToken == "" {
			v.fail("appservice.hs_token", "not configured; %s", hint)
		}
	}
	if as.ASToken != "" && as.ASToken == as.HSToken {
		v.fail("appservice.hs_token", "must differ from appservice.as_token")
	}

	db := c.Database
	v.oneOf("database.type", db.Type, databaseTypes)
	if v.required("database.uri", db.URI) {
		isSQLite := strings.HasPrefix(db.URI, "file:")
		isPostgres := strings.HasPrefix(db.URI, "postgres://") || strings.HasPrefix(db.URI, "postgresql://")
		if db.Type == DatabaseTypePostgres && isSQLite {
			v.fail("database.uri", "is a SQLite URI but database.type is %s", db.Type)
		} else if db.Type == DatabaseTypeSQLite && isPostgres {
			v.fail("database.uri", "is a Postgres URI but database.type is %s", db.Type)
		}
	}
	v.intIn("database.max_open_conns", int64(db.MaxOpenConns))
	v.intIn("database.max_idle_conns", int64(db.MaxIdleConns))

	br := &c.Bridge
	if v.required("bridge.command_prefix", br.CommandPrefix) {
		v.noSpace("bridge.command_prefix", br.CommandPrefix)
	}
	if v.required("bridge.ghost_prefix", br.GhostPrefix) && !id.ValidLocalpartRegex.MatchString(br.GhostPrefix) {
		v.fail("bridge.ghost_prefix", "expected user ID localpart characters (a-z, 0-9, ._=-/+), got %q", br.GhostPrefix)
	}
	if err := br.CompileDisplaynameTemplate(); err != nil {
		v.fail("bridge.displayname_template", "%s", oneLine(err.Error()))
	}
	if br.KeyWait <= 0 {
		v.fail("bridge.key_wait", "must be positive, got %s", br.KeyWait)
	}
	if br.KeyNoticeAfter <= 0 {
		v.fail("bridge.key_notice_after", "must be positive, got %s", br.KeyNoticeAfter)
	}
	if br.DisappearKeyIdle <= 0 {
		v.fail("bridge.disappear_key_idle", "must be positive, got %s", br.DisappearKeyIdle)
	}
	if br.GiveUpAfter <= 0 {
		v.fail("bridge.give_up_after", "must be positive, got %s", br.GiveUpAfter)
	}
	if br.GhostJoinWait < 0 || br.GhostJoinWait > bridge.MaxGhostJoinWait {
		v.fail("bridge.ghost_join_wait", "must be between 0 and %s, got %s", bridge.MaxGhostJoinWait, br.GhostJoinWait)
	}
	if err := br.CompilePeerUsers(); err != nil {
		v.fail("bridge.peer_users", "%s", oneLine(err.Error()))
	}

	enc := c.Encryption
	if v.required("encryption.pickle_key", enc.PickleKey) {
		switch {
		case enc.PickleKey == crypto.PickleKeyGenerate && c.src != nil && c.src.envFor("encryption.pickle_key") != "":
			// ferry writes a generated key into the config file, and the variable would win over it at the next
			// start: a new key every time, and every stored key unreadable.
			v.fail("encryption.pickle_key", "%q cannot come from the environment: ferry would make a new key at every start; set a key of at least 32 random characters instead", crypto.PickleKeyGenerate)
		case enc.PickleKey != crypto.PickleKeyGenerate && len(enc.PickleKey) < minPickleKeyLength:
			v.fail("encryption.pickle_key", "must be at least %d characters (got %d), or %q", minPickleKeyLength, len(enc.PickleKey), crypto.PickleKeyGenerate)
		}
	}
	v.oneOf("encryption.device_mode", enc.DeviceMode, crypto.DeviceModes)
	v.oneOf("encryption.share_min_trust", enc.ShareMinTrust, crypto.TrustLevels)
	v.oneOf("encryption.receive_min_trust", enc.ReceiveMinTrust, crypto.TrustLevels)
	v.oneOf("encryption.untrusted_messages", enc.UntrustedMessages, crypto.UntrustedModes)

	for _, who := range slices.Sorted(maps.Keys(c.Permissions)) {
		key := "permissions." + who
		if err := bridge.CheckPermissionKey(who); err != nil {
			v.fail(key, "%v", err)
		} else if level := c.Permissions[who]; level < bridge.LevelBlock || level > bridge.LevelAdmin {
			v.fail(key, "expected a level (%s), got %d", bridge.LevelNames, int(level))
		} else if who == examplePermissionServer || id.UserID(who).Homeserver() == examplePermissionServer {
			v.fail(key, "still the example entry; replace it with your own user ID or server name")
		}
	}

	v.oneOf("logging.min_level", c.Logging.MinLevel, logLevels)
	if host, port, err := net.SplitHostPort(c.Metrics.Listen); err != nil || host == "" {
		v.fail("metrics.listen", "expected host:port, such as 127.0.0.1:29341, got %q", c.Metrics.Listen)
	} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		v.fail("metrics.listen", "expected a port from 1 to 65535, got %q", port)
	} else if c.Metrics.Enabled && c.Metrics.Listen == net.JoinHostPort(c.Appservice.Hostname, strconv.Itoa(int(c.Appservice.Port))) {
		v.fail("metrics.listen", "must differ from the appservice's hostname and port")
	}

	v.oneOf("logging.stdout.format", c.Logging.Stdout.Format, stdoutFormats)
	v.oneOf("logging.file.format", c.Logging.File.Format, fileFormats)
	v.intIn("logging.file.max_size", int64(c.Logging.File.MaxSize))
	v.intIn("logging.file.max_backups", int64(c.Logging.File.MaxBackups))
	v.intIn("logging.file.max_age", int64(c.Logging.File.MaxAge))

	if len(v.errs) == 0 {
		return nil
	}
	for _, err := range v.errs {
		c.src.locate(err)
	}
	// Report in file order, then what is not in the file (absent keys, environment variables).
	slices.SortStableFunc(v.errs, func(a, b *Error) int {
		return lineOrder(a) - lineOrder(b)
	})
	errs := make([]error, len(v.errs))
	for i, err := range v.errs {
		errs[i] = err
	}
	return errors.Join(errs...)
}
