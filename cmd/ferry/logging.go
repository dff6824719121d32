package main

import (
	"bytes"
	"io"

	"github.com/rs/zerolog"
	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
)

// requestBodyField is the field in which mautrix's HTTP client logs the body of every request it makes (at debug
// level, and at error level when a request fails). Those bodies include what ferry sends in the clear: messages
// relayed into unencrypted rooms, room names, notices. ferry never writes message content to its logs, so the
// field is removed from every line before it is written.
const requestBodyField = "req_body"

var requestBodyKey = []byte(`"` + requestBodyField + `"`)

// bodylessWriter writes zerolog's JSON lines to out without requestBodyField. Lines without the field (nearly
// all) pass through untouched.
type bodylessWriter struct {
	out io.Writer
}

func (w bodylessWriter) Write(p []byte) (int, error) {
	_, err := w.out.Write(stripRequestBody(p))
	return len(p), err
}

// WriteLevel keeps the level for writers that route by it (zerolog.MultiLevelWriter).
func (w bodylessWriter) WriteLevel(level zerolog.Level, p []byte) (int, error) {
	p2 := stripRequestBody(p)
	var err error
	if lw, ok := w.out.(zerolog.LevelWriter); ok {
		_, err = lw.WriteLevel(level, p2)
	} else {
		_, err = w.out.Write(p2)
	}
	return len(p), err
}

// stripRequestBody removes a top-level requestBodyField from one JSON log line.
func stripRequestBody(line []byte) []byte {
	if !bytes.Contains(line, requestBodyKey) || !gjson.GetBytes(line, requestBodyField).Exists() {
		return line
	}
	out, err := sjson.DeleteBytes(line, requestBodyField)
	if err != nil {
		// Not a JSON object after all; better no line than one with a body in it.
		return []byte(`{"level":"warn","message":"A log line with a request body could not be cleaned and was dropped"}` + "\n")
	}
	return out
}
