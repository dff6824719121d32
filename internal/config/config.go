// Package config is ferry's configuration file: its sections (composed from the packages that own them), strict
// loading with the file and line of every error, FERRY_* environment overrides, validation, upgrades of a file
// written by an older ferry onto the current example, and the atomic write-back of generated secrets. Every
// binary reads its config through it. It reads no flags and never exits; it logs nothing.
package config

import (
	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
)

// Config is ferry's whole configuration file. Each package owns its section; this file composes them.
type Config struct {
	Homeserver  Homeserver         `yaml:"homeserver"`
	Appservice  Appservice         `yaml:"appservice"`
	Database    Database           `yaml:"database"`
	Bridge      bridge.Config      `yaml:"bridge"`
	Encryption  crypto.Config      `yaml:"encryption"`
	Permissions bridge.Permissions `yaml:"permissions"`
	Logging     Logging            `yaml:"logging"`

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

// LoggingConfig selects the log format and level.
type Logging struct {
	// MinLevel is trace, debug, info, warn or error.
	MinLevel string `yaml:"min_level"`
	// Format is "console" (human-readable) or "json".
	Format string `yaml:"format"`
	// File, when set, receives the log too (JSON lines), besides standard error.
	File string `yaml:"file"`
}
