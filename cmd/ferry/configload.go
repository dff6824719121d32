package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
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
	defaultLogLevel           = "info"
	defaultLogFormat          = "console"
)

// Enumerated values of the sections this package owns, in the order error messages list them.
var (
	databaseTypes = []string{DatabaseTypePostgres, DatabaseTypeSQLite}
	logLevels     = []string{"trace", "debug", "info", "warn", "error"}
	logFormats    = []string{"console", "json"}
)

// examplePlaceholders are values of config.example.yaml that must be changed before ferry runs. Validate
// rejects a config still holding any of them, naming the key.
var examplePlaceholders = []struct {
	key, value, hint string
	get              func(*Config) string
}{
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
	"appservice.port":         {1, math.MaxUint16},
	"database.max_open_conns": {1, math.MaxInt},
	"database.max_idle_conns": {0, math.MaxInt},
}

// configFileMode is the mode of files ferry writes that hold secrets (the config, the registration).
const configFileMode os.FileMode = 0o600

// ConfigError is one problem with the configuration, located in the file (File and Line) or in the
// environment (Env). Its message is one line naming the dotted key. LoadConfig, Validate and ValidateForRun
// return one ConfigError, or several joined with errors.Join, one per line.
type ConfigError struct {
	File string // the config file as named to LoadConfig; "" for a config not loaded from a file
	Line int    // 1-based line of the key in File; 0 when the key is absent from the file
	Env  string // the environment variable that set the key, if one did
	Key  string // dotted path of the key, e.g. "appservice.port"; "" for the file as a whole
	Msg  string // the problem, naming the key
}

func (e *ConfigError) Error() string {
	switch {
	case e.Env != "":
		return "environment variable " + e.Env + ": " + e.Msg
	case e.File != "" && e.Line > 0:
		return e.File + ":" + strconv.Itoa(e.Line) + ": " + e.Msg
	case e.File != "":
		return e.File + ": " + e.Msg
	default:
		return e.Msg
	}
}

// configSource remembers where each key of a loaded config came from, so that errors found after decoding
// (by Validate) still name the line or the environment variable.
type configSource struct {
	file string
	// lines maps a dotted key to the line of the key in the file.
	lines map[string]int
	// env maps a dotted key to the environment variable that overrode it.
	env map[string]string
}

// envFor returns the environment variable that set key or one of its parents.
func (src *configSource) envFor(key string) string {
	for k := key; k != ""; {
		if name, ok := src.env[k]; ok {
			return name
		}
		dot := strings.LastIndexByte(k, '.')
		if dot < 0 {
			break
		}
		k = k[:dot]
	}
	return ""
}

// newError builds a ConfigError for key, located at line unless the key came from the environment.
func (src *configSource) newError(key string, line int, format string, args ...any) *ConfigError {
	err := &ConfigError{Key: key, Msg: fmt.Sprintf(format, args...)}
	src.locate(err)
	if err.Env == "" && line > 0 {
		err.Line = line
	}
	return err
}

// locate fills in where err's key was set.
func (src *configSource) locate(err *ConfigError) {
	if src == nil {
		return
	}
	err.File = src.file
	if name := src.envFor(err.Key); name != "" {
		err.Env = name
		return
	}
	err.Line = src.lines[err.Key]
}

// DefaultConfig returns a config with every default filled in. Keys without a default (homeserver address
// and domain, tokens) are empty.
func DefaultConfig() *Config {
	return &Config{
		Appservice: AppserviceConfig{
			Address:  defaultAppserviceAddress,
			Hostname: defaultAppserviceHostname,
			Port:     defaultAppservicePort,
			ID:       defaultAppserviceID,
			Bot: BotConfig{
				Username:    defaultBotUsername,
				Displayname: defaultBotDisplayname,
			},
		},
		Database: DatabaseConfig{
			Type:         DatabaseTypeSQLite,
			URI:          defaultDatabaseURI,
			MaxOpenConns: defaultMaxOpenConns,
			MaxIdleConns: defaultMaxIdleConns,
		},
		Bridge:      bridge.DefaultConfig(),
		Encryption:  crypto.DefaultConfig(),
		Permissions: bridge.Permissions{},
		Logging: LoggingConfig{
			MinLevel: defaultLogLevel,
			Format:   defaultLogFormat,
		},
	}
}

// LoadConfig reads the config file at path, applies FERRY_* environment overrides, decodes it strictly
// (unknown keys, wrong types and invalid values are errors naming the key and its line), fills in defaults
// for absent keys and runs Validate. The tokens written by `ferry -g` are not required; call ValidateForRun
// before serving.
func LoadConfig(path string) (*Config, error) {
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
	errs := applyEnvOverrides(root, lookupEnv, src)
	w := &walker{src: src}
	w.section(root, reflect.TypeFor[Config](), "")
	errs = append(errs, w.errs...)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	cfg := DefaultConfig()
	if err = root.Decode(cfg); err != nil {
		// The walker accepts only what decodes, so this is a bug in the walker rather than in the file.
		return nil, &ConfigError{File: name, Msg: "failed to decode: " + oneLine(err.Error())}
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
		return nil, &ConfigError{File: name, Line: extra.Line, Msg: "more than one YAML document; the config is one mapping"}
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
		return nil, &ConfigError{File: name, Line: root.Line, Msg: "expected a mapping of sections (homeserver, appservice, ...), got " + describe(root)}
	}
	return root, nil
}

// yamlSyntaxError turns yaml.v3's "yaml: line N: ..." into "name:N: ...".
func yamlSyntaxError(name string, err error) error {
	msg := oneLine(err.Error())
	if m := yamlLineError.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &ConfigError{File: name, Line: line, Msg: m[2]}
	}
	return &ConfigError{File: name, Msg: strings.TrimPrefix(msg, "yaml: ")}
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
				errs = append(errs, &ConfigError{Env: name, Key: key.dotted(), Msg: key.dotted() + ": " + err.Error()})
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

// Validate checks the values of a decoded config: required keys set, URLs and names well-formed, enumerated
// values known, example placeholders replaced. It compiles derived values (bridge.displayname_template into
// Bridge.DisplaynameTmpl). It does not require the tokens that `ferry -g` writes; see ValidateForRun. For a
// config from LoadConfig each error names the key's line or environment variable.
func (c *Config) Validate() error {
	return c.validate(false)
}

// ValidateForRun is Validate plus what serving needs: appservice.as_token and appservice.hs_token set.
func (c *Config) ValidateForRun() error {
	return c.validate(true)
}

// validator collects the problems found by Config.validate.
type validator struct {
	errs []*ConfigError
}

func (v *validator) fail(key, format string, args ...any) {
	v.errs = append(v.errs, &ConfigError{Key: key, Msg: key + ": " + fmt.Sprintf(format, args...)})
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

	enc := c.Encryption
	v.required("encryption.pickle_key", enc.PickleKey)
	v.oneOf("encryption.device_mode", enc.DeviceMode, crypto.DeviceModes)
	v.oneOf("encryption.share_min_trust", enc.ShareMinTrust, crypto.TrustLevels)
	v.oneOf("encryption.receive_min_trust", enc.ReceiveMinTrust, crypto.TrustLevels)

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
	v.oneOf("logging.format", c.Logging.Format, logFormats)

	if len(v.errs) == 0 {
		return nil
	}
	for _, err := range v.errs {
		c.src.locate(err)
	}
	// Report in file order, then what is not in the file (absent keys, environment variables).
	slices.SortStableFunc(v.errs, func(a, b *ConfigError) int {
		return lineOrder(a) - lineOrder(b)
	})
	errs := make([]error, len(v.errs))
	for i, err := range v.errs {
		errs[i] = err
	}
	return errors.Join(errs...)
}

// lineOrder sorts errors with a line by line, and the others after them.
func lineOrder(err *ConfigError) int {
	if err.Line > 0 && err.Env == "" {
		return err.Line
	}
	return math.MaxInt32
}

// WriteConfigValues sets dotted keys (e.g. "encryption.pickle_key", "appservice.as_token") to string values in
// the config file at path, keeping every comment and all other content, and rewrites the file atomically with
// mode 0600. Keys missing from the file are added to their section, creating the section if needed. Values
// written are plain strings; they must not contain line breaks.
func WriteConfigValues(path string, values map[string]string) error {
	if resolved, err := filepath.EvalSymlinks(path); err == nil {
		path = resolved
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("failed to read config: %w", err)
	}
	updated, err := setConfigValues(data, values)
	if err != nil {
		return fmt.Errorf("failed to update config %s: %w", path, err)
	}
	if err = WriteFileAtomic(path, updated, configFileMode); err != nil {
		return fmt.Errorf("failed to write config: %w", err)
	}
	return nil
}

// setConfigValues returns data with values set. It edits the text line by line so that comments, blank lines
// and quoting survive; where the layout is too unusual for that (flow mappings, multi-line values), it edits
// the node tree and re-encodes it, which keeps comments but may move blank lines.
func setConfigValues(data []byte, values map[string]string) ([]byte, error) {
	keys := slices.Sorted(maps.Keys(values))
	for _, key := range keys {
		path := strings.Split(key, ".")
		if slices.Contains(path, "") {
			return nil, fmt.Errorf("invalid key %q", key)
		}
		if strings.ContainsAny(values[key], "\r\n") {
			return nil, fmt.Errorf("value for %s contains a line break", key)
		}
	}
	out := data
	for _, key := range keys {
		path := strings.Split(key, ".")
		edited, err := setValueInText(out, path, values[key])
		if err == nil {
			if got, ok := lookupValue(edited, path); ok && got == values[key] {
				out = edited
				continue
			}
		}
		if out, err = setValueInTree(out, path, values[key]); err != nil {
			return nil, err
		}
		if got, ok := lookupValue(out, path); !ok || got != values[key] {
			return nil, fmt.Errorf("could not set %s", key)
		}
	}
	return out, nil
}

// errUnusualLayout makes setValueInText give up in favour of setValueInTree.
var errUnusualLayout = errors.New("layout too unusual for a line edit")

// parseRoot parses a config file for editing; an empty file is an empty mapping.
func parseRoot(data []byte) (*yaml.Node, *yaml.Node, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, nil, oneLineError(err)
	}
	if doc.Kind == 0 {
		doc = yaml.Node{Kind: yaml.DocumentNode, Content: []*yaml.Node{{Kind: yaml.MappingNode, Tag: "!!map"}}}
	}
	root := doc.Content[0]
	if isNull(root) {
		*root = yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
	}
	if root.Kind != yaml.MappingNode {
		return nil, nil, errors.New("the file is not a mapping")
	}
	return &doc, root, nil
}

func oneLineError(err error) error {
	return errors.New(oneLine(err.Error()))
}

// lookupValue returns the string value at path in data.
func lookupValue(data []byte, path []string) (string, bool) {
	_, node, err := parseRoot(data)
	if err != nil {
		return "", false
	}
	for _, name := range path {
		if node.Kind != yaml.MappingNode {
			return "", false
		}
		idx := findKey(node, name)
		if idx < 0 {
			return "", false
		}
		node = node.Content[idx+1]
	}
	var value string
	if node.Kind != yaml.ScalarNode || node.ShortTag() != "!!str" || node.Decode(&value) != nil {
		return "", false
	}
	return value, true
}

// renderScalar renders value as a one-line YAML string scalar, quoted when it would otherwise read as
// something else.
func renderScalar(value string) (string, error) {
	out, err := yaml.Marshal(&yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: value})
	if err != nil {
		return "", err
	}
	text := strings.TrimSuffix(string(out), "\n")
	if strings.Contains(text, "\n") {
		return "", errUnusualLayout
	}
	return text, nil
}

// setValueInText sets path to value by editing the lines of data.
func setValueInText(data []byte, path []string, value string) ([]byte, error) {
	_, root, err := parseRoot(data)
	if err != nil {
		return nil, err
	}
	scalar, err := renderScalar(value)
	if err != nil {
		return nil, err
	}
	lines := strings.SplitAfter(string(data), "\n")
	mapping := root
	var parentKey *yaml.Node
	for i, name := range path {
		idx := findKey(mapping, name)
		if idx < 0 {
			return insertKeys(lines, mapping, parentKey, path[i:], scalar)
		}
		keyNode, valueNode := mapping.Content[idx], mapping.Content[idx+1]
		if i == len(path)-1 {
			return replaceScalar(lines, keyNode, valueNode, scalar)
		}
		switch {
		case valueNode.Kind == yaml.MappingNode && valueNode.Style&yaml.FlowStyle == 0:
			mapping, parentKey = valueNode, keyNode
		case isNull(valueNode) && valueNode.Kind == yaml.ScalarNode && valueNode.Value == "":
			// "section:" with nothing after it: add the keys below it.
			return insertLines(lines, keyNode.Line, renderKeys(path[i+1:], scalar, keyNode.Column-1+2))
		default:
			return nil, errUnusualLayout
		}
	}
	return nil, errUnusualLayout
}

// insertKeys adds rest (a key path below mapping) with the rendered value. In the root mapping (parentKey nil)
// the keys go at the end of the file; in a section they go right below the section's key, indented like its
// other keys.
func insertKeys(lines []string, mapping, parentKey *yaml.Node, rest []string, scalar string) ([]byte, error) {
	if parentKey == nil {
		if n := len(lines); n > 0 && lines[n-1] != "" && !strings.HasSuffix(lines[n-1], "\n") {
			lines[n-1] += "\n"
		}
		return []byte(strings.Join(lines, "") + renderKeys(rest, scalar, 0)), nil
	}
	if len(mapping.Content) == 0 {
		return nil, errUnusualLayout
	}
	return insertLines(lines, parentKey.Line, renderKeys(rest, scalar, mapping.Content[0].Column-1))
}

// renderKeys renders nested keys ending in the value, the first at indent spaces.
func renderKeys(path []string, scalar string, indent int) string {
	var b strings.Builder
	for i, name := range path {
		b.WriteString(strings.Repeat(" ", indent+2*i))
		key, _ := renderScalar(name)
		b.WriteString(key + ":")
		if i == len(path)-1 {
			b.WriteString(" " + scalar)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// insertLines inserts text after the first after lines.
func insertLines(lines []string, after int, text string) ([]byte, error) {
	if after < 0 || after > len(lines) {
		return nil, errUnusualLayout
	}
	if after > 0 && !strings.HasSuffix(lines[after-1], "\n") {
		lines[after-1] += "\n"
	}
	out := strings.Join(lines[:after], "") + text + strings.Join(lines[after:], "")
	return []byte(out), nil
}

// replaceScalar replaces the one-line scalar value of keyNode in place, keeping any comment after it.
func replaceScalar(lines []string, keyNode, valueNode *yaml.Node, scalar string) ([]byte, error) {
	if valueNode.Kind != yaml.ScalarNode || valueNode.Style&(yaml.LiteralStyle|yaml.FoldedStyle) != 0 ||
		valueNode.Tag != "" && valueNode.Style&yaml.TaggedStyle != 0 || keyNode.Line < 1 || keyNode.Line > len(lines) {
		return nil, errUnusualLayout
	}
	lineIdx := keyNode.Line - 1
	line := []rune(lines[lineIdx])
	var start, end int
	if isNull(valueNode) && valueNode.Value == "" {
		// "key:" with nothing after it: the value goes right after the colon.
		keyEnd, ok := scalarEnd(line, keyNode.Column-1, keyNode.Style)
		if !ok {
			return nil, errUnusualLayout
		}
		colon := keyEnd
		for colon < len(line) && (line[colon] == ' ' || line[colon] == '\t') {
			colon++
		}
		if colon >= len(line) || line[colon] != ':' {
			return nil, errUnusualLayout
		}
		start, end = colon+1, colon+1
		scalar = " " + scalar
		if end < len(line) && line[end] != '\n' && line[end] != '\r' {
			scalar += " " // keep a space before a comment
			for end < len(line) && (line[end] == ' ' || line[end] == '\t') {
				end++
			}
		}
	} else {
		if valueNode.Line != keyNode.Line {
			return nil, errUnusualLayout
		}
		start = valueNode.Column - 1
		var ok bool
		if end, ok = scalarEnd(line, start, valueNode.Style); !ok {
			return nil, errUnusualLayout
		}
	}
	lines[lineIdx] = string(line[:start]) + scalar + string(line[end:])
	return []byte(strings.Join(lines, "")), nil
}

// scalarEnd returns the index just past the scalar starting at start in line, if it ends on that line.
func scalarEnd(line []rune, start int, style yaml.Style) (int, bool) {
	if start < 0 || start >= len(line) {
		return 0, false
	}
	switch {
	case style&yaml.DoubleQuotedStyle != 0:
		if line[start] != '"' {
			return 0, false
		}
		for i := start + 1; i < len(line); i++ {
			switch line[i] {
			case '\\':
				i++
			case '"':
				return i + 1, true
			}
		}
		return 0, false
	case style&yaml.SingleQuotedStyle != 0:
		if line[start] != '\'' {
			return 0, false
		}
		for i := start + 1; i < len(line); i++ {
			if line[i] == '\'' {
				if i+1 < len(line) && line[i+1] == '\'' {
					i++
					continue
				}
				return i + 1, true
			}
		}
		return 0, false
	default:
		// A plain scalar runs to a comment (" #"), a ": " (when it is a key) or the end of the line.
		end := start
		for end < len(line) && line[end] != '\n' && line[end] != '\r' {
			if line[end] == '#' && end > start && (line[end-1] == ' ' || line[end-1] == '\t') {
				break
			}
			if line[end] == ':' && (end+1 == len(line) || line[end+1] == ' ' || line[end+1] == '\t' || line[end+1] == '\n' || line[end+1] == '\r') {
				break
			}
			end++
		}
		for end > start && (line[end-1] == ' ' || line[end-1] == '\t') {
			end--
		}
		return end, end > start
	}
}

// setValueInTree sets path to value in the node tree and re-encodes the file with 2-space indentation.
func setValueInTree(data []byte, path []string, value string) ([]byte, error) {
	doc, root, err := parseRoot(data)
	if err != nil {
		return nil, err
	}
	mapping := root
	for _, name := range path[:len(path)-1] {
		idx := findKey(mapping, name)
		if idx < 0 {
			mapping.Content = append(mapping.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: name}, &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"})
			idx = len(mapping.Content) - 2
		}
		child := mapping.Content[idx+1]
		if isNull(child) {
			*child = yaml.Node{Kind: yaml.MappingNode, Tag: "!!map", LineComment: child.LineComment}
		}
		if child.Kind != yaml.MappingNode {
			return nil, fmt.Errorf("%s is not a section", strings.Join(path, "."))
		}
		mapping = child
	}
	leaf := path[len(path)-1]
	if idx := findKey(mapping, leaf); idx >= 0 {
		old := mapping.Content[idx+1]
		if old.Kind != yaml.ScalarNode {
			return nil, fmt.Errorf("%s is a section, not a value", strings.Join(path, "."))
		}
		old.Tag, old.Value, old.Style = "!!str", value, 0
	} else {
		mapping.Content = append(mapping.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: leaf}, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: value})
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err = enc.Encode(doc); err != nil {
		return nil, err
	}
	if err = enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteFileAtomic writes data to path through a temporary file in the same directory, renamed over path once
// synced, so readers see the old or the new content and never a partial file. The file gets mode perm
// regardless of the umask. A symlink at path is followed: its target is replaced.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	if resolved, resolveErr := filepath.EvalSymlinks(path); resolveErr == nil {
		path = resolved
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	// Restrict the mode before any byte of a secret is written.
	if err = tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	// Persist the rename itself; not every platform can sync a directory, so this is best effort.
	if d, openErr := os.Open(dir); openErr == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}
