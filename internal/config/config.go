// Package config is ferry's configuration file: its sections (composed from the packages that own them), strict
// loading with the file and line of every error, FERRY_* environment overrides, validation, upgrades of a file
// written by an older ferry onto the current example, and the atomic write-back of generated secrets. Every
// binary reads its config through it. It reads no flags and never exits; it logs nothing.
package config

import (
	"math"

	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
)

// Log formats: logging.stdout.format takes any of them, logging.file.format all but LogOff.
const (
	LogFormatPretty = "pretty" // human-readable lines without colours
	LogFormatJSON   = "json"   // one JSON object per line
	LogOff          = "off"    // nothing on standard output
)

// Database types accepted in database.type.
const (
	DatabaseTypePostgres = "postgres"
	DatabaseTypeSQLite   = "sqlite3-fk-wal"
)

// Defaults of the sections this package owns, used for keys absent from the config file.
const (
	defaultAppserviceAddress  = "http://localhost:29340"
	defaultAppserviceHostname = "127.0.0.1"
	defaultAppservicePort     = 29340
	defaultAppserviceID       = "ferry"
	defaultBotUsername        = "ferrybot"
	defaultBotDisplayname     = "Ferry bridge bot"
	defaultDatabaseURI        = "file:ferry.db?_txlock=immediate"
	defaultMaxOpenConns       = 20
	defaultMaxIdleConns       = defaultMaxOpenConns // idle connections are kept: reopening one costs a Postgres backend start
	defaultMetricsListen      = "127.0.0.1:29341"
	defaultLogLevel           = "info"
	defaultLogStdout          = LogFormatPretty
	defaultLogFileFormat      = LogFormatJSON
	defaultLogFileMaxSize     = 100 // megabytes
	defaultLogFileMaxBackups  = 10
)

// Enumerated values of the sections this package owns, in the order error messages list them.
var (
	databaseTypes = []string{DatabaseTypePostgres, DatabaseTypeSQLite}
	logLevels     = []string{"trace", "debug", "info", "warn", "error"}
	stdoutFormats = []string{LogFormatPretty, LogFormatJSON, LogOff}
	fileFormats   = []string{LogFormatPretty, LogFormatJSON}
)

// minPickleKeyLength is the shortest pickle key ferry accepts: it encrypts every private key ferry stores, so it
// must not be guessable (ferry's generated keys have 64 characters).
const minPickleKeyLength = 32

// placeholder is a value of the example that must be changed, for a key without a default.
type placeholder struct {
	key, value, hint string
	get              func(*Config) string
}

// examplePlaceholders are values of config.example.yaml that must be changed before ferry runs. Validate
// rejects a config still holding any of them, naming the key.
var examplePlaceholders = []placeholder{
	{"homeserver.address", "https://matrix.example.com", "set the URL of your homeserver", func(c *Config) string { return c.Homeserver.Address }},
	{"homeserver.domain", "example.com", "set your homeserver's server name", func(c *Config) string { return c.Homeserver.Domain }},
}

// examplePermissionServer is the server name of the example entries of `permissions`: any entry for it, or for
// a user on it, is a leftover of the example.
const examplePermissionServer = "example.com"

// intRange bounds an integer key; keys not listed accept their Go type's whole range.
type intRange struct{ min, max int64 }

// intRanges are the integer keys whose valid values are narrower than their type.
var intRanges = map[string]intRange{
	"appservice.port":          {1, math.MaxUint16},
	"database.max_open_conns":  {1, math.MaxInt},
	"database.max_idle_conns":  {0, math.MaxInt},
	"logging.file.max_size":    {1, math.MaxInt32},
	"logging.file.max_backups": {0, math.MaxInt32},
	"logging.file.max_age":     {0, math.MaxInt32},
}

// Default returns a config with every default filled in. Keys without a default (homeserver address
// and domain, tokens) are empty.
func Default() *Config {
	return &Config{
		Appservice: Appservice{
			Address:  defaultAppserviceAddress,
			Hostname: defaultAppserviceHostname,
			Port:     defaultAppservicePort,
			ID:       defaultAppserviceID,
			Bot: Bot{
				Username:    defaultBotUsername,
				Displayname: defaultBotDisplayname,
			},
		},
		Database: Database{
			Type:         DatabaseTypeSQLite,
			URI:          defaultDatabaseURI,
			MaxOpenConns: defaultMaxOpenConns,
			MaxIdleConns: defaultMaxIdleConns,
		},
		Bridge:      bridge.DefaultConfig(),
		Encryption:  crypto.DefaultConfig(),
		Permissions: bridge.Permissions{},
		Metrics:     Metrics{Listen: defaultMetricsListen},
		Logging: Logging{
			MinLevel: defaultLogLevel,
			Stdout:   LogStdout{Format: defaultLogStdout},
			File:     LogFile{Format: defaultLogFileFormat, MaxSize: defaultLogFileMaxSize, MaxBackups: defaultLogFileMaxBackups},
		},
	}
}

// Config is ferry's whole configuration file. Each package owns its section; this file composes them.
type Config struct {
	Homeserver  Homeserver         `yaml:"homeserver"`
	Appservice  Appservice         `yaml:"appservice"`
	Database    Database           `yaml:"database"`
	Bridge      bridge.Config      `yaml:"bridge"`
	Encryption  crypto.Config      `yaml:"encryption"`
	Permissions bridge.Permissions `yaml:"permissions"`
	Logging     Logging            `yaml:"logging"`
	Metrics     Metrics            `yaml:"metrics"`

	// src records where each key came from (file line or environment variable) when the config was loaded
	// by Load, so Validate can name it. Nil for a config built in code.
	src *configSource
}

// HomeserverConfig says where the homeserver is and what it is called.
type Homeserver struct {
	// Address is the URL ferry uses to reach the homeserver's client-server API.
	Address string `yaml:"address"`
	// Domain is the homeserver's server name, the part after ':' in user IDs.
	Domain string `yaml:"domain"`
	// RegistrationSharedSecret is needed only on homeservers (like Dendrite) that demand password UIA before
	// cross-signing keys are uploaded: ferry then creates its accounts with a password through the
	// shared-secret admin registration API.
	RegistrationSharedSecret string `yaml:"registration_shared_secret"`
}

// AppserviceConfig describes ferry's own HTTP endpoint and its appservice identity.
type Appservice struct {
	// Address is the URL the homeserver uses to reach ferry (goes into the registration).
	Address string `yaml:"address"`
	// Hostname and Port are where ferry listens.
	Hostname string `yaml:"hostname"`
	Port     uint16 `yaml:"port"`
	// ID is the appservice ID in the registration.
	ID  string `yaml:"id"`
	Bot Bot    `yaml:"bot"`
	// ASToken and HSToken are written by `ferry -g`; they must match the registration file.
	ASToken string `yaml:"as_token"`
	HSToken string `yaml:"hs_token"`
}

// BotConfig is the bot user's profile.
type Bot struct {
	Username    string `yaml:"username"`
	Displayname string `yaml:"displayname"`
	Avatar      string `yaml:"avatar"`
}

// DatabaseConfig selects the database of record.
type Database struct {
	// Type is "postgres" or "sqlite3-fk-wal".
	Type string `yaml:"type"`
	URI  string `yaml:"uri"`
	// MaxOpenConns and MaxIdleConns size the connection pool.
	MaxOpenConns int `yaml:"max_open_conns"`
	MaxIdleConns int `yaml:"max_idle_conns"`
}

// Logging selects the log level and where the log goes: standard output and a rotated file.
type Logging struct {
	// MinLevel is trace, debug, info, warn or error.
	MinLevel string    `yaml:"min_level"`
	Stdout   LogStdout `yaml:"stdout"`
	File     LogFile   `yaml:"file"`
}

// Metrics is the Prometheus endpoint.
type Metrics struct {
	// Enabled serves the metrics at http://<Listen>/metrics.
	Enabled bool `yaml:"enabled"`
	// Listen is the host:port of the metrics listener, apart from the appservice's.
	Listen string `yaml:"listen"`
}

// LogStdout is the log on standard output.
type LogStdout struct {
	// Format is LogFormatPretty, LogFormatJSON or LogOff.
	Format string `yaml:"format"`
}

// LogFile is a log file, rotated by size and reopened on SIGHUP.
type LogFile struct {
	// Path is the file; "" writes no file.
	Path string `yaml:"path"`
	// Format is LogFormatJSON or LogFormatPretty.
	Format string `yaml:"format"`
	// MaxSize is the size in megabytes at which the file is rotated.
	MaxSize int `yaml:"max_size"`
	// MaxBackups is how many rotated files are kept (0: all), MaxAge for how many days (0: regardless of age).
	MaxBackups int `yaml:"max_backups"`
	MaxAge     int `yaml:"max_age"`
	// Compress gzips rotated files.
	Compress bool `yaml:"compress"`
}
