package config

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Error is one problem with the configuration, located in the file (File and Line) or in the
// environment (Env). Its message is one line naming the dotted key. Load, Validate and ValidateForRun
// return one Error, or several joined with errors.Join, one per line.
type Error struct {
	File string // the config file as named to Load; "" for a config not loaded from a file
	Line int    // 1-based line of the key in File; 0 when the key is absent from the file
	Env  string // the environment variable that set the key, if one did
	Key  string // dotted path of the key, e.g. "appservice.port"; "" for the file as a whole
	Msg  string // the problem, naming the key
}

func (e *Error) Error() string {
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

// newError builds a Error for key, located at line unless the key came from the environment.
func (src *configSource) newError(key string, line int, format string, args ...any) *Error {
	err := &Error{Key: key, Msg: fmt.Sprintf(format, args...)}
	src.locate(err)
	if err.Env == "" && line > 0 {
		err.Line = line
	}
	return err
}

// locate fills in where err's key was set.
func (src *configSource) locate(err *Error) {
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

// lineOrder sorts errors with a line by line, and the others after them.
func lineOrder(err *Error) int {
	if err.Line > 0 && err.Env == "" {
		return err.Line
	}
	return math.MaxInt32
}
