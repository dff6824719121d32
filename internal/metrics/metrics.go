// Package metrics is ferry's Prometheus instrumentation: the collectors the relay, the crypto layer and the
// database update on their way, the homeserver request counter (an http.RoundTripper), the gauges read from the
// database at scrape time, and the registry cmd/ferry serves on a listener of its own (metrics.enabled).
//
// Collectors live in one private registry and are always updated: an update is an atomic add or a histogram
// bucket increment, cheaper than anything else on the relay path, so nothing checks whether metrics are served.
// Labels take values from small fixed sets (event types ferry relays, outcomes, reasons, endpoint templates,
// errcodes), never user or room IDs. It imports nothing of ferry's and logs nothing.
package metrics

import (
	"maps"
	"runtime"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// namespace prefixes every metric name.
const namespace = "ferry"

// Relay outcomes of one event in one target room.
const (
	OutcomeSent    = "sent"    // the homeserver accepted the copy
	OutcomeDropped = "dropped" // deliberately not relayed into the room (policy, not crossing the link)
	OutcomeRetry   = "retry"   // a transient failure; the event is tried again
	OutcomeFailed  = "failed"  // a permanent failure; the source room was told
)

// Reasons an event could not be decrypted (UndecryptableEvents) or was parked (ParkedEvents).
const (
	ReasonKeyMissing      = "key_missing"      // the room key has not arrived (yet)
	ReasonKeyWithheld     = "key_withheld"     // the sender's device withheld the room key
	ReasonUntrustedDevice = "untrusted_device" // the sending device is below encryption.receive_min_trust
	ReasonDecryptError    = "decrypt_error"    // anything else: a corrupt or replayed message, an unknown algorithm
)

// Database commit operations (DatabaseCommit).
const (
	CommitIntake = "intake" // a homeserver transaction's events, before it is acknowledged
	CommitRelay  = "relay"  // a worker's batch of copies and finished events
)

// Histogram buckets, in seconds.
var (
	// relayBuckets span a message relayed in milliseconds to one that waited for its room key.
	relayBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}
	// processingBuckets span ferry's own part of a relay, from a millisecond to a wait for a room key.
	processingBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}
	// shareBuckets span a key share to a few devices to one to thousands.
	shareBuckets = []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
	// commitBuckets span a loopback commit to a slow disk's.
	commitBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1}
	// latenessBuckets span a redaction on time to one hours late (ferry was down).
	latenessBuckets = []float64{.1, .5, 1, 5, 10, 30, 60, 300, 900, 3600, 21600}
)

// Why a transaction's events waited for /sync (HeldTransactions).
const (
	HeldStart      = "start"      // the first transaction since ferry started
	HeldGap        = "gap"        // its number skips one or more
	HeldRedelivery = "redelivery" // its number is not above the last one recorded
	HeldUnnumbered = "unnumbered" // its ID is not a number
	HeldUncovered  = "uncovered"  // it follows, but no /sync batch has shown what came before it since a held one
)

var (
	// RelayedEvents counts events by type and outcome, once per target room.
	RelayedEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "relayed_events_total",
		Help: "Events handled per target room, by event type and outcome (sent, dropped, retry, failed).",
	}, []string{"type", "outcome"})
	// RelayLatency is the time from the transaction that brought an event to the homeserver accepting its copy.
	RelayLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: namespace, Name: "relay_latency_seconds", Buckets: relayBuckets,
		Help: "Time from receiving an event in a homeserver transaction to the homeserver accepting its copy.",
	})
	// RelayProcessing is ferry's own part of RelayLatency: from the transaction that brought an event to the
	// copy's request to the homeserver, its encryption included (the rest is the homeserver's answer to it).
	RelayProcessing = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: namespace, Name: "relay_processing_seconds", Buckets: processingBuckets,
		Help: "Time from receiving an event in a homeserver transaction to its copy's request to the homeserver, encryption included (relay latency without the homeserver's answer).",
	})
	// UndecryptableEvents counts decryption failures by reason.
	UndecryptableEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "undecryptable_events_total",
		Help: "Encrypted events ferry could not decrypt, by reason.",
	}, []string{"reason"})
	// ParkedEvents counts events parked until their room key arrives, by reason.
	ParkedEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "parked_events_total",
		Help: "Events parked until their room key arrives, by reason.",
	}, []string{"reason"})
	// KeyShares counts room key shares, KeyShareDevices the devices they went to by result, and KeyShareDuration
	// how long each took.
	KeyShares = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "key_shares_total", Help: "Megolm room key shares.",
	})
	KeyShareDevices = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "key_share_devices_total",
		Help: "Devices addressed by room key shares, by result (shared, withheld, no_olm).",
	}, []string{"result"})
	KeyShareDuration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: namespace, Name: "key_share_duration_seconds", Buckets: shareBuckets,
		Help: "Time one room key share took, from reading the devices to the last to-device request.",
	})
	// OlmSessionsCreated counts Olm sessions created by any of ferry's devices.
	OlmSessionsCreated = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "olm_sessions_created_total", Help: "Olm sessions created by ferry's devices.",
	})
	// DisappearRedactions counts redactions of disappearing messages by outcome (done, failed, retry), and
	// DisappearLateness how long after its deadline each done one happened.
	DisappearRedactions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "disappear_redactions_total",
		Help: "Redactions of disappearing messages, by outcome (done, failed, retry).",
	}, []string{"outcome"})
	DisappearLateness = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: namespace, Name: "disappear_redaction_lateness_seconds", Buckets: latenessBuckets,
		Help: "How long after its deadline a disappearing message was redacted.",
	})
	// HomeserverRequests counts requests to the homeserver by method, endpoint template and errcode.
	HomeserverRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "homeserver_requests_total",
		Help: "Requests to the homeserver, by method, endpoint (IDs replaced by placeholders) and errcode (none when it succeeded).",
	}, []string{"method", "endpoint", "errcode"})
	// DatabaseCommit is the time of the commits that hold up the relay.
	DatabaseCommit = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Name: "database_commit_seconds", Buckets: commitBuckets,
		Help: "Time of database commits ferry waits for, by operation (intake, relay).",
	}, []string{"operation"})
	// buildInfo is 1, labelled with the version.
	// HeldTransactions counts transactions whose events waited for the bot's /sync to show their room's order
	// (appservice-mode encryption), by why (bridge/txngaps.go).
	HeldTransactions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "held_transactions_total",
		Help: "Pushed transactions whose events waited for the bot's /sync, by reason (start, gap, redelivery, unnumbered, uncovered).",
	}, []string{"reason"})
	buildInfo = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Name: "build_info", Help: "ferry's version, commit and Go version; always 1.",
	}, []string{"version", "commit", "goversion"})
)

// Registry holds every collector of this package, the Go runtime's and the process's.
var Registry = prometheus.NewRegistry()

func init() {
	Registry.MustRegister(RelayedEvents, RelayLatency, RelayProcessing, UndecryptableEvents, ParkedEvents, KeyShares, KeyShareDevices,
		KeyShareDuration, OlmSessionsCreated, DisappearRedactions, DisappearLateness, HomeserverRequests, DatabaseCommit,
		HeldTransactions, buildInfo, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Every series of a fixed label set exists from the start, at 0: a rate over a series that appears only with
	// its first event misses that event.
	for _, reason := range []string{ReasonKeyMissing, ReasonKeyWithheld, ReasonUntrustedDevice, ReasonDecryptError} {
		UndecryptableEvents.WithLabelValues(reason)
	}
	for _, reason := range []string{ReasonKeyMissing, ReasonKeyWithheld} {
		ParkedEvents.WithLabelValues(reason)
	}
	for _, reason := range []string{HeldStart, HeldGap, HeldRedelivery, HeldUnnumbered, HeldUncovered} {
		HeldTransactions.WithLabelValues(reason)
	}
	for _, result := range []string{"shared", "withheld", "no_olm"} {
		KeyShareDevices.WithLabelValues(result)
	}
	for _, outcome := range []string{"done", "failed", "retry"} {
		DisappearRedactions.WithLabelValues(outcome)
	}
	for _, op := range []string{CommitIntake, CommitRelay} {
		DatabaseCommit.WithLabelValues(op)
	}
}

// SetBuildInfo records the running version.
func SetBuildInfo(version, commit string) {
	buildInfo.Reset()
	buildInfo.WithLabelValues(version, commit, runtime.Version()).Set(1)
}

// commitObservers are DatabaseCommit's series, looked up once: a commit is on the relay path.
var commitObservers = map[string]prometheus.Observer{
	CommitIntake: DatabaseCommit.WithLabelValues(CommitIntake),
	CommitRelay:  DatabaseCommit.WithLabelValues(CommitRelay),
}

// ObserveCommit records a commit of operation (CommitIntake or CommitRelay) that started at start.
func ObserveCommit(operation string, start time.Time) {
	obs, ok := commitObservers[operation]
	if !ok {
		obs = DatabaseCommit.WithLabelValues(operation)
	}
	obs.Observe(time.Since(start).Seconds())
}

// relayedTypes are the event types ferry relays, for the type label; anything else is "other".
var relayedTypes = map[string]bool{
	"m.room.message": true, "m.sticker": true, "m.reaction": true, "m.room.redaction": true,
	"m.call.invite": true, "m.call.candidates": true, "m.call.answer": true, "m.call.hangup": true,
	"m.call.reject": true, "m.call.select_answer": true, "m.call.negotiate": true, "m.call.sdp_stream_metadata_changed": true,
	"m.rtc.notification": true, "org.matrix.msc4075.rtc.notification": true, "m.call.notify": true, "org.matrix.msc4075.call.notify": true,
	"m.poll.start": true, "m.poll.response": true, "m.poll.end": true,
	"org.matrix.msc3381.poll.start": true, "org.matrix.msc3381.poll.response": true, "org.matrix.msc3381.poll.end": true,
}

// EventType is the type label for event type t: t itself for the types ferry relays, "other" otherwise (a
// sender chooses the type, and must not be able to add label values).
func EventType(t string) string {
	if relayedTypes[t] {
		return t
	}
	return "other"
}

// outcomes are the relay outcomes, in relayedCounters' order.
var outcomes = [...]string{OutcomeSent, OutcomeDropped, OutcomeRetry, OutcomeFailed}

// relayedCounters are RelayedEvents' series for every type label and outcome, looked up once: Relayed runs for
// every event and target room.
var relayedCounters = func() map[string]*[len(outcomes)]prometheus.Counter {
	m := make(map[string]*[len(outcomes)]prometheus.Counter, len(relayedTypes)+1)
	for _, t := range append(slices.Collect(maps.Keys(relayedTypes)), "other") {
		var cs [len(outcomes)]prometheus.Counter
		for i, o := range outcomes {
			cs[i] = RelayedEvents.WithLabelValues(t, o)
		}
		m[t] = &cs
	}
	return m
}()

// Relayed counts one event of type t handled in one target room with outcome.
func Relayed(t, outcome string) {
	cs := relayedCounters[EventType(t)]
	for i, o := range outcomes {
		if o == outcome {
			cs[i].Inc()
			return
		}
	}
	RelayedEvents.WithLabelValues(EventType(t), outcome).Inc()
}
