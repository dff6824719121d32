package bridge

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"text/template"
	"time"
)

// Defaults of the `bridge` section, used for keys absent from the config file.
const (
	DefaultCommandPrefix       = "!ferry"
	DefaultGhostPrefix         = "_ferry_"
	DefaultDisplaynameTemplate = "{{.DisplayName}} ({{.RoomName}})"
	DefaultKeyWait             = 5 * time.Second
	DefaultKeyNoticeAfter      = 60 * time.Second
	DefaultDisappearKeyIdle    = time.Minute
	DefaultGiveUpAfter         = 10 * time.Minute
	DefaultGhostJoinWait       = 250 * time.Millisecond
	// MaxGhostJoinWait bounds bridge.ghost_join_wait: the wait holds the room's queue.
	MaxGhostJoinWait = 10 * time.Second
)

// DefaultConfig returns the `bridge` section with every default filled in.
func DefaultConfig() Config {
	return Config{
		CommandPrefix:           DefaultCommandPrefix,
		GhostPrefix:             DefaultGhostPrefix,
		DisplaynameTemplate:     DefaultDisplaynameTemplate,
		AllowUnencryptedTargets: false,
		KeyWait:                 DefaultKeyWait,
		KeyNoticeAfter:          DefaultKeyNoticeAfter,
		RedactOriginals:         true,
		DisappearKeyIdle:        DefaultDisappearKeyIdle,
		GiveUpAfter:             DefaultGiveUpAfter,
		GhostJoinWait:           DefaultGhostJoinWait,
	}
}

// Config is the `bridge` section of ferry's configuration: how links behave and how ghosts look.
type Config struct {
	// CommandPrefix starts every bot command outside a management room, e.g. "!ferry".
	CommandPrefix string `yaml:"command_prefix"`
	// GhostPrefix is the localpart prefix of every ghost user, e.g. "_ferry_".
	GhostPrefix string `yaml:"ghost_prefix"`
	// DisplaynameTemplate renders a ghost's per-room display name from GhostNameParams.
	DisplaynameTemplate string `yaml:"displayname_template"`
	// AllowUnencryptedTargets lets a link relay from an encrypted room into an unencrypted one.
	AllowUnencryptedTargets bool `yaml:"allow_unencrypted_targets"`
	// KeyWait is how long an event whose room key is missing holds its room's queue before later events pass it.
	KeyWait time.Duration `yaml:"key_wait"`
	// KeyNoticeAfter is how long ferry waits for a missing room key before telling the source room.
	KeyNoticeAfter time.Duration `yaml:"key_notice_after"`
	// RedactOriginals: when a disappearing timer expires, also redact the original if the bot may.
	RedactOriginals bool `yaml:"redact_originals"`
	// DisappearKeyIdle: how long a real user's Megolm session whose disappearing messages all expired must have
	// been unused before ferry deletes its key (a later message on it then needs the key again).
	DisappearKeyIdle time.Duration `yaml:"disappear_key_idle"`
	// PeerUsers is a regular expression matching the user IDs of other ferry instances (their registrations'
	// users namespaces): ferry never relays what those users send, so two ferries linking the same rooms cannot
	// echo each other's copies. "" (the default): no peers. Content markers are never trusted for this.
	PeerUsers string `yaml:"peer_users"`
	// GiveUpAfter is how long ferry keeps retrying a copy into a room whose homeserver keeps failing (server
	// errors, no answer) before it tells the source room that the message could not be relayed there.
	GiveUpAfter time.Duration `yaml:"give_up_after"`
	// GhostJoinWait is how long after a ghost joins a room its first message there waits, so that members'
	// clients, which fetch the ghost's keys when they see it join, know its cross-signing identity before the
	// message arrives (joinWaits). 0: no wait.
	GhostJoinWait time.Duration `yaml:"ghost_join_wait"`

	// DisplaynameTmpl is DisplaynameTemplate compiled while loading.
	DisplaynameTmpl *template.Template `yaml:"-"`
	// PeerUsersRegexp is PeerUsers compiled while loading (anchored at both ends); nil when empty.
	PeerUsersRegexp *regexp.Regexp `yaml:"-"`
}

// CompilePeerUsers compiles PeerUsers into PeerUsersRegexp, anchored so it must match a whole user ID.
func (c *Config) CompilePeerUsers() error {
	c.PeerUsersRegexp = nil
	if c.PeerUsers == "" {
		return nil
	}
	re, err := regexp.Compile("^(?:" + c.PeerUsers + ")$")
	if err != nil {
		return fmt.Errorf("not a valid regular expression: %w", err)
	}
	c.PeerUsersRegexp = re
	return nil
}

// isPeer tells whether a user belongs to another ferry instance (bridge.peer_users).
func (c *Config) isPeer(user string) bool {
	return c.PeerUsersRegexp != nil && c.PeerUsersRegexp.MatchString(user)
}

// GhostNameParams are the fields available to displayname_template.
type GhostNameParams struct {
	DisplayName string // the real user's display name in the source room (or their localpart)
	UserID      string // the real user's Matrix ID
	RoomName    string // the source room's name (or its canonical alias, or its ID)
}

// sampleGhostNameParams are rendered once while compiling displayname_template, so a template that refers to
// a missing field or renders nothing fails at startup rather than on the first relayed message.
var sampleGhostNameParams = GhostNameParams{DisplayName: "Alice", UserID: "@alice:example.com", RoomName: "Lobby"}

// CompileDisplaynameTemplate parses DisplaynameTemplate into DisplaynameTmpl and renders it once with sample
// values. The error does not name the config key; the caller adds it.
func (c *Config) CompileDisplaynameTemplate() error {
	tmpl, err := template.New("displayname_template").Option("missingkey=error").Parse(c.DisplaynameTemplate)
	if err != nil {
		return err
	}
	var sample strings.Builder
	if err = tmpl.Execute(&sample, sampleGhostNameParams); err != nil {
		return err
	}
	if strings.TrimSpace(sample.String()) == "" {
		return errors.New("renders an empty display name")
	}
	c.DisplaynameTmpl = tmpl
	return nil
}
