// Command ferry-bench measures ferry's relay hot path (intake, decrypt, translate, encrypt, persist, send).
// It starts a fake homeserver (internal/fakehs) and a real ferry wired as cmd/ferry wires it, on a fresh
// Postgres database, links N room pairs, lets simulated users (mautrix OlmMachines) send Megolm-encrypted
// messages, pushes them to ferry as appservice transactions and waits for each re-encrypted copy at the fake
// homeserver. It reports relayed messages/s, latency inside ferry, allocations, Postgres statements and round
// trips per message, and in the same run references: the crypto floor (raw Megolm decrypt + encrypt), the
// naive path (mautrix's OlmMachine on its SQL store, one message at a time), what a statement costs, and at
// each fixed rate the relay floor (a minimal relay that keeps the same durability promises, relayfloor.go).
// Numbers and their reading live in docs/BENCHMARKS.md. It never asserts a timing; it exits non-zero only when
// the relay lost, doubled or garbled messages.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
)

// Targets from the relay benchmark issue.
const (
	targetMsgsPerSec  = 2000
	targetFloorRatio  = 4
	targetNaiveFactor = 10
	targetP99Ms       = 25
	targetRate        = 500
)

// The established link's runs (-steady-rate): alone, then beside the warm-up for as long as it lasts (at most
// steadyBusyFor).
const (
	steadyAloneFor = 10 * time.Second
	steadyBusyFor  = 5 * time.Minute
)

type settings struct {
	adminURL                  string
	pairs, senders, receivers int
	messages, window, payload int
	duration, rateDuration    time.Duration
	drain                     time.Duration
	rates                     []float64
	sampleEvery               int
	floorMessages, naiveMsgs  int
	dbMaxOpen, dbMaxIdle      int
	phases                    map[string]bool
	cpuProfile, memProfile    string
	warmProfile, rateProfile  string
	floorProfile              string
	warmMutexProfile          string
	encPath                   string
	jsonOut                   string
	keepDB                    bool
	logLevel                  string
	deviceMode                string
	hsLatency                 time.Duration
	steadyRate                float64
	steadyInLink              bool
	warmWaves                 bool
	// the scale runs
	scaleLinks     []int
	scaleGhosts    int
	scalePaths     []string
	idle, idleSkip time.Duration
	ferryBin       string
	ferryLog       string
	ferryLogLevel  string
}

// report is everything one run measured (written with -json).
type report struct {
	Settings map[string]any `json:"settings"`
	Machine  string         `json:"machine"`
	SetupSec float64        `json:"setup_seconds"`
	Warmup   *phaseResult   `json:"warmup,omitempty"`
	// WarmupInUse: with -warm-waves, the second wave of the warm-up (new senders in rooms already in use).
	WarmupInUse *phaseResult   `json:"warmup_rooms_in_use,omitempty"`
	Full        *phaseResult   `json:"full_speed,omitempty"`
	Rates       []*phaseResult `json:"fixed_rate,omitempty"`
	Steady      []*phaseResult `json:"steady,omitempty"`
	Verify      *verifyResult  `json:"verify,omitempty"`
	Floor       *floorResult   `json:"crypto_floor,omitempty"`
	Naive       *naiveResult   `json:"naive_path,omitempty"`
	PG          *pgBaseline    `json:"postgres_baseline,omitempty"`
	// RelayFloor: the durable relay floor at each fixed rate (relayfloor.go).
	RelayFloor []*relayFloorResult `json:"relay_floor,omitempty"`
	Scale      []*scaleResult      `json:"scale,omitempty"`
	Problems   []string            `json:"problems,omitempty"`
}

func main() {
	os.Exit(run(os.Args[1:]))
}

// rateRun names the fixed-rate run at rate msg/s; its messages are told apart by it.
func rateRun(rate float64) string { return fmt.Sprintf("rate%.0f", rate) }

func run(args []string) int {
	fs := flag.NewFlagSet("ferry-bench", flag.ContinueOnError)
	var st settings
	var phases, rates, scaleLinks, scalePaths string
	fs.StringVar(&st.adminURL, "pg", os.Getenv("FERRY_TEST_PG"), "admin URL of a Postgres server (default $FERRY_TEST_PG); a fresh database is created and dropped")
	fs.IntVar(&st.pairs, "pairs", 50, "linked room pairs (A_i → B_i)")
	fs.IntVar(&st.senders, "senders", 2, "sending users per source room")
	fs.IntVar(&st.receivers, "receivers", 1, "receiving users (one device each) per target room")
	fs.IntVar(&st.messages, "messages", 80000, "messages pre-encrypted for the full-speed run (it stops early when they run out)")
	fs.DurationVar(&st.duration, "duration", 20*time.Second, "how long the full-speed run produces messages")
	fs.IntVar(&st.window, "window", 1000, "full speed: messages in flight at most (closed loop)")
	fs.StringVar(&rates, "rate", fmt.Sprint(targetRate), "fixed-rate runs: messages per second offered (open loop), comma-separated")
	fs.DurationVar(&st.rateDuration, "rate-duration", 20*time.Second, "how long each fixed-rate run produces messages")
	fs.DurationVar(&st.drain, "drain", 60*time.Second, "how long to wait for copies still in flight after a run")
	fs.IntVar(&st.payload, "payload", 200, "approximate Megolm plaintext size in bytes")
	fs.IntVar(&st.sampleEvery, "sample", 50, "a receiving client decrypts every n-th copy (0: none)")
	fs.IntVar(&st.floorMessages, "floor-messages", 20000, "messages for the crypto floor")
	fs.IntVar(&st.naiveMsgs, "naive-messages", 500, "messages for the naive path")
	fs.IntVar(&st.dbMaxOpen, "db-max-open", 20, "ferry's database.max_open_conns (ferry's default: 20)")
	fs.IntVar(&st.dbMaxIdle, "db-max-idle", 20, "ferry's database.max_idle_conns (ferry's default: 20)")
	fs.StringVar(&st.encPath, "encryption-path", "sync", "relay runs: ferry's encryption path: sync (logins and /sync, Dendrite's path; cross-signing with UIA and the registration shared secret) or appservice (MSC4190 devices, to-device events and device lists pushed in transactions: Synapse's path)")
	fs.StringVar(&st.deviceMode, "device-mode", "per_ghost", "ferry's encryption.device_mode: per_ghost (ferry's default; the fake homeserver gets a registration shared secret) or single_device")
	fs.StringVar(&phases, "phases", "full,rate,refs", "runs to do, comma-separated: full, rate, refs")
	fs.StringVar(&st.cpuProfile, "cpuprofile", "", "write a CPU profile of the full-speed run to this file")
	fs.StringVar(&st.warmProfile, "warm-cpuprofile", "", "write a CPU profile of the warm-up (every sender's first message) to this file")
	fs.StringVar(&st.warmMutexProfile, "warm-mutexprofile", "", "write a profile of lock contention during the warm-up (with -steady-rate: the established link's traffic beside it) to this file")
	fs.StringVar(&st.rateProfile, "rate-cpuprofile", "", "write a CPU profile of the fixed-rate runs to this file")
	fs.StringVar(&st.floorProfile, "floor-cpuprofile", "", "write a CPU profile of the relay floor's runs (with -phases refs,rate) to this file")
	fs.StringVar(&st.memProfile, "memprofile", "", "write an allocation profile after the full-speed run to this file")
	fs.StringVar(&st.jsonOut, "json", "", "also write the results as JSON to this file")
	fs.BoolVar(&st.keepDB, "keep-db", false, "keep the benchmark database")
	fs.StringVar(&st.logLevel, "log-level", "error", "ferry's log level (logs go to stderr)")
	fs.DurationVar(&st.hsLatency, "hs-latency", 0, "the fake homeserver delays every request by this long")
	fs.BoolVar(&st.steadyInLink, "steady-in-link", false, "with -steady-rate: the established sender speaks in the first link's room, beside its new senders (whose messages come first in the room's order), instead of in a link of its own")
	fs.BoolVar(&st.warmWaves, "warm-waves", false, "relay runs: the warm-up in two waves, each reported: the first sender of every pair (a new sender in a room ferry has not used since it started), then, once those are relayed, the other senders (new senders in rooms in use)")
	fs.Float64Var(&st.steadyRate, "steady-rate", 0, "relay runs: one more, established link carries this many msg/s alone for 10 s, then throughout the warm-up (every other sender's first message); its latencies are reported for both (0: no such link)")
	fs.StringVar(&scaleLinks, "scale", "", "scale runs instead of the relay runs: ferry's binary on a database seeded with this many linked pairs, comma-separated (e.g. 100,1000,10000)")
	fs.IntVar(&st.scaleGhosts, "scale-ghosts", 5, "scale runs: ghosts per linked pair")
	fs.StringVar(&scalePaths, "scale-paths", "sync,appservice", "scale runs: encryption paths, comma-separated: sync (logins and /sync), appservice (MSC4190 devices, pushes in transactions)")
	fs.DurationVar(&st.idle, "idle", 30*time.Second, "scale runs: how long idle CPU is measured")
	fs.DurationVar(&st.idleSkip, "idle-skip", 10*time.Second, "scale runs: time after ready left out of the idle measurement")
	fs.StringVar(&st.ferryBin, "ferry-bin", "bin/ferry", "scale runs: ferry's binary (make build)")
	fs.StringVar(&st.ferryLog, "ferry-log", "", "scale runs: append the binary's JSON log to this file")
	fs.StringVar(&st.ferryLogLevel, "ferry-log-level", "info", "scale runs: the binary's logging.min_level")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	for _, v := range strings.Split(scaleLinks, ",") {
		if v = strings.TrimSpace(v); v == "" {
			continue
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "ferry-bench: -scale: %q is not a positive number\n", v)
			return 2
		}
		st.scaleLinks = append(st.scaleLinks, n)
	}
	for _, v := range strings.Split(scalePaths, ",") {
		switch v = strings.TrimSpace(v); v {
		case "sync", "appservice":
			st.scalePaths = append(st.scalePaths, v)
		case "":
		default:
			fmt.Fprintf(os.Stderr, "ferry-bench: -scale-paths: unknown path %q (sync, appservice)\n", v)
			return 2
		}
	}
	st.phases = map[string]bool{}
	for _, p := range strings.Split(phases, ",") {
		switch p = strings.TrimSpace(p); p {
		case "full", "rate", "refs":
			st.phases[p] = true
		case "":
		default:
			fmt.Fprintf(os.Stderr, "ferry-bench: -phases: unknown run %q (full, rate, refs)\n", p)
			return 2
		}
	}
	for _, r := range strings.Split(rates, ",") {
		if r = strings.TrimSpace(r); r == "" {
			continue
		}
		v, err := strconv.ParseFloat(r, 64)
		if err != nil || v <= 0 {
			fmt.Fprintf(os.Stderr, "ferry-bench: -rate: %q is not a positive number\n", r)
			return 2
		}
		// Each rate's messages are told apart by the run's name (rate100): two rates with one name would
		// count each other's copies.
		if slices.ContainsFunc(st.rates, func(o float64) bool { return rateRun(o) == rateRun(v) }) {
			fmt.Fprintf(os.Stderr, "ferry-bench: -rate: %s msg/s is given twice (rounded to whole messages per second); use -rate-duration for a longer run\n", r)
			return 2
		}
		st.rates = append(st.rates, v)
	}
	if st.deviceMode != "per_ghost" && st.deviceMode != "single_device" {
		fmt.Fprintln(os.Stderr, "ferry-bench: -device-mode must be per_ghost or single_device")
		return 2
	}
	if st.pairs < 1 || st.senders < 1 || st.receivers < 1 {
		fmt.Fprintln(os.Stderr, "ferry-bench: -pairs, -senders and -receivers must be at least 1")
		return 2
	}
	if st.adminURL == "" && (st.phases["full"] || st.phases["rate"] || st.phases["refs"]) {
		fmt.Fprintln(os.Stderr, "ferry-bench: no Postgres: set FERRY_TEST_PG or -pg (scripts/with-postgres.sh starts one)")
		return 2
	}
	level, err := zerolog.ParseLevel(st.logLevel)
	if err != nil {
		level = zerolog.ErrorLevel
	}
	log := zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.RFC3339}).Level(level).With().Timestamp().Logger()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	rep := &report{Settings: map[string]any{
		"pairs": st.pairs, "senders": st.senders, "receivers": st.receivers, "messages": st.messages, "duration": st.duration.String(),
		"window": st.window, "rates": st.rates, "rate_duration": st.rateDuration.String(), "payload": st.payload,
		"db_max_open": st.dbMaxOpen, "db_max_idle": st.dbMaxIdle, "gomaxprocs": runtime.GOMAXPROCS(0), "device_mode": st.deviceMode,
	}, Machine: machineDescription()}
	fmt.Printf("ferry-bench: %s\n", rep.Machine)
	fmt.Printf("ferry-bench: %d pairs × %d senders → %d receivers each, payload ~%d B, Postgres pool %d open / %d idle, device mode %s\n",
		st.pairs, st.senders, st.receivers, st.payload, st.dbMaxOpen, st.dbMaxIdle, st.deviceMode)

	code := 0
	if len(st.scaleLinks) > 0 {
		st.phases = map[string]bool{}
		code = scaleRuns(ctx, st, log, rep)
	}
	// The references run first, on a quiet machine (the relay runs leave Postgres busy for a while).
	if st.phases["refs"] {
		if err := references(ctx, st, rep); err != nil {
			fmt.Fprintf(os.Stderr, "ferry-bench: references: %v\n", err)
			code = 1
		}
	}
	if (st.phases["full"] || st.phases["rate"]) && ctx.Err() == nil {
		if c := relayRuns(ctx, st, log, rep); c != 0 {
			code = c
		}
	}
	summary(rep)
	if st.jsonOut != "" {
		data, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(st.jsonOut, append(data, '\n'), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "ferry-bench: %v\n", err)
			code = 1
		}
	}
	if len(rep.Problems) > 0 && code == 0 {
		code = 1
	}
	return code
}

func relayRuns(ctx context.Context, st settings, log zerolog.Logger, rep *report) int {
	setupStart := time.Now()
	e, err := newEnv(ctx, st, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-bench: setup: %v\n", err)
		return 1
	}
	defer e.close()
	perSlot := st.pairs * st.senders
	warm, err := e.generate(ctx, "warmup", perSlot)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-bench: %v\n", err)
		return 1
	}
	var full []*msg
	var fixed [][]*msg
	if st.phases["full"] {
		if full, err = e.generate(ctx, "full", st.messages); err != nil {
			fmt.Fprintf(os.Stderr, "ferry-bench: %v\n", err)
			return 1
		}
	}
	all := append(append([]*msg(nil), warm...), full...)
	if st.phases["rate"] {
		for _, rate := range st.rates {
			msgs, err := e.generate(ctx, rateRun(rate), max(int(rate*st.rateDuration.Seconds()), 1))
			if err != nil {
				fmt.Fprintf(os.Stderr, "ferry-bench: %v\n", err)
				return 1
			}
			fixed = append(fixed, msgs)
			all = append(all, msgs...)
		}
	}
	var steadyWarm, steadyAlone, steadyBusy []*msg
	if st.steadyRate > 0 {
		one := []*pair{e.steady}
		if steadyWarm, err = e.generateOn(ctx, "steady-warmup", st.senders, one); err == nil {
			if steadyAlone, err = e.generateOn(ctx, "steady-alone", max(int(st.steadyRate*steadyAloneFor.Seconds()), 1), one); err == nil {
				steadyBusy, err = e.generateOn(ctx, "steady-busy", max(int(st.steadyRate*steadyBusyFor.Seconds()), 1), one)
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "ferry-bench: %v\n", err)
			return 1
		}
		all = append(append(append(all, steadyWarm...), steadyAlone...), steadyBusy...)
	}
	if err = e.waitForSessions(ctx, 2*time.Minute); err != nil {
		fmt.Fprintf(os.Stderr, "ferry-bench: %v\n", err)
		return 1
	}
	rep.SetupSec = time.Since(setupStart).Seconds()
	fmt.Printf("ferry-bench: setup (users, rooms, links, %d room keys imported by ferry, %d messages pre-encrypted) took %.1f s\n",
		e.sessionsReceived.Load(), len(all), rep.SetupSec)

	// The established link: its senders' first messages, then its rate alone, as the reference for its rate
	// beside the warm-up.
	if st.steadyRate > 0 {
		fmt.Printf("ferry-bench: the established link: %s → %s\n", e.steady.a, e.steady.b)
		before := e.snapshot()
		n, start, end := e.run(ctx, steadyWarm[0].phase, 0, 0, time.Hour, st.drain)
		_ = e.result(steadyWarm[0].phase, "", n, start, end, before, e.snapshot())
		before = e.snapshot()
		e.timed.watched.Load().collect(true)
		n, start, end = e.run(ctx, steadyAlone[0].phase, st.steadyRate, 0, steadyAloneFor, st.drain)
		r := e.result(steadyAlone[0].phase, fmt.Sprintf("the established link alone, %.0f msg/s", st.steadyRate), n, start, end, before, e.snapshot())
		r.watch(e.timed.watched.Load().collect(false))
		rep.Steady = append(rep.Steady, &r)
		printSteady(os.Stdout, r)
	}

	// Warm-up: the first message of every sender brings its ghost into the target room and makes ferry share
	// its room key there; these one-off costs are reported apart.
	var steadyDone chan phaseResult
	if st.steadyRate > 0 {
		ph := steadyBusy[0].phase
		ph.background = true
		steadyDone = make(chan phaseResult, 1)
		e.timed.watched.Load().collect(true)
		go func() {
			before := e.snapshot()
			n, start, end := e.run(ctx, ph, st.steadyRate, 0, steadyBusyFor, st.drain)
			r := e.result(ph, fmt.Sprintf("the established link, %.0f msg/s, while the warm-up's new senders speak", st.steadyRate), n, start, end, before, e.snapshot())
			r.watch(e.timed.watched.Load().collect(false))
			steadyDone <- r
		}()
	}
	// With -warm-waves, the senders after each pair's first speak in rooms ferry has used already (in a second
	// phase, after the first wave was relayed).
	waves := [][]*msg{warm}
	if st.warmWaves && st.senders > 1 {
		second := &phaseState{name: "warmup-rooms-in-use", msgs: warm[st.pairs:]}
		for _, m := range second.msgs {
			m.phase = second
		}
		warm[0].phase.msgs = warm[:st.pairs]
		waves = [][]*msg{warm[:st.pairs], warm[st.pairs:]}
	}
	stopWarmProfile := startCPUProfile(st.warmProfile)
	stopMutexProfile := startMutexProfile(st.warmMutexProfile)
	for i, wave := range waves {
		if ctx.Err() != nil {
			break
		}
		before := e.snapshot()
		n, start, end := e.run(ctx, wave[0].phase, 0, 0, time.Hour, st.drain)
		mode := "first message of every sender (ghost registration, join, profile, room key share)"
		switch {
		case len(waves) > 1 && i == 0:
			mode = "first message of each pair's first sender (a new sender in a room ferry has not used since it started)"
		case i == 1:
			mode = "first message of every other sender (a new sender in a room in use)"
		}
		if steadyDone != nil {
			mode += fmt.Sprintf("; CPU and statement figures include the established link's %.0f msg/s", st.steadyRate)
		}
		res := e.result(wave[0].phase, mode, n, start, end, before, e.snapshot())
		if i == 0 {
			rep.Warmup = &res
		} else {
			rep.WarmupInUse = &res
		}
		printPhase(os.Stdout, res)
	}
	stopWarmProfile()
	stopMutexProfile()
	if steadyDone != nil {
		steadyBusy[0].phase.stop.Store(true)
		r := <-steadyDone
		rep.Steady = append(rep.Steady, &r)
		printSteady(os.Stdout, r)
	}

	if len(full) > 0 && ctx.Err() == nil {
		stopProfile := startCPUProfile(st.cpuProfile)
		before := e.snapshot()
		n, start, end := e.run(ctx, full[0].phase, 0, st.window, st.duration, st.drain)
		after := e.snapshot()
		stopProfile()
		writeMemProfile(st.memProfile)
		mode := fmt.Sprintf("full speed, closed loop, at most %d in flight", st.window)
		r := e.result(full[0].phase, mode, n, start, end, before, after)
		if n == len(full) {
			mode += fmt.Sprintf(" (all %d pre-encrypted messages used: raise -messages for a longer run)", n)
			r.Mode = mode
		}
		rep.Full = &r
		printPhase(os.Stdout, r)
	}
	stopRateProfile := startCPUProfile(st.rateProfile)
	for i, msgs := range fixed {
		if ctx.Err() != nil {
			break
		}
		rate := st.rates[i]
		before := e.snapshot()
		n, start, end := e.run(ctx, msgs[0].phase, rate, 0, st.rateDuration, st.drain)
		r := e.result(msgs[0].phase, fmt.Sprintf("fixed rate, open loop, %.0f msg/s offered for %s", rate, st.rateDuration), n, start, end, before, e.snapshot())
		r.Offered = rate
		rep.Rates = append(rep.Rates, &r)
		printPhase(os.Stdout, r)
	}
	stopRateProfile()
	v := e.verify(ctx, all)
	rep.Verify = &v
	fmt.Printf("\n== correctness ==\n  receivers decrypted %d of %d sampled copies (%d failed, %d wrong body); trust levels seen: %v\n",
		v.Decrypted, v.Sampled, v.Failed, v.WrongBody, v.Trust)
	fmt.Printf("  one-time key claims the homeserver could not serve (a device out of keys, no fallback key): %d\n", e.hs.ClaimMisses())
	fmt.Printf("  duplicate copies %d, unencrypted copies %d, other events ferry sent: %v, echoes ferry received back: %d\n",
		e.duplicates.Load(), e.plaintextCopies.Load(), e.otherSendsCopy(), e.echoes.Load())
	for _, ph := range append(append([]*phaseResult{rep.Warmup, rep.WarmupInUse, rep.Full}, rep.Rates...), rep.Steady...) {
		if ph != nil && (ph.Missing > 0 || ph.Duplicates > 0) {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%s: %d missing, %d duplicate copies", ph.Name, ph.Missing, ph.Duplicates))
		}
	}
	if v.Failed > 0 || v.WrongBody > 0 || v.Decrypted == 0 && v.Sampled > 0 {
		rep.Problems = append(rep.Problems, fmt.Sprintf("receivers could not decrypt %d sampled copies (%d wrong body)", v.Failed, v.WrongBody))
	}
	if e.plaintextCopies.Load() > 0 {
		rep.Problems = append(rep.Problems, fmt.Sprintf("%d copies were sent unencrypted into encrypted rooms", e.plaintextCopies.Load()))
	}
	return 0
}

func (e *env) otherSendsCopy() map[string]int64 {
	e.otherMu.Lock()
	defer e.otherMu.Unlock()
	out := make(map[string]int64, len(e.otherSends))
	for k, v := range e.otherSends {
		out[k] = v
	}
	return out
}

// verifyResult says whether real receiving clients can read what ferry relayed.
type verifyResult struct {
	Sampled   int            `json:"sampled"`
	Decrypted int            `json:"decrypted"`
	Failed    int            `json:"failed"`
	WrongBody int            `json:"wrong_body"`
	Trust     map[string]int `json:"trust_levels"`
	Errors    []string       `json:"errors,omitempty"`
}

// verify lets the receivers take ferry's room keys and decrypt the sampled copies.
func (e *env) verify(ctx context.Context, msgs []*msg) verifyResult {
	v := verifyResult{Trust: map[string]int{}}
	pairs := e.pairs
	if e.steady != nil {
		pairs = append(pairs[:len(pairs):len(pairs)], e.steady)
	}
	for _, p := range pairs {
		for _, r := range p.receivers {
			r.ReceiveToDevice(ctx)
		}
	}
	for _, m := range msgs {
		if !m.sample || m.arrived.Load() == 0 {
			continue
		}
		v.Sampled++
		evt := &event.Event{ID: m.copyID, RoomID: m.pair.b, Sender: e.br.Ghosts.Ghost(m.sender.ID), Type: event.EventEncrypted, Timestamp: m.arrived.Load() / 1e6}
		evt.Content.VeryRaw = m.copyContent
		if err := evt.Content.ParseRaw(event.EventEncrypted); err != nil {
			v.Failed++
			continue
		}
		dec, err := m.pair.receivers[0].Decrypt(ctx, evt)
		if err != nil {
			v.Failed++
			if len(v.Errors) < 5 {
				v.Errors = append(v.Errors, err.Error())
			}
			continue
		}
		if msg := dec.Content.AsMessage(); msg == nil || msg.Body != m.body {
			v.WrongBody++
			continue
		}
		v.Decrypted++
		v.Trust[dec.Mautrix.TrustState.String()]++
	}
	return v
}

func references(ctx context.Context, st settings, rep *report) error {
	fmt.Printf("\n== references ==\n")
	// First: the references after it leave Postgres backends and garbage behind.
	if err := relayFloors(ctx, st, rep); err != nil {
		return err
	}
	floor, err := cryptoFloor(st.floorMessages, megolmPlaintext(st.payload))
	if err != nil {
		return fmt.Errorf("crypto floor: %w", err)
	}
	rep.Floor = &floor
	fmt.Printf("  crypto floor      %.1f µs/msg (Megolm decrypt %.1f + encrypt %.1f, %d B plaintext; Ed25519 sign %.1f, verify %.1f)\n",
		floor.PerMsgUs, floor.DecryptUs, floor.EncryptUs, floor.PlaintextLen, floor.Ed25519SignUs, floor.Ed25519VerUs)
	naive, err := naivePath(ctx, st, st.naiveMsgs)
	if err != nil {
		return fmt.Errorf("naive path: %w", err)
	}
	rep.Naive = &naive
	fmt.Printf("  naive path        %.2f ms/msg (OlmMachine decrypt + encrypt on SQLCryptoStore, one at a time)\n", naive.PerMsgMs)
	fmt.Printf("                    %.1f statements, %.1f commits, %.1f round trips, %.0f µs waiting for Postgres; CPU %.0f µs here + %.0f µs Postgres (%.0f µs machine-wide); %.0f allocs\n",
		naive.StmtsPerMsg, naive.CommitsMsg, naive.TripsPerMsg, naive.WaitPerMsg, naive.CPUPerMsgUs, naive.PGCPUPerMsg, naive.MachPerMsg, naive.AllocsMsg)
	for _, q := range naive.Top {
		fmt.Printf("    %6.2f  %s\n", float64(q.Count)/float64(naive.Messages), q.Query)
	}
	pg, err := postgresBaseline(ctx, st)
	if err != nil {
		return fmt.Errorf("postgres baseline: %w", err)
	}
	rep.PG = &pg
	fmt.Printf("  Postgres          SELECT $1: %.0f µs, %.1f round trips (CPU %.0f µs Postgres + %.0f µs here); autocommit 1-row INSERT: %.0f µs (CPU %.0f + %.0f); %d-row INSERT: %.1f µs/row (Postgres CPU %.1f µs/row)\n",
		pg.SelectUs, pg.SelectTrips, pg.SelectPGCPUUs, pg.SelectProcCPU, pg.InsertUs, pg.InsertPGCPUUs, pg.InsertProcCPU, pg.BatchRowsPerTx, pg.BatchRowUs, pg.BatchRowPGCPU)
	return nil
}

// relayFloors runs the relay floor at each fixed rate of the relay runs.
func relayFloors(ctx context.Context, st settings, rep *report) error {
	if !st.phases["rate"] {
		return nil
	}
	defer startCPUProfile(st.floorProfile)()
	for _, rate := range st.rates {
		if ctx.Err() != nil {
			break
		}
		rf, err := relayFloor(ctx, st, rate, st.rateDuration)
		if err != nil {
			return fmt.Errorf("relay floor at %.0f msg/s: %w", rate, err)
		}
		rep.RelayFloor = append(rep.RelayFloor, &rf)
		fmt.Printf("  relay floor       %.0f msg/s for %s: CPU %.0f µs/msg this process (relay + its fake homeserver) + %.0f µs Postgres (machine-wide %.0f µs); %.1f statements, %.1f commits; CPU steal %.1f%%\n",
			rate, st.rateDuration, rf.ProcPerMsg, rf.PGCPUPerMsg, rf.MachPerMsg, rf.StmtsPerMsg, rf.CommitsMsg, rf.StealPct)
		fmt.Printf("                    (record before answering, decrypt, encrypt, send, record done: raw Megolm, one table, nothing else)\n")
	}
	return nil
}

// summary compares the results with the targets.
func summary(rep *report) {
	fmt.Printf("\n== targets ==\n")
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	if rep.Full != nil {
		fmt.Printf("  ≥ %d relayed msg/s sustained: %.0f msg/s — %s\n", targetMsgsPerSec, rep.Full.MsgsPerSec, verdict(rep.Full.MsgsPerSec >= targetMsgsPerSec))
		if rep.Full.MsgsPerSec > 0 {
			wallUs := 1e6 / rep.Full.MsgsPerSec
			if rep.Floor != nil {
				ratio := wallUs / rep.Floor.PerMsgUs
				fmt.Printf("  per-message cost ≤ %dx crypto floor: %.0f µs (wall, 1/throughput) = %.1fx floor (%.0f µs); machine CPU %.0f µs = %.1fx — %s\n",
					targetFloorRatio, wallUs, ratio, rep.Floor.PerMsgUs, rep.Full.MachCPUPerMsg, rep.Full.MachCPUPerMsg/rep.Floor.PerMsgUs, verdict(ratio <= targetFloorRatio))
			}
			if rep.Naive != nil {
				factor := rep.Naive.PerMsgMs * 1e3 / wallUs
				fmt.Printf("  ≥ %dx better than the naive path: naive %.2f ms/msg vs ferry %.0f µs = %.1fx — %s\n",
					targetNaiveFactor, rep.Naive.PerMsgMs, wallUs, factor, verdict(factor >= targetNaiveFactor))
			}
		}
	}
	for _, r := range rep.Rates {
		met := r.Latency.P99 <= targetP99Ms && r.Missing == 0 && r.MsgsPerSec >= 0.95*r.Offered
		label := "(reference rate)"
		if r.Offered == targetRate {
			label = verdict(met)
		}
		fmt.Printf("  p99 in ferry ≤ %d ms at %.0f msg/s offered: p99 %.1f ms, relayed %.0f msg/s — %s\n",
			targetP99Ms, r.Offered, r.Latency.P99, r.MsgsPerSec, label)
		// Process and Postgres CPU, not the machine's: /proc/stat samples busy time at the clock tick and misses
		// part of the short bursts of a low rate (at 100 msg/s it reads below the two added up), while a process's
		// CPU time is exact. Both sides include their fake homeserver.
		for _, f := range rep.RelayFloor {
			if ferry, floor := r.ProcCPUPerMsg+r.PGCPUPerMsg, f.ProcPerMsg+f.PGCPUPerMsg; f.Offered == r.Offered && floor > 0 {
				fmt.Printf("  CPU per message at %.0f msg/s (process + Postgres): ferry %.0f µs, the relay floor %.0f µs in the same run (%.2fx)\n",
					r.Offered, ferry, floor, ferry/floor)
			}
		}
	}
	for _, p := range rep.Problems {
		fmt.Printf("  PROBLEM: %s\n", p)
	}
}

func startCPUProfile(path string) func() {
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-bench: cpuprofile: %v\n", err)
		return func() {}
	}
	if err = pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(os.Stderr, "ferry-bench: cpuprofile: %v\n", err)
		_ = f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}
}

// startMutexProfile records every contended lock until the returned function writes the profile to path.
func startMutexProfile(path string) func() {
	if path == "" {
		return func() {}
	}
	runtime.SetMutexProfileFraction(1)
	return func() {
		runtime.SetMutexProfileFraction(0)
		writeProfile("mutex", path)
	}
}

func writeMemProfile(path string) {
	if path != "" {
		writeProfile("allocs", path)
	}
}

// writeProfile writes the runtime profile of that name to path.
func writeProfile(name, path string) {
	f, err := os.Create(path)
	if err == nil {
		err = pprof.Lookup(name).WriteTo(f, 0)
		_ = f.Close()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-bench: %s profile: %v\n", name, err)
	}
}

// machineDescription names the CPU, core count, Go version and Postgres (for docs/BENCHMARKS.md).
func machineDescription() string {
	model := "unknown CPU"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	return fmt.Sprintf("%s, %d CPUs, %s %s/%s", model, runtime.NumCPU(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
