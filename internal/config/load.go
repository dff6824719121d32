package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"go.ferry.im/ferry/bridge"
)

// envPrefix starts every environment variable that overrides a config key: FERRY_ + the dotted path upper-cased
// with dots replaced by underscores.
const envPrefix = "FERRY_"

// envIgnoredPrefix starts environment variables that share envPrefix but belong to the test tooling, not to
// the config (FERRY_TEST_PG).
const envIgnoredPrefix = "FERRY_TEST_"

// envPermissionsSeparator and envPermissionsAssign split FERRY_PERMISSIONS ("who=level,who=level").
const (
	envPermissionsSeparator = ","
	envPermissionsAssign    = "="
)

// Load reads the config file at path, applies FERRY_* environment overrides, decodes it strictly
// (unknown keys, wrong types and invalid values are errors naming the key and its line), fills in defaults
// for absent keys and runs Validate. The tokens written by `ferry -g` are not required; call ValidateForRun
// before serving.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("failed to read config: %w", err)
	}
	cfg, err := parseConfig(path, data, os.LookupEnv)
	if err != nil {
		return nil, err
	}
	if err = cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// parseConfig decodes data (named name in errors) with the environment overrides found by lookupEnv. It does
// not validate values beyond their types and ranges.
func parseConfig(name string, data []byte, lookupEnv func(string) (string, bool)) (*Config, error) {
	src := &configSource{file: name, lines: make(map[string]int), env: make(map[string]string)}
	root, err := parseDocument(name, data)
	if err != nil {
		return nil, err
	}
	_, errs := migrate(root, src)
	errs = append(errs, applyEnvOverrides(root, lookupEnv, src)...)
	w := &walker{src: src}
	w.section(root, reflect.TypeFor[Config](), "")
	errs = append(errs, w.errs...)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	cfg := Default()
	if err = root.Decode(cfg); err != nil {
		// The walker accepts only what decodes, so this is a bug in the walker rather than in the file.
		return nil, &Error{File: name, Msg: "failed to decode: " + oneLine(err.Error())}
	}
	cfg.src = src
	return cfg, nil
}

// yamlLineError matches the position yaml.v3 puts in syntax errors.
var yamlLineError = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// parseDocument parses data into the root mapping node. An empty file is an empty mapping.
func parseDocument(name string, data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
		return &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}, nil
	} else if err != nil {
		return nil, yamlSyntaxError(name, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, &Error{File: name, Line: extra.Line, Msg: "more than one YAML document; the config is one mapping"}
	} else if !errors.Is(err, io.EOF) {
		return nil, yamlSyntaxError(name, err)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) > 0 {
		root = root.Content[0]
	}
	if isNull(root) {
		return &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, &Error{File: name, Line: root.Line, Msg: "expected a mapping of sections (homeserver, appservice, ...), got " + describe(root)}
	}
	return root, nil
}

// yamlSyntaxError turns yaml.v3's "yaml: line N: ..." into "name:N: ...".
func yamlSyntaxError(name string, err error) error {
	msg := oneLine(err.Error())
	if m := yamlLineError.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &Error{File: name, Line: line, Msg: m[2]}
	}
	return &Error{File: name, Msg: strings.TrimPrefix(msg, "yaml: ")}
}

// oneLine folds a multi-line message into one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

var (
	durationType    = reflect.TypeFor[time.Duration]()
	permissionsType = reflect.TypeFor[bridge.Permissions]()
)

// configKey is a leaf of the config: a key holding a value rather than a section.
type configKey struct {
	path []string
	typ  reflect.Type
}

func (k configKey) dotted() string {
	return strings.Join(k.path, ".")
}

// envName is the environment variable that overrides the key.
func (k configKey) envName() string {
	return envPrefix + strings.ToUpper(strings.Join(k.path, "_"))
}

// configKeys lists every leaf key of t, depth first in field order.
func configKeys(t reflect.Type, prefix []string) []configKey {
	var keys []configKey
	for _, field := range yamlFields(t) {
		path := append(slices.Clone(prefix), field.name)
		if field.typ.Kind() == reflect.Struct && field.typ != durationType {
			keys = append(keys, configKeys(field.typ, path)...)
		} else {
			keys = append(keys, configKey{path: path, typ: field.typ})
		}
	}
	return keys
}

// yamlField is an exported struct field with its yaml key.
type yamlField struct {
	name string
	typ  reflect.Type
}

// yamlFields lists the fields of struct type t that yaml decodes, by yaml key.
func yamlFields(t reflect.Type) []yamlField {
	var fields []yamlField
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		fields = append(fields, yamlField{name: name, typ: f.Type})
	}
	return fields
}

// UnknownEnvOverrides returns the FERRY_* variables of environ ("NAME=value" entries, as from os.Environ) that
// override no config key, most likely misspelled. The caller should warn about them.
func UnknownEnvOverrides(environ []string) []string {
	known := make(map[string]bool)
	for _, key := range configKeys(reflect.TypeFor[Config](), nil) {
		known[key.envName()] = true
	}
	var unknown []string
	for _, entry := range environ {
		name, _, _ := strings.Cut(entry, "=")
		if strings.HasPrefix(name, envPrefix) && !strings.HasPrefix(name, envIgnoredPrefix) && !known[name] {
			unknown = append(unknown, name)
		}
	}
	slices.Sort(unknown)
	return unknown
}

// applyEnvOverrides replaces the values of root with those of the FERRY_* environment variables that are set
// and not empty, creating sections and keys as needed. The walker checks their types afterwards, exactly like
// values from the file.
func applyEnvOverrides(root *yaml.Node, lookupEnv func(string) (string, bool), src *configSource) []error {
	var errs []error
	for _, key := range configKeys(reflect.TypeFor[Config](), nil) {
		name := key.envName()
		value, ok := lookupEnv(name)
		if !ok || value == "" {
			continue
		}
		var node *yaml.Node
		switch {
		case key.typ == permissionsType:
			var err error
			if node, err = parsePermissionsEnv(value); err != nil {
				errs = append(errs, &Error{Env: name, Key: key.dotted(), Msg: key.dotted() + ": " + err.Error()})
				continue
			}
		case key.typ.Kind() == reflect.String:
			// A string key takes the variable verbatim, even when it looks like a number or a boolean.
			node = &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: value}
		default:
			// Other keys resolve the text like a plain YAML scalar, so "5s", "8080" and "true" type-check as
			// they would in the file.
			node = &yaml.Node{Kind: yaml.ScalarNode, Value: value}
			node.Tag = node.ShortTag()
			if node.Tag == "!!null" {
				// "null" or "~" from the environment is a wrong value, not a request for the default.
				node.Tag = "!!str"
			}
		}
		setNode(root, key.path, node)
		src.env[key.dotted()] = name
	}
	return errs
}

// parsePermissionsEnv parses FERRY_PERMISSIONS ("who=level,who=level") into a mapping node.
func parsePermissionsEnv(value string) (*yaml.Node, error) {
	mapping := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
	for item := range strings.SplitSeq(value, envPermissionsSeparator) {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		// Levels never contain '=', user ID localparts may: split at the last one.
		sep := strings.LastIndex(item, envPermissionsAssign)
		if sep <= 0 {
			return nil, fmt.Errorf("expected comma-separated who=level pairs, got %q", item)
		}
		who, level := strings.TrimSpace(item[:sep]), strings.TrimSpace(item[sep+1:])
		mapping.Content = append(mapping.Content,
			&yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: who},
			&yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: level})
	}
	return mapping, nil
}

// setNode sets the value at path in mapping, creating the sections on the way.
func setNode(mapping *yaml.Node, path []string, value *yaml.Node) {
	for i, name := range path {
		last := i == len(path)-1
		idx := findKey(mapping, name)
		if idx < 0 {
			mapping.Content = append(mapping.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: name}, nil)
			idx = len(mapping.Content) - 2
		}
		if last {
			mapping.Content[idx+1] = value
			return
		}
		child := mapping.Content[idx+1]
		if child != nil && child.Kind == yaml.AliasNode && child.Alias != nil {
			child = child.Alias
		}
		if child == nil || isNull(child) {
			child = &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
			mapping.Content[idx+1] = child
		}
		if child.Kind != yaml.MappingNode {
			// The file has a value where a section belongs; the walker reports it.
			return
		}
		mapping = child
	}
}

// findKey returns the index of key's key node in mapping's content, or -1.
func findKey(mapping *yaml.Node, key string) int {
	for i := 0; i+1 < len(mapping.Content); i += 2 {
		if mapping.Content[i].Value == key {
			return i
		}
	}
	return -1
}

// isNull reports whether n is a null scalar: an empty value, "~" or "null".
func isNull(n *yaml.Node) bool {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// describe renders a node for "got ..." in error messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "nothing"
		}
		return strconv.Quote(n.Value)
	default:
		return "an unsupported node"
	}
}

// walker checks a parsed config against the Config type before decoding: every key known, every value of the
// right type and in range. It removes keys with empty values, so that they keep their defaults, and records
// the line of every key.
type walker struct {
	src  *configSource
	errs []error
}

func (w *walker) fail(key string, line int, format string, args ...any) {
	w.errs = append(w.errs, w.src.newError(key, line, format, args...))
}

func joinKey(parent, name string) string {
	if parent == "" {
		return name
	}
	return parent + "." + name
}

// section checks a mapping node against struct type t.
func (w *walker) section(n *yaml.Node, t reflect.Type, path string) {
	if n.Kind != yaml.MappingNode {
		w.fail(path, n.Line, "%s: expected a section of keys, got %s", path, describe(n))
		return
	}
	fields := yamlFields(t)
	seen := make(map[string]int)
	kept := make([]*yaml.Node, 0, len(n.Content))
	for i := 0; i+1 < len(n.Content); i += 2 {
		keyNode, valueNode := n.Content[i], n.Content[i+1]
		if keyNode.Kind != yaml.ScalarNode {
			w.fail(path, keyNode.Line, "%s: keys must be names, got %s", displayKey(path), describe(keyNode))
			continue
		}
		name := keyNode.Value
		key := joinKey(path, name)
		idx := slices.IndexFunc(fields, func(f yamlField) bool { return f.name == name })
		if idx < 0 {
			w.fail(key, keyNode.Line, "unknown key %s%s", key, suggestKey(path, name, fields))
			continue
		}
		if first, dup := seen[name]; dup {
			w.fail(key, keyNode.Line, "duplicate key %s (first at line %d)", key, first)
			continue
		}
		seen[name] = keyNode.Line
		if keyNode.Line > 0 {
			w.src.lines[key] = keyNode.Line
		}
		if isNull(valueNode) {
			continue // absent: the default stays
		}
		w.value(valueNode, fields[idx].typ, key)
		kept = append(kept, keyNode, valueNode)
	}
	n.Content = kept
}

// displayKey names the root section in messages.
func displayKey(path string) string {
	if path == "" {
		return "config"
	}
	return path
}

// suggestKey proposes the key the user probably meant: the same name in another section, else a sibling
// within two typing mistakes.
func suggestKey(path, name string, siblings []yamlField) string {
	for _, key := range configKeys(reflect.TypeFor[Config](), nil) {
		if key.path[len(key.path)-1] == name && strings.Join(key.path[:len(key.path)-1], ".") != path {
			return " (did you mean " + key.dotted() + "?)"
		}
	}
	best, bestDist := "", 3
	for _, f := range siblings {
		if d := editDistance(name, f.name); d < bestDist {
			best, bestDist = f.name, d
		}
	}
	if best != "" {
		return " (did you mean " + joinKey(path, best) + "?)"
	}
	return ""
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// value checks a non-null value node against type t.
func (w *walker) value(n *yaml.Node, t reflect.Type, key string) {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	switch {
	case t == permissionsType:
		w.permissions(n, key)
	case t == durationType:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" {
			w.fail(key, n.Line, "%s: expected a duration such as \"5s\" or \"1m30s\", got %s", key, describe(n))
		} else if _, err := time.ParseDuration(n.Value); err != nil {
			w.fail(key, n.Line, "%s: expected a duration such as \"5s\" or \"1m30s\", got %s", key, describe(n))
		}
	case t.Kind() == reflect.Struct:
		w.section(n, t, key)
	case t.Kind() == reflect.String:
		if n.Kind != yaml.ScalarNode {
			w.fail(key, n.Line, "%s: expected a string, got %s", key, describe(n))
		}
	case t.Kind() == reflect.Bool:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" {
			w.fail(key, n.Line, "%s: expected true or false, got %s", key, describe(n))
		}
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Uint64:
		w.integer(n, t, key)
	default:
		w.fail(key, n.Line, "%s: cannot be set in the config file", key)
	}
}

// integer checks an integer value against its type and intRanges.
func (w *walker) integer(n *yaml.Node, t reflect.Type, key string) {
	bounds := typeRange(t)
	if r, ok := intRanges[key]; ok {
		bounds = intRange{max(r.min, bounds.min), min(r.max, bounds.max)}
	}
	var v int64
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" || n.Decode(&v) != nil || v < bounds.min || v > bounds.max {
		w.fail(key, n.Line, "%s: expected %s, got %s", key, bounds.describe(), describe(n))
	}
}

// typeRange is the range of integer type t, capped to int64.
func typeRange(t reflect.Type) intRange {
	bits := t.Bits()
	if t.Kind() >= reflect.Uint && t.Kind() <= reflect.Uint64 {
		if bits == 64 {
			return intRange{0, math.MaxInt64}
		}
		return intRange{0, 1<<bits - 1}
	}
	return intRange{-1 << (bits - 1), 1<<(bits-1) - 1}
}

// describe says which integers r accepts, in words.
func (r intRange) describe() string {
	switch {
	case r.min <= math.MinInt32 && r.max >= math.MaxInt32:
		return "an integer"
	case r.max >= math.MaxInt32:
		return fmt.Sprintf("an integer of at least %d", r.min)
	default:
		return fmt.Sprintf("an integer from %d to %d", r.min, r.max)
	}
}

// permissions checks the `permissions` mapping entry by entry, so each error names its own line.
func (w *walker) permissions(n *yaml.Node, key string) {
	if n.Kind != yaml.MappingNode {
		w.fail(key, n.Line, "%s: expected a mapping of user IDs, server names or \"*\" to levels (%s), got %s", key, bridge.LevelNames, describe(n))
		return
	}
	seen := make(map[string]int)
	for i := 0; i+1 < len(n.Content); i += 2 {
		keyNode, valueNode := n.Content[i], n.Content[i+1]
		if valueNode.Kind == yaml.AliasNode && valueNode.Alias != nil {
			valueNode = valueNode.Alias
		}
		who := keyNode.Value
		entry := key + "." + who
		if keyNode.Line > 0 {
			w.src.lines[entry] = keyNode.Line
		}
		if keyNode.Kind != yaml.ScalarNode {
			w.fail(key, keyNode.Line, "%s: keys must be user IDs, server names or \"*\", got %s", key, describe(keyNode))
			continue
		}
		if err := bridge.CheckPermissionKey(who); err != nil {
			w.fail(entry, keyNode.Line, "%s: %v", key, err)
			continue
		}
		if first, dup := seen[who]; dup {
			w.fail(entry, keyNode.Line, "duplicate key %s (first at line %d)", entry, first)
			continue
		}
		seen[who] = keyNode.Line
		if valueNode.Kind != yaml.ScalarNode || valueNode.ShortTag() != "!!str" {
			w.fail(entry, valueNode.Line, "%s: expected a level (%s), got %s", entry, bridge.LevelNames, describe(valueNode))
			continue
		}
		if _, err := bridge.ParseLevel(valueNode.Value); err != nil {
			w.fail(entry, valueNode.Line, "%s: %v", entry, err)
		}
	}
}
