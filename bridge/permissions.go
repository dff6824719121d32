package bridge

import (
	"errors"
	"fmt"
	"strings"

	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/id"
)

// Level is a permission level from the config's `permissions` map.
type Level int

// Permission levels, weakest first.
const (
	LevelBlock Level = iota // not relayed; invites ignored
	LevelRelay              // relayed, no commands
	LevelUser               // may link rooms where they have the power
	LevelAdmin              // everything, any room
)

// levelNames are the names of the levels as written in the config, indexed by Level.
var levelNames = [...]string{
	LevelBlock: "block",
	LevelRelay: "relay",
	LevelUser:  "user",
	LevelAdmin: "admin",
}

// LevelNames lists the level names accepted in the config, weakest first, for error messages and docs.
const LevelNames = "block, relay, user, admin"

// PermissionsWildcard is the `permissions` key that matches every user.
const PermissionsWildcard = "*"

// ErrUnknownLevel is returned by ParseLevel for a name that is not a level. The config loader reports it
// with the key that holds the name; the message lists the allowed names.
var ErrUnknownLevel = errors.New("unknown permission level")

// ErrInvalidPermissionKey is returned by CheckPermissionKey for a key that is neither "*", a user ID nor a
// server name.
var ErrInvalidPermissionKey = errors.New("invalid permissions key")

// String returns the config name of the level ("block", "relay", "user", "admin").
func (l Level) String() string {
	if l >= 0 && int(l) < len(levelNames) {
		return levelNames[l]
	}
	return fmt.Sprintf("Level(%d)", int(l))
}

// ParseLevel parses a level name as written in the config. Names are case-sensitive, like every other
// enumerated config value.
func ParseLevel(name string) (Level, error) {
	for l, n := range levelNames {
		if n == name {
			return Level(l), nil
		}
	}
	return LevelBlock, fmt.Errorf("%w %q (allowed: %s)", ErrUnknownLevel, name, LevelNames)
}

// MarshalText writes the level's config name, so levels print by name in YAML and JSON.
func (l Level) MarshalText() ([]byte, error) {
	if l < 0 || int(l) >= len(levelNames) {
		return nil, fmt.Errorf("%w: %d", ErrUnknownLevel, int(l))
	}
	return []byte(levelNames[l]), nil
}

// UnmarshalText parses a level name (see ParseLevel).
func (l *Level) UnmarshalText(text []byte) error {
	parsed, err := ParseLevel(string(text))
	if err != nil {
		return err
	}
	*l = parsed
	return nil
}

// Permissions maps a user ID, a server name or "*" to a level. The most specific entry wins.
type Permissions map[string]Level

// CheckPermissionKey reports whether key can be a `permissions` key: "*", a full user ID ("@alice:example.com")
// or a server name ("example.com", "example.com:8448").
func CheckPermissionKey(key string) error {
	switch {
	case key == PermissionsWildcard:
		return nil
	case strings.HasPrefix(key, "@"):
		if _, _, err := id.UserID(key).ParseAndValidateRelaxed(); err != nil {
			return fmt.Errorf("%w %q: not a valid user ID", ErrInvalidPermissionKey, key)
		}
		return nil
	case id.ValidateServerName(key):
		return nil
	default:
		return fmt.Errorf("%w %q: expected \"*\", a user ID (@user:server) or a server name", ErrInvalidPermissionKey, key)
	}
}

// Get returns the level of a user: the entry for their exact user ID, else the entry for their server name,
// else the "*" entry, else LevelBlock.
func (p Permissions) Get(userID id.UserID) Level {
	if level, ok := p[string(userID)]; ok {
		return level
	}
	if _, server, err := userID.Parse(); err == nil {
		if level, ok := p[server]; ok {
			return level
		}
	}
	if level, ok := p[PermissionsWildcard]; ok {
		return level
	}
	return LevelBlock
}

// UnmarshalYAML decodes a mapping of "*", server names and user IDs to level names. Unknown level names and
// malformed keys are errors naming the line and the key.
func (p *Permissions) UnmarshalYAML(node *yaml.Node) error {
	if node.Kind == yaml.AliasNode && node.Alias != nil {
		node = node.Alias
	}
	if node.Kind == yaml.ScalarNode && node.ShortTag() == "!!null" {
		*p = Permissions{}
		return nil
	}
	if node.Kind != yaml.MappingNode {
		return fmt.Errorf("line %d: expected a mapping of user IDs, server names or \"*\" to levels (%s)", node.Line, LevelNames)
	}
	parsed := make(Permissions, len(node.Content)/2)
	for i := 0; i+1 < len(node.Content); i += 2 {
		keyNode, valueNode := node.Content[i], node.Content[i+1]
		if valueNode.Kind == yaml.AliasNode && valueNode.Alias != nil {
			valueNode = valueNode.Alias
		}
		key := keyNode.Value
		if err := CheckPermissionKey(key); err != nil {
			return fmt.Errorf("line %d: %w", keyNode.Line, err)
		}
		if _, dup := parsed[key]; dup {
			return fmt.Errorf("line %d: duplicate permissions key %q", keyNode.Line, key)
		}
		if valueNode.Kind != yaml.ScalarNode || valueNode.ShortTag() != "!!str" {
			return fmt.Errorf("line %d: %q: expected a level name (%s)", valueNode.Line, key, LevelNames)
		}
		level, err := ParseLevel(valueNode.Value)
		if err != nil {
			return fmt.Errorf("line %d: %q: %w", valueNode.Line, key, err)
		}
		parsed[key] = level
	}
	*p = parsed
	return nil
}

// MarshalYAML writes the permissions as a mapping of keys to level names.
func (p Permissions) MarshalYAML() (any, error) {
	out := make(map[string]string, len(p))
	for key, level := range p {
		out[key] = level.String()
	}
	return out, nil
}
