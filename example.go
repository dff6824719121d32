// Package ferry holds what the repository root provides to the binaries: the example configuration, embedded
// so that cmd/ferry can write it out and check configs against it. It holds no logic.
package ferry

import _ "embed"

// ExampleConfig is config.example.yaml: every key with its default, commented.
//
//go:embed config.example.yaml
var ExampleConfig []byte
