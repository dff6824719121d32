package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/rs/zerolog"
	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
	"go.mau.fi/zeroconfig"
	"gopkg.in/natefinch/lumberjack.v2"

	"go.ferry.im/ferry/internal/config"
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

// logTimeFormat is the time format of pretty log lines: RFC 3339 with milliseconds.
const logTimeFormat = "2006-01-02T15:04:05.000Z07:00"

// logFiles are the rotated log files of the logger newLogger built, so that SIGHUP can reopen them.
type logFiles struct {
	files []*lumberjack.Logger
}

// Reopen starts each log file afresh: a file still at its path is rotated first (renamed with a timestamp, kept
// as a backup); a file another tool already moved away is left to it. Either way ferry writes to a new file at
// the configured path from then on.
func (lf *logFiles) Reopen() error {
	var errs []error
	for _, f := range lf.files {
		if err := f.Rotate(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close closes the log files.
func (lf *logFiles) Close() {
	for _, f := range lf.files {
		_ = f.Close()
	}
}

// opened collects the files zeroconfig's file writers open while a logger is compiled (zeroconfig keeps no handle
// on them), for newLogger to hand to SIGHUP.
var opened struct {
	sync.Mutex // guards the following fields
	files      []*lumberjack.Logger
}

func init() {
	// Unlike zeroconfig's own file writer, this one does not rotate at every start: a restart appends.
	zeroconfig.RegisterWriter(zeroconfig.WriterTypeFile, func(wc *zeroconfig.WriterConfig) (io.Writer, error) {
		f := &lumberjack.Logger{Filename: wc.Filename, MaxSize: wc.MaxSize, MaxAge: wc.MaxAge, MaxBackups: wc.MaxBackups, Compress: wc.Compress}
		opened.files = append(opened.files, f)
		return f, nil
	})
}

// zeroconfigFor translates the logging section into zeroconfig's terms: standard output and the file are its
// writers, each with its format.
func zeroconfigFor(cfg config.Logging) (*zeroconfig.Config, error) {
	level, err := zerolog.ParseLevel(cfg.MinLevel)
	if err != nil || cfg.MinLevel == "" {
		return nil, fmt.Errorf("logging.min_level: unknown level %q", cfg.MinLevel)
	}
	zc := &zeroconfig.Config{MinLevel: &level}
	if cfg.Stdout.Format != config.LogOff {
		zc.Writers = append(zc.Writers, zeroconfig.WriterConfig{
			Type: zeroconfig.WriterTypeStdout, Format: zeroconfig.LogFormat(cfg.Stdout.Format), TimeFormat: logTimeFormat,
		})
	}
	if cfg.File.Path != "" {
		zc.Writers = append(zc.Writers, zeroconfig.WriterConfig{
			Type: zeroconfig.WriterTypeFile, Format: zeroconfig.LogFormat(cfg.File.Format), TimeFormat: logTimeFormat,
			FileConfig: zeroconfig.FileConfig{
				Filename: cfg.File.Path, MaxSize: cfg.File.MaxSize, MaxBackups: cfg.File.MaxBackups, MaxAge: cfg.File.MaxAge, Compress: cfg.File.Compress,
			},
		})
	}
	return zc, nil
}

// newLogger builds the logger the logging section describes, and the handle on its files for SIGHUP. Each
// writer is compiled by zeroconfig; ferry joins them itself, so that every line passes one writer before it is
// written anywhere.
func newLogger(cfg config.Logging) (zerolog.Logger, *logFiles, error) {
	zc, err := zeroconfigFor(cfg)
	if err != nil {
		return zerolog.Logger{}, nil, err
	}
	opened.Lock()
	defer opened.Unlock()
	opened.files = nil
	writers := make([]io.Writer, 0, len(zc.Writers))
	for _, wc := range zc.Writers {
		w, err := wc.Compile()
		if err != nil {
			return zerolog.Logger{}, nil, err
		}
		writers = append(writers, w)
	}
	files := &logFiles{files: opened.files}
	opened.files = nil
	// Open the file now, so that a path ferry cannot write to stops it at start rather than losing the log.
	for _, f := range files.files {
		if _, err = f.Write(nil); err != nil {
			files.Close()
			return zerolog.Logger{}, nil, fmt.Errorf("logging.file.path: %w", err)
		}
	}
	var out io.Writer = io.Discard
	if len(writers) > 0 {
		out = zerolog.MultiLevelWriter(writers...)
	}
	// Every line passes bodylessWriter first: it holds JSON there, before a pretty writer renders it.
	return zerolog.New(bodylessWriter{out: out}).Level(*zc.MinLevel).With().Timestamp().Logger(), files, nil
}
