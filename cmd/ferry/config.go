package main

import (
	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
)

// Config is ferry's whole configuration file. Each package owns its section; this file composes them.
type Config struct {
	Homeserver  HomeserverConfig   `yaml:"homeserver"`
	Appservice  AppserviceConfig   `yaml:"appservice"`
	Database    DatabaseConfig     `yaml:"database"`
	Bridge      bridge.Config      `yaml:"bridge"`
	Encryption  crypto.Config      `yaml:"encryption"`
	Permissions bridge.Permissions `yaml:"permissions"`
	Logging     LoggingConfig      `yaml:"logging"`

	// src records where each key came from (file line or environment variable) when the config was loaded
	// by LoadConfig, so Validate can name it. Nil for a config built in code.
	src *configSource
}

// HomeserverConfig says where the homeserver is and what it is called.
type HomeserverConfig struct {
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
type AppserviceConfig struct {
	// Address is the URL the homeserver uses to reach ferry (goes into the registration).
	Address string `yaml:"address"`
	// Hostname and Port are where ferry listens.
	Hostname string `yaml:"hostname"`
	Port     uint16 `yaml:"port"`
	// ID is the appservice ID in the registration.
	ID  string    `yaml:"id"`
	Bot BotConfig `yaml:"bot"`
	// ASToken and HSToken are written by `ferry -g`; they must match the registration file.
	ASToken string `yaml:"as_token"`
	HSToken string `yaml:"hs_token"`
}

// BotConfig is the bot user's profile.
type BotConfig struct {
	Username    string `yaml:"username"`
	Displayname string `yaml:"displayname"`
	Avatar      string `yaml:"avatar"`
}

// DatabaseConfig selects the database of record.
type DatabaseConfig struct {
	// Type is "postgres" or "sqlite3-fk-wal".
	Type string `yaml:"type"`
	URI  string `yaml:"uri"`
	// MaxOpenConns and MaxIdleConns size the connection pool.
	MaxOpenConns int `yaml:"max_open_conns"`
	MaxIdleConns int `yaml:"max_idle_conns"`
}

// LoggingConfig selects the log format and level.
type LoggingConfig struct {
	// MinLevel is trace, debug, info, warn or error.
	MinLevel string `yaml:"min_level"`
	// Format is "console" (human-readable) or "json".
	Format string `yaml:"format"`
	// File, when set, receives the log too (JSON lines), besides standard error.
	File string `yaml:"file"`
}
