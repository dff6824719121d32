package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// stateTimeout bounds the database reads of one scrape.
const stateTimeout = 5 * time.Second

// Backlog is the events waiting in one inbox state.
type Backlog struct {
	Count      int
	OldestSeen time.Time // when the oldest was received; zero when Count is 0
}

// Snapshot is what the database holds at a scrape.
type Snapshot struct {
	// Inbox is the backlog per inbox state (pending, waiting_keys).
	Inbox map[string]Backlog
	// DisappearDue counts redactions past their deadline; DisappearOldestDue is the earliest such deadline.
	DisappearDue       int
	DisappearOldestDue time.Time
}

// Descriptions of the gauges a StateCollector reports.
var (
	inboxEventsDesc = prometheus.NewDesc(namespace+"_inbox_events", "Events waiting in the inbox, by state (pending: "+
		"queued for their room's worker; waiting_keys: parked until their room key arrives).", []string{"state"}, nil)
	inboxOldestDesc = prometheus.NewDesc(namespace+"_inbox_oldest_pending_age_seconds", "Age of the oldest event "+
		"waiting in each inbox state, since it was received; 0 when none waits.", []string{"state"}, nil)
	disappearDueDesc = prometheus.NewDesc(namespace+"_disappear_redactions_due", "Redactions of disappearing "+
		"messages whose deadline has passed.", nil, nil)
	disappearOldestDesc = prometheus.NewDesc(namespace+"_disappear_redactions_overdue_seconds", "How far past its "+
		"deadline the most overdue redaction is; 0 when none is due.", nil, nil)
	databaseUpDesc = prometheus.NewDesc(namespace+"_database_up", "1 when the last scrape could read the "+
		"database, 0 when it could not.", nil, nil)
)

// StateCollector reports gauges read from the database at each scrape, so the relay path pays nothing for them.
type StateCollector struct {
	read func(ctx context.Context) (Snapshot, error)
	now  func() time.Time
}

var _ prometheus.Collector = (*StateCollector)(nil)

// NewStateCollector reports what read returns at each scrape.
func NewStateCollector(read func(ctx context.Context) (Snapshot, error)) *StateCollector {
	return &StateCollector{read: read, now: time.Now}
}

// Describe implements prometheus.Collector.
func (c *StateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{inboxEventsDesc, inboxOldestDesc, disappearDueDesc, disappearOldestDesc, databaseUpDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *StateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), stateTimeout)
	defer cancel()
	snap, err := c.read(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(databaseUpDesc, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(databaseUpDesc, prometheus.GaugeValue, 1)
	now := c.now()
	age := func(t time.Time) float64 {
		if t.IsZero() {
			return 0
		}
		return max(now.Sub(t), 0).Seconds()
	}
	for state, b := range snap.Inbox {
		ch <- prometheus.MustNewConstMetric(inboxEventsDesc, prometheus.GaugeValue, float64(b.Count), state)
		ch <- prometheus.MustNewConstMetric(inboxOldestDesc, prometheus.GaugeValue, age(b.OldestSeen), state)
	}
	ch <- prometheus.MustNewConstMetric(disappearDueDesc, prometheus.GaugeValue, float64(snap.DisappearDue))
	ch <- prometheus.MustNewConstMetric(disappearOldestDesc, prometheus.GaugeValue, age(snap.DisappearOldestDue))
}
