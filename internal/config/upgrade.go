package config

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"reflect"
	"slices"
	"strings"

	"go.mau.fi/util/configupgrade"
	"gopkg.in/yaml.v3"

	"go.ferry.im/ferry"
)

// A move is a key renamed since the first release. Loading moves the value found under the old name to the new
// one, so a file written by an older ferry still loads (errors name the old key's line), and an upgrade writes
// it under the new name.
type move struct {
	from, to string // dotted paths
	// convert maps an old scalar value to the new key's; nil keeps it.
	convert func(string) string
}

// moves lists every renamed key, oldest first. A released entry is never edited or removed: files of every
// earlier release must keep loading.
var moves = []move{
	// ferry 0.1: logging.format was the format on standard error, "console" or "json".
	{from: "logging.format", to: "logging.stdout.format", convert: func(v string) string {
		if v == "console" {
			return LogFormatPretty
		}
		return v
	}},
	// ferry 0.1: logging.file was the path of a JSON log file; it is a section now.
	{from: "logging.file", to: "logging.file.path"},
}

// migrate applies moves to the parsed file root, in place. Each moved value keeps its node, and the new keys
// the old key's line, so later errors still point at the line the user wrote. It returns the moves applied
// ("old -> new"), and an error for a file that sets both names of a renamed key.
func migrate(root *yaml.Node, src *configSource) ([]string, []error) {
	var applied []string
	var errs []error
	for _, mv := range moves {
		from := strings.Split(mv.from, ".")
		parent := lookupNode(root, from[:len(from)-1])
		if parent == nil || parent.Kind != yaml.MappingNode {
			continue
		}
		idx := findKey(parent, from[len(from)-1])
		if idx < 0 {
			continue
		}
		keyNode, valueNode := parent.Content[idx], parent.Content[idx+1]
		if valueNode.Kind != yaml.ScalarNode {
			// Not the old key's value: the name is a section of the current layout (logging.file).
			continue
		}
		to := strings.Split(mv.to, ".")
		if existing := lookupNode(root, to); existing != nil {
			errs = append(errs, src.newError(mv.to, keyNode.Line, "%s was renamed to %s, which is set too; remove %s", mv.from, mv.to, mv.from))
			continue
		}
		parent.Content = slices.Delete(parent.Content, idx, idx+2)
		if mv.convert != nil && !isNull(valueNode) {
			valueNode.Value = mv.convert(valueNode.Value)
		}
		setNodeAt(root, to, valueNode, keyNode.Line)
		applied = append(applied, mv.from+" -> "+mv.to)
	}
	return applied, errs
}

// lookupNode returns the node at path below mapping, or nil.
func lookupNode(mapping *yaml.Node, path []string) *yaml.Node {
	node := mapping
	for _, name := range path {
		if node.Kind == yaml.AliasNode && node.Alias != nil {
			node = node.Alias
		}
		if node.Kind != yaml.MappingNode {
			return nil
		}
		idx := findKey(node, name)
		if idx < 0 {
			return nil
		}
		node = node.Content[idx+1]
	}
	return node
}

// setNodeAt sets path in mapping to value like setNode, giving the keys it creates line.
func setNodeAt(mapping *yaml.Node, path []string, value *yaml.Node, line int) {
	for i, name := range path {
		idx := findKey(mapping, name)
		if idx < 0 {
			var child *yaml.Node
			if i == len(path)-1 {
				child = value
			} else {
				child = &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map", Line: line}
			}
			mapping.Content = append(mapping.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: name, Line: line}, child)
			idx = len(mapping.Content) - 2
		}
		if i == len(path)-1 {
			mapping.Content[idx+1] = value
			return
		}
		child := mapping.Content[idx+1]
		if isNull(child) {
			child = &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map", Line: line}
			mapping.Content[idx+1] = child
		}
		if child.Kind != yaml.MappingNode {
			return // a value where a section belongs: the walker reports it
		}
		mapping = child
	}
}

// Upgrade says what UpgradeFile changed.
type Upgrade struct {
	// Moved lists renamed keys moved to their new names, as "old -> new".
	Moved []string
	// Added lists the keys the file lacked, now written with their defaults.
	Added []string
}

// Changed reports whether the file was rewritten.
func (u Upgrade) Changed() bool {
	return len(u.Moved) > 0 || len(u.Added) > 0
}

// UpgradeFile brings a config file written by an older ferry (or by hand, without every key) up to the current
// layout: it writes the current example with the file's values, renamed keys under their new names and absent
// keys with their defaults, and keeps the example's comments (the file's own comments are not kept). A file
// already holding every current key is left untouched. A file that does not load strictly is not touched
// either: the error names the key and its line, as Load's would. The file is replaced atomically with mode 0600.
func UpgradeFile(path string) (Upgrade, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Upgrade{}, fmt.Errorf("failed to read config: %w", err)
	}
	out, upgrade, err := rewrite(path, data, nil, false)
	if err != nil || !upgrade.Changed() {
		return upgrade, err
	}
	if err = WriteFileAtomic(path, out, configFileMode); err != nil {
		return Upgrade{}, fmt.Errorf("failed to write the upgraded config: %w", err)
	}
	return upgrade, nil
}

// Preview returns what UpgradeFile would write for the file content data (named name in errors), and what it
// would change, without writing anything.
func Preview(name string, data []byte) ([]byte, Upgrade, error) {
	return rewrite(name, data, nil, false)
}

// WriteValues sets string keys (e.g. "encryption.pickle_key", "appservice.as_token") in the config file at path
// and rewrites it atomically with mode 0600, upgraded like UpgradeFile does: every other value is kept, the
// example's comments are kept. It refuses (leaving the file as it was) a file that does not load strictly, a
// key that is not a string key of the config, and a value with a line break.
func WriteValues(path string, values map[string]string) error {
	stringKeys := make(map[string]bool)
	for _, key := range configKeys(reflect.TypeFor[Config](), nil) {
		if key.typ.Kind() == reflect.String {
			stringKeys[key.dotted()] = true
		}
	}
	for _, key := range slices.Sorted(maps.Keys(values)) {
		if !stringKeys[key] {
			return fmt.Errorf("failed to update config %s: %q is not a string key of the config", path, key)
		}
		if strings.ContainsAny(values[key], "\r\n") {
			return fmt.Errorf("failed to update config %s: the value for %s contains a line break", path, key)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("failed to read config: %w", err)
	}
	out, _, err := rewrite(path, data, values, true)
	if err != nil {
		return fmt.Errorf("failed to update config %s: %w", path, err)
	}
	if err = WriteFileAtomic(path, out, configFileMode); err != nil {
		return fmt.Errorf("failed to write config: %w", err)
	}
	return nil
}

// noEnv is a lookupEnv that finds nothing: what is written back never comes from the environment.
func noEnv(string) (string, bool) { return "", false }

// rewrite returns data laid out as the current example, with data's values (checked strictly first) and then
// values set. Unless force is set, a file that lacks no key and holds no renamed one is returned as it is.
func rewrite(name string, data []byte, values map[string]string, force bool) ([]byte, Upgrade, error) {
	before, err := parseConfig(name, data, noEnv)
	if err != nil {
		return nil, Upgrade{}, err
	}
	root, err := parseDocument(name, data)
	if err != nil {
		return nil, Upgrade{}, err
	}
	var upgrade Upgrade
	upgrade.Moved, _ = migrate(root, nil)
	keys := configKeys(reflect.TypeFor[Config](), nil)
	for _, key := range keys {
		if lookupNode(root, key.path) == nil {
			upgrade.Added = append(upgrade.Added, key.dotted())
		}
	}
	if !force && !upgrade.Changed() {
		return data, upgrade, nil
	}

	var base yaml.Node
	if err = yaml.Unmarshal(ferry.ExampleConfig, &base); err != nil {
		return nil, Upgrade{}, fmt.Errorf("the example config does not parse: %w", err)
	}
	helper := configupgrade.NewHelper(&base, &yaml.Node{Kind: yaml.DocumentNode, Content: []*yaml.Node{root}})
	const anyType = configupgrade.Bool | configupgrade.Str | configupgrade.Int | configupgrade.Float |
		configupgrade.Timestamp | configupgrade.List | configupgrade.Map | configupgrade.Binary
	for _, key := range keys {
		if node := helper.GetNode(key.path...); node != nil && !isNull(node.Node) {
			// Every value was type-checked by parseConfig above, so Copy takes it as it is.
			helper.Copy(anyType, key.path...)
			continue
		}
		// Absent or empty: the example's value stays, as the default, unless it is a placeholder for a key
		// without a default, which would turn "not configured" into a wrong value.
		switch {
		case key.typ == permissionsType:
			helper.SetMap(configupgrade.YAMLMap{}, key.path...)
		case slices.ContainsFunc(examplePlaceholders, func(p placeholder) bool { return p.key == key.dotted() }):
			helper.Set(configupgrade.Str, "", key.path...)
		}
	}
	for _, key := range slices.Sorted(maps.Keys(values)) {
		path := strings.Split(key, ".")
		helper.Set(configupgrade.Str, values[key], path...)
		helper.GetBaseNode(path...).Style = 0
	}
	// A blank line before each section's comment, as in the example (the YAML encoder drops blank lines).
	if doc := base.Content[0]; doc.Kind == yaml.MappingNode {
		for i := 2; i+1 < len(doc.Content); i += 2 {
			helper.AddSpaceBeforeComment(doc.Content[i].Value)
		}
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err = enc.Encode(&base); err != nil {
		return nil, Upgrade{}, fmt.Errorf("failed to encode the upgraded config: %w", err)
	}
	if err = enc.Close(); err != nil {
		return nil, Upgrade{}, fmt.Errorf("failed to encode the upgraded config: %w", err)
	}
	out := buf.Bytes()

	// What was written must decode to what was read, plus the values set: nothing lost on the way.
	after, err := parseConfig(name, out, noEnv)
	if err != nil {
		return nil, Upgrade{}, fmt.Errorf("the upgraded config does not load (%w); the file was left as it was", err)
	}
	if err = setValues(before, values); err != nil {
		return nil, Upgrade{}, err
	}
	if !sameValues(before, after) {
		return nil, Upgrade{}, errors.New("the upgraded config would not hold the same values; the file was left as it was")
	}
	return out, upgrade, nil
}

// setValues sets the dotted string keys of values in cfg.
func setValues(cfg *Config, values map[string]string) error {
	for key, value := range values {
		field := reflect.ValueOf(cfg).Elem()
		for _, name := range strings.Split(key, ".") {
			idx := fieldIndex(field.Type(), name)
			if idx < 0 {
				return fmt.Errorf("%q is not a key of the config", key)
			}
			field = field.Field(idx)
		}
		field.SetString(value)
	}
	return nil
}

// fieldIndex returns the index of the field of struct type t with yaml key name.
func fieldIndex(t reflect.Type, name string) int {
	for i := range t.NumField() {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if f.IsExported() && (tag == name || tag == "" && strings.ToLower(f.Name) == name) {
			return i
		}
	}
	return -1
}

// sameValues reports whether a and b hold the same keys and values.
func sameValues(a, b *Config) bool {
	ya, errA := yaml.Marshal(a)
	yb, errB := yaml.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ya, yb)
}
