package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// snapshot is every counter the benchmark reads, at one instant.
type snapshot struct {
	at                   time.Time
	mallocs, allocBytes  uint64
	numGC                uint32
	gcPause              time.Duration
	procCPU              time.Duration
	pgCPU                time.Duration // the throwaway cluster (clusterCPU), else every postgres process on the machine
	poolWaits            int64
	poolWait             time.Duration
	poolIdleClosed       int64
	machBusy, machTotal  uint64 // /proc/stat jiffies
	machSteal            uint64
	pg                   pgSnapshot
	hs                   map[string]int64
	decrypts, decryptNs  int64
	encrypts, encryptNs  int64
	httpReqs, httpNs     int64
	httpNewConns         int64
	sessions, duplicates int64
}

func (e *env) snapshot() snapshot {
	s := baseSnapshot()
	if e != nil {
		s.hs = e.hs.Counts()
		s.decrypts, s.decryptNs = e.timed.decrypts.Load(), e.timed.decryptNanos.Load()
		s.encrypts, s.encryptNs = e.timed.encrypts.Load(), e.timed.encryptNanos.Load()
		s.httpReqs, s.httpNs, s.httpNewConns = e.http.requests.Load(), e.http.nanos.Load(), e.http.newConns.Load()
		s.sessions, s.duplicates = e.sessionsReceived.Load(), e.duplicates.Load()
		ps := e.root.RawDB.Stats()
		s.poolWaits, s.poolWait, s.poolIdleClosed = ps.WaitCount, ps.WaitDuration, ps.MaxIdleClosed+ps.MaxIdleTimeClosed+ps.MaxLifetimeClosed
	}
	return s
}

func baseSnapshot() snapshot {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	s := snapshot{at: time.Now(), mallocs: ms.Mallocs, allocBytes: ms.TotalAlloc, numGC: ms.NumGC, gcPause: time.Duration(ms.PauseTotalNs)}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		s.procCPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	s.machBusy, s.machTotal, s.machSteal = machineJiffies()
	s.pgCPU = clusterCPU()
	s.pg = pgCounters.snapshot()
	return s
}

// machineJiffies reads the machine's busy, total and stolen CPU time from /proc/stat (zeros when
// unavailable). Steal is time the hypervisor gave to other guests: a noisy neighbour.
func machineJiffies() (busy, total, steal uint64) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0, 0
	}
	defer f.Close()
	line, err := bufio.NewReader(f).ReadString('\n')
	if err != nil {
		return 0, 0, 0
	}
	fields := strings.Fields(line)
	if len(fields) < 9 || fields[0] != "cpu" {
		return 0, 0, 0
	}
	var vals []uint64
	for _, f := range fields[1:9] { // user nice system idle iowait irq softirq steal
		v, _ := strconv.ParseUint(f, 10, 64)
		vals = append(vals, v)
	}
	for _, v := range vals[:7] {
		total += v
	}
	return total - vals[3] - vals[4], total + vals[7], vals[7]
}

// postgresCPU sums the CPU time of every process named postgres (backends, background workers, and through
// the postmaster's children counters, backends that exited). Zero when /proc is unreadable.
func postgresCPU() time.Duration {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	var ticks uint64
	for _, ent := range entries {
		if ent.Name()[0] < '0' || ent.Name()[0] > '9' {
			continue
		}
		data, err := os.ReadFile("/proc/" + ent.Name() + "/stat")
		if err != nil {
			continue
		}
		open, closing := strings.IndexByte(string(data), '('), strings.LastIndexByte(string(data), ')')
		if open < 0 || closing < open || string(data[open+1:closing]) != "postgres" {
			continue
		}
		// Fields after the command: state(3) ... utime(14) stime(15) cutime(16) cstime(17), counted from 1.
		fields := strings.Fields(string(data[closing+1:]))
		if len(fields) < 15 {
			continue
		}
		for _, f := range fields[11:15] {
			v, _ := strconv.ParseUint(f, 10, 64)
			ticks += v
		}
	}
	return time.Duration(ticks) * time.Second / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc/stat (100 on every Linux this runs on).
const clockTicks = 100

// phaseResult is what one measured run reports.
type phaseResult struct {
	Name       string      `json:"name"`
	Mode       string      `json:"mode"`
	Offered    float64     `json:"offered_msgs_per_sec,omitempty"`
	Produced   int         `json:"produced"`
	Relayed    int         `json:"relayed"`
	Missing    int         `json:"missing"`
	Duplicates int64       `json:"duplicates"`
	Seconds    float64     `json:"seconds"`
	MsgsPerSec float64     `json:"msgs_per_sec"`
	Latency    percentiles `json:"latency_in_ferry_ms"`
	EndToEnd   percentiles `json:"latency_enqueue_to_copy_ms"`
	Intake     percentiles `json:"intake_txn_ms"`
	// the steady link's runs: ferry's decryptions of its messages and encryptions of their copies
	WatchedDecrypt   *percentiles     `json:"watched_decrypt_ms,omitempty"`
	WatchedEncrypt   *percentiles     `json:"watched_encrypt_ms,omitempty"`
	WatchedSend      *percentiles     `json:"watched_send_ms,omitempty"`
	Transactions     int              `json:"transactions"`
	ProcCPUPerMsg    float64          `json:"process_cpu_us_per_msg"`
	MachCPUPerMsg    float64          `json:"machine_cpu_us_per_msg"`
	MachCoresBusy    float64          `json:"machine_cores_busy"`
	ProcCoresBusy    float64          `json:"process_cores_busy"`
	StealPct         float64          `json:"cpu_steal_percent"`
	PGCPUPerMsg      float64          `json:"postgres_cpu_us_per_msg"`
	PGCoresBusy      float64          `json:"postgres_cores_busy"`
	PGCommitsPerMsg  float64          `json:"pg_commits_per_msg"`
	PoolWaits        int64            `json:"pool_waits"`
	PoolWaitPerMsg   float64          `json:"pool_wait_us_per_msg"`
	PoolIdleClosed   int64            `json:"pool_idle_closed"`
	AllocsPerMsg     float64          `json:"allocs_per_msg"`
	BytesPerMsg      float64          `json:"bytes_per_msg"`
	GCs              uint32           `json:"gcs"`
	GCPause          float64          `json:"gc_pause_ms"`
	PGStmtsPerMsg    float64          `json:"pg_statements_per_msg"`
	PGTripsPerMsg    float64          `json:"pg_round_trips_per_msg"`
	PGWaitPerMsg     float64          `json:"pg_wait_us_per_msg"`
	PGDials          int64            `json:"pg_connections_opened"`
	PGTop            []queryCount     `json:"pg_top_statements"`
	HSRequests       map[string]int64 `json:"homeserver_requests"`
	HTTPPerMsg       float64          `json:"ferry_http_requests_per_msg"`
	HTTPWaitPerMsg   float64          `json:"ferry_http_wait_us_per_msg"`
	HTTPNewConns     int64            `json:"ferry_http_new_connections"`
	DecryptAvg       float64          `json:"decrypt_avg_us"`
	EncryptAvg       float64          `json:"encrypt_avg_us"`
	DecryptsPerMsg   float64          `json:"decrypts_per_msg"`
	EncryptsPerMsg   float64          `json:"encrypts_per_msg"`
	SessionsImported int64            `json:"room_keys_imported"`
}

type percentiles struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
	N   int     `json:"n"`
}

func percentilesOf(ds []time.Duration) percentiles {
	if len(ds) == 0 {
		return percentiles{}
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	at := func(q float64) float64 {
		i := int(q*float64(len(ds)) + 0.5)
		i = min(max(i-1, 0), len(ds)-1)
		return ms(ds[i])
	}
	return percentiles{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: ms(ds[len(ds)-1]), N: len(ds)}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func perMsg(v float64, n int) float64 {
	if n == 0 {
		return 0
	}
	return v / float64(n)
}

// cpuFigures is the CPU a run spent per message, from the snapshots around it: this process, the Postgres
// cluster and the whole machine (µs), and the share of the machine's time the hypervisor gave to others.
type cpuFigures struct{ proc, pg, mach, stealPct float64 }

// cpuBetween is the CPU spent per message over n messages between two snapshots.
func cpuBetween(before, after snapshot, n int) cpuFigures {
	c := cpuFigures{
		proc: perMsg(float64((after.procCPU - before.procCPU).Microseconds()), n),
		pg:   perMsg(float64((after.pgCPU - before.pgCPU).Microseconds()), n),
		mach: perMsg(float64(after.machBusy-before.machBusy)/clockTicks*1e6, n),
	}
	if total := after.machTotal - before.machTotal; total > 0 {
		c.stealPct = float64(after.machSteal-before.machSteal) / float64(total) * 100
	}
	return c
}

// result turns a finished run and the counters around it into a phaseResult.
func (e *env) result(ph *phaseState, mode string, produced int, start, end time.Time, before, after snapshot) phaseResult {
	r := phaseResult{Name: ph.name, Mode: mode, Produced: produced}
	var inFerry, e2e []time.Duration
	for _, m := range ph.msgs[:produced] {
		at := m.arrived.Load()
		if at == 0 {
			r.Missing++
			continue
		}
		r.Relayed++
		arrived := time.Unix(0, at)
		if acked := m.acked.Load(); acked != 0 {
			inFerry = append(inFerry, max(arrived.Sub(time.Unix(0, acked)), 0))
		}
		e2e = append(e2e, arrived.Sub(m.enqueued))
	}
	r.Duplicates = after.duplicates - before.duplicates
	r.Seconds = end.Sub(start).Seconds()
	if r.Seconds > 0 {
		r.MsgsPerSec = float64(r.Relayed) / r.Seconds
	}
	r.Latency, r.EndToEnd = percentilesOf(inFerry), percentilesOf(e2e)
	ph.mu.Lock()
	r.Intake, r.Transactions = percentilesOf(ph.txns), ph.txnN
	ph.mu.Unlock()
	n := r.Relayed
	wall := after.at.Sub(before.at).Seconds()
	procCPU := after.procCPU - before.procCPU
	pgCPU := after.pgCPU - before.pgCPU
	cpu := cpuBetween(before, after, n)
	r.ProcCPUPerMsg, r.PGCPUPerMsg, r.MachCPUPerMsg, r.StealPct = cpu.proc, cpu.pg, cpu.mach, cpu.stealPct
	if total := after.machTotal - before.machTotal; total > 0 {
		r.MachCoresBusy = float64(after.machBusy-before.machBusy) / float64(total) * float64(runtime.NumCPU())
	}
	if wall > 0 {
		r.ProcCoresBusy = procCPU.Seconds() / wall
		r.PGCoresBusy = pgCPU.Seconds() / wall
	}
	r.PoolWaits = after.poolWaits - before.poolWaits
	r.PoolWaitPerMsg = perMsg(float64((after.poolWait - before.poolWait).Microseconds()), n)
	r.PoolIdleClosed = after.poolIdleClosed - before.poolIdleClosed
	r.AllocsPerMsg = perMsg(float64(after.mallocs-before.mallocs), n)
	r.BytesPerMsg = perMsg(float64(after.allocBytes-before.allocBytes), n)
	r.GCs = after.numGC - before.numGC
	r.GCPause = ms(after.gcPause - before.gcPause)
	pg := after.pg.sub(before.pg)
	r.PGStmtsPerMsg = perMsg(float64(pg.Statements), n)
	r.PGTripsPerMsg = perMsg(float64(pg.RoundTrips), n)
	r.PGWaitPerMsg = perMsg(float64(pg.Wait.Microseconds()), n)
	r.PGDials = pg.Dials
	r.PGCommitsPerMsg = perMsg(float64(pg.Commits), n)
	r.PGTop = pg.top(40)
	r.HSRequests = map[string]int64{}
	for k, v := range after.hs {
		if d := v - before.hs[k]; d > 0 {
			r.HSRequests[k] = d
		}
	}
	r.HTTPPerMsg = perMsg(float64(after.httpReqs-before.httpReqs), n)
	r.HTTPWaitPerMsg = perMsg(float64(after.httpNs-before.httpNs)/1e3, n)
	r.HTTPNewConns = after.httpNewConns - before.httpNewConns
	if d := after.decrypts - before.decrypts; d > 0 {
		r.DecryptAvg = float64(after.decryptNs-before.decryptNs) / float64(d) / 1e3
		r.DecryptsPerMsg = perMsg(float64(d), n)
	}
	if d := after.encrypts - before.encrypts; d > 0 {
		r.EncryptAvg = float64(after.encryptNs-before.encryptNs) / float64(d) / 1e3
		r.EncryptsPerMsg = perMsg(float64(d), n)
	}
	r.SessionsImported = after.sessions - before.sessions
	return r
}

func (r *phaseResult) watch(dec, enc, send []time.Duration) {
	d, e, s := percentilesOf(dec), percentilesOf(enc), percentilesOf(send)
	r.WatchedDecrypt, r.WatchedEncrypt, r.WatchedSend = &d, &e, &s
}

// printSteady prints what a member of the established link notices: whether every message crossed, and how
// long each took.
func printSteady(w io.Writer, r phaseResult) {
	fmt.Fprintf(w, "\n== %s: %s ==\n", r.Name, r.Mode)
	fmt.Fprintf(w, "  relayed           %d of %d (missing %d, duplicate copies %d) in %.2f s\n", r.Relayed, r.Produced, r.Missing, r.Duplicates, r.Seconds)
	fmt.Fprintf(w, "  in ferry (ms)     p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (transaction 200 → copy at homeserver)\n", r.Latency.P50, r.Latency.P90, r.Latency.P99, r.Latency.Max)
	fmt.Fprintf(w, "  end to end (ms)   p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (queued at homeserver → copy)\n", r.EndToEnd.P50, r.EndToEnd.P90, r.EndToEnd.P99, r.EndToEnd.Max)
	if d, e := r.WatchedDecrypt, r.WatchedEncrypt; d != nil && e != nil {
		fmt.Fprintf(w, "  decrypt (ms)      p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (ferry's decryption of each message)\n", d.P50, d.P90, d.P99, d.Max)
		fmt.Fprintf(w, "  encrypt (ms)      p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (ferry's encryption of each copy)\n", e.P50, e.P90, e.P99, e.Max)
		if s := r.WatchedSend; s != nil {
			fmt.Fprintf(w, "  send (ms)         p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (ferry's PUT of each copy, %d requests)\n", s.P50, s.P90, s.P99, s.Max, s.N)
		}
	}
}

func printPhase(w io.Writer, r phaseResult) {
	fmt.Fprintf(w, "\n== %s: %s ==\n", r.Name, r.Mode)
	fmt.Fprintf(w, "  relayed           %d of %d (missing %d, duplicate copies %d) in %.2f s\n", r.Relayed, r.Produced, r.Missing, r.Duplicates, r.Seconds)
	fmt.Fprintf(w, "  throughput        %.0f msg/s\n", r.MsgsPerSec)
	fmt.Fprintf(w, "  in ferry (ms)     p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (transaction 200 → copy at homeserver)\n", r.Latency.P50, r.Latency.P90, r.Latency.P99, r.Latency.Max)
	fmt.Fprintf(w, "  end to end (ms)   p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (queued at homeserver → copy)\n", r.EndToEnd.P50, r.EndToEnd.P90, r.EndToEnd.P99, r.EndToEnd.Max)
	fmt.Fprintf(w, "  intake (ms)       p50 %.2f  p90 %.2f  p99 %.2f  max %.2f   (%d transactions, PUT → 200, echoes included)\n", r.Intake.P50, r.Intake.P90, r.Intake.P99, r.Intake.Max, r.Transactions)
	fmt.Fprintf(w, "  CPU / msg         %.0f µs whole machine = %.0f µs this process (ferry + fake homeserver) + %.0f µs Postgres + %.0f µs other\n",
		r.MachCPUPerMsg, r.ProcCPUPerMsg, r.PGCPUPerMsg, max(r.MachCPUPerMsg-r.ProcCPUPerMsg-r.PGCPUPerMsg, 0))
	fmt.Fprintf(w, "  cores busy        %.2f of %d (this process %.2f, Postgres %.2f); CPU steal %.1f%%\n", r.MachCoresBusy, runtime.NumCPU(), r.ProcCoresBusy, r.PGCoresBusy, r.StealPct)
	fmt.Fprintf(w, "  memory / msg      %.0f allocs, %.1f KiB (process-wide, fake homeserver included); %d GCs, %.1f ms pause\n", r.AllocsPerMsg, r.BytesPerMsg/1024, r.GCs, r.GCPause)
	fmt.Fprintf(w, "  Postgres / msg    %.1f statements, %.1f round trips, %.1f commits, %.0f µs waiting on the wire\n", r.PGStmtsPerMsg, r.PGTripsPerMsg, r.PGCommitsPerMsg, r.PGWaitPerMsg)
	fmt.Fprintf(w, "  Postgres pool     %d connections opened, %d closed as idle surplus, %d waits for a free connection (%.0f µs/msg)\n", r.PGDials, r.PoolIdleClosed, r.PoolWaits, r.PoolWaitPerMsg)
	fmt.Fprintf(w, "  crypto            decrypt %.0f µs avg (%.2f/msg), encrypt %.0f µs avg (%.2f/msg), %d room keys imported\n", r.DecryptAvg, r.DecryptsPerMsg, r.EncryptAvg, r.EncryptsPerMsg, r.SessionsImported)
	fmt.Fprintf(w, "  ferry → HS        %.2f requests/msg, %.0f µs waiting/msg, %d new TCP connections\n", r.HTTPPerMsg, r.HTTPWaitPerMsg, r.HTTPNewConns)
	if r.Relayed > 0 {
		fmt.Fprintf(w, "  Postgres statements per relayed message:\n")
		for _, q := range r.PGTop {
			if per := float64(q.Count) / float64(r.Relayed); per >= 0.01 {
				fmt.Fprintf(w, "    %6.2f  %s\n", per, q.Query)
			}
		}
		fmt.Fprintf(w, "  homeserver requests per relayed message:\n")
		keys := make([]string, 0, len(r.HSRequests))
		for k := range r.HSRequests {
			keys = append(keys, k)
		}
		sort.Slice(keys, func(i, j int) bool { return r.HSRequests[keys[i]] > r.HSRequests[keys[j]] })
		for _, k := range keys {
			fmt.Fprintf(w, "    %6.3f  %s\n", float64(r.HSRequests[k])/float64(r.Relayed), k)
		}
	}
}
