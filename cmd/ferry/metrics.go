package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/config"
	"go.ferry.im/ferry/internal/metrics"
)

// metricsPath is where the metrics listener serves the Prometheus exposition.
const metricsPath = "/metrics"

// readSnapshot reads the gauges a scrape reports from the database.
func readSnapshot(db *database.Database) func(ctx context.Context) (metrics.Snapshot, error) {
	return func(ctx context.Context) (metrics.Snapshot, error) {
		backlogs, err := db.Inbox.Backlogs(ctx)
		if err != nil {
			return metrics.Snapshot{}, err
		}
		snap := metrics.Snapshot{Inbox: make(map[string]metrics.Backlog, len(backlogs))}
		for state, b := range backlogs {
			snap.Inbox[string(state)] = metrics.Backlog{Count: b.Count, OldestSeen: b.OldestSeen}
		}
		snap.DisappearDue, snap.DisappearOldestDue, err = db.Disappear.Overdue(ctx, time.Now())
		return snap, err
	}
}

// serveMetrics starts the metrics listener when metrics.enabled is set, and returns the function that stops it.
func serveMetrics(cfg config.Metrics, db *database.Database, log zerolog.Logger) (stop func(), err error) {
	if !cfg.Enabled {
		return func() {}, nil
	}
	listener, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, err
	}
	registry := metrics.Registry
	state := metrics.NewStateCollector(readSnapshot(db))
	if err = registry.Register(state); err != nil {
		_ = listener.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+metricsPath, promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error().Err(err).Msg("Metrics listener stopped")
		}
	}()
	log.Info().Str("address", listener.Addr().String()).Str("path", metricsPath).Msg("Serving metrics")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(ctx)
		registry.Unregister(state)
	}, nil
}
