package main

// The scale scenario (-scale): one ferry process with N linked pairs and G ghosts per pair in its database, on
// either encryption path, measured from outside the process: start-up to ready, resident memory, idle CPU (its
// own and Postgres's) and the database's size.
//
// The data is seeded quickly instead of through N × G first messages: an in-process ferry (as in the relay runs)
// relays one message on one link, which creates one ghost through ferry's own code (registration, device,
// cross-signing, join, profile, key share); then every row that link and ghost left in the database is copied in
// bulk SQL for the other links and ghosts, with user IDs, room IDs, link IDs and session IDs rewritten. Each
// copied ghost gets its own access token (encrypted with the pickle key, as ferry stores it) and an account with
// a copy of the template's device at the fake homeserver, so the /sync path's drains of ghost devices succeed.
// The Olm and cross-signing keys inside the copied rows are the template's (same sizes, not distinct keys).
// Then ferry's own binary is started on that database (a separate process, so its memory and CPU are its own).

import (
	"bufio"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/crypto/goolm/libolmpickle"
	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/internal/fakehs"
)

// scaleResult is one scale run.
type scaleResult struct {
	Path             string           `json:"path"`
	Links            int              `json:"links"`
	Ghosts           int              `json:"ghosts"`
	SeedSec          float64          `json:"seed_seconds"`
	StartupSec       float64          `json:"startup_seconds"`
	FirstStartSec    float64          `json:"first_start_seconds"`
	FirstStartCPUSec float64          `json:"first_start_cpu_seconds"`
	ReadyRSSMB       float64          `json:"ready_rss_mb"`
	RSSMB            float64          `json:"rss_mb"`
	PeakRSSMB        float64          `json:"peak_rss_mb"`
	IdleSec          float64          `json:"idle_seconds"`
	IdleCPUPct       float64          `json:"idle_cpu_percent_of_core"`
	IdlePGCPUPct     float64          `json:"idle_postgres_cpu_percent_of_core"`
	IdleHSReqs       map[string]int64 `json:"idle_homeserver_requests"`
	StartCPUSec      float64          `json:"startup_cpu_seconds"`
	DBBytes          int64            `json:"db_bytes"`
	Tables           map[string]int64 `json:"table_bytes"`
	GhostBytes       int64            `json:"ghost_table_bytes"`
	LinkBytes        int64            `json:"link_table_bytes"`
	LoadBefore       string           `json:"loadavg_before"`
	LoadAfter        string           `json:"loadavg_after"`
	FerryWarnings    []string         `json:"ferry_warnings,omitempty"`
}

// Tables whose rows belong to ghosts (their devices and keys) or to links (rooms, members, room state).
var (
	ghostTables = []string{"crypto_account", "crypto_secrets", "crypto_olm_session", "crypto_megolm_inbound_session",
		"crypto_megolm_outbound_session", "crypto_megolm_outbound_session_shared", "crypto_cross_signing_keys",
		"crypto_cross_signing_signatures", "crypto_device", "mx_registrations", "kv_store"}
	linkTables = []string{"link", "link_room", "mx_room_state", "mx_user_profile"}
	// Per-message tables are not copied: they grow with traffic, not with links or ghosts.
	perMessageTables = map[string]bool{"inbox": true, "event_map": true, "crypto_message_index": true, "crypto_olm_message_hash": true}
)

func scaleRuns(ctx context.Context, st settings, log zerolog.Logger, rep *report) int {
	if _, err := os.Stat(st.ferryBin); err != nil {
		fmt.Fprintf(os.Stderr, "ferry-bench: -scale runs ferry's binary %s: %v (make build)\n", st.ferryBin, err)
		return 2
	}
	code := 0
	for _, path := range st.scalePaths {
		for _, n := range st.scaleLinks {
			if ctx.Err() != nil {
				return code
			}
			r, err := scaleOne(ctx, st, log, path, n)
			if err != nil {
				fmt.Fprintf(os.Stderr, "ferry-bench: scale %s %d links: %v\n", path, n, err)
				code = 1
				continue
			}
			rep.Scale = append(rep.Scale, r)
			printScale(r)
		}
	}
	return code
}

func printScale(r *scaleResult) {
	fmt.Printf("\n== scale: %s path, %d links, %d ghosts ==\n", r.Path, r.Links, r.Ghosts)
	fmt.Printf("  seeded in %.1f s; load average before %s, after %s\n", r.SeedSec, r.LoadBefore, r.LoadAfter)
	fmt.Printf("  first start        %.2f s to ready (%.2f s of ferry's CPU), after seeding\n", r.FirstStartSec, r.FirstStartCPUSec)
	fmt.Printf("  start-up to ready  %.2f s (%.2f s of ferry's CPU), a restart\n", r.StartupSec, r.StartCPUSec)
	fmt.Printf("  RSS                %.1f MB at ready, %.1f MB after the idle run (peak %.1f MB)\n", r.ReadyRSSMB, r.RSSMB, r.PeakRSSMB)
	fmt.Printf("  idle CPU           %.2f%% of a core (ferry) + %.2f%% (Postgres) over %.0f s\n", r.IdleCPUPct, r.IdlePGCPUPct, r.IdleSec)
	keys := make([]string, 0, len(r.IdleHSReqs))
	for k := range r.IdleHSReqs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("    %8.2f/s  %s\n", float64(r.IdleHSReqs[k])/r.IdleSec, k)
	}
	fmt.Printf("  database           %.1f MB: ghost tables %.1f MB (%.0f B per ghost), link tables %.1f MB (%.0f B per link)\n",
		float64(r.DBBytes)/1e6, float64(r.GhostBytes)/1e6, float64(r.GhostBytes)/float64(max(r.Ghosts, 1)),
		float64(r.LinkBytes)/1e6, float64(r.LinkBytes)/float64(max(r.Links, 1)))
	for _, w := range r.FerryWarnings {
		fmt.Printf("  ferry warned: %s\n", w)
	}
}

func loadavg() string {
	data, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func scaleOne(ctx context.Context, st settings, log zerolog.Logger, path string, links int) (*scaleResult, error) {
	r := &scaleResult{Path: path, Links: links, Ghosts: links * st.scaleGhosts, LoadBefore: loadavg()}
	seedStart := time.Now()
	tst := st
	tst.pairs, tst.senders, tst.receivers, tst.sampleEvery = 1, 1, 1, 0
	e, err := newEnv(ctx, tst, log)
	if err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	defer e.close()
	warm, err := e.generate(ctx, "template", 1)
	if err != nil {
		return nil, err
	}
	if err = e.waitForSessions(ctx, time.Minute); err != nil {
		return nil, err
	}
	if n, _, _ := e.run(ctx, warm[0].phase, 0, 0, time.Minute, st.drain); n != 1 || warm[0].arrived.Load() == 0 {
		return nil, fmt.Errorf("the template message was not relayed")
	}
	p := e.pairs[0]
	ghosts := e.br.Ghosts
	ghostOf = func(u id.UserID) string { return string(ghosts.Ghost(u)) }
	tmpl := template{
		ghost: e.br.Ghosts.Ghost(p.senders[0].ID), sender: p.senders[0].ID, receiver: p.receivers[0].ID,
		roomA: p.a, roomB: p.b, link: "bench0",
	}
	// The in-process ferry stops cleanly (outbound sessions written), as before an upgrade or restart.
	e.br.Stop()
	e.mach.Stop()
	e.asSrv.Close()
	_ = e.root.Close()
	e.br, e.mach, e.asSrv, e.root = nil, nil, nil, nil

	db, err := sql.Open("postgres", e.db.uri)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	ghostDev, err := seedClones(ctx, db, tmpl, links, st.scaleGhosts)
	if err != nil {
		return nil, fmt.Errorf("seed: %w", err)
	}
	if err = seedGhostAccess(ctx, db, e, tmpl, ghostDev, links, st.scaleGhosts, path); err != nil {
		return nil, fmt.Errorf("seed ghost tokens: %w", err)
	}
	var members []id.UserID
	for k := range links {
		if k > 0 {
			members = append(members, cloneReceiver(k))
		}
		for j := range st.scaleGhosts {
			if k > 0 || j > 0 {
				members = append(members, cloneSender(k, j))
			}
		}
	}
	seeded, err := e.hs.SeedUsers(members)
	if err != nil {
		return nil, err
	}
	if err = seedMemberKeys(ctx, db, seeded); err != nil {
		return nil, fmt.Errorf("seed members' keys: %w", err)
	}
	if _, err = db.ExecContext(ctx, `VACUUM ANALYZE`); err != nil {
		return nil, err
	}
	r.SeedSec = time.Since(seedStart).Seconds()

	// ferry's own binary on that database and homeserver.
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "ferry-scale-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err = os.WriteFile(cfgPath, []byte(scaleConfig(e, port, path)), 0o600); err != nil {
		return nil, err
	}
	e.hs.SetPushEncryption(path == "appservice")
	e.hs.SetAppserviceURL(fmt.Sprintf("http://127.0.0.1:%d", port))
	// The first start after seeding is not the one measured: on the appservice path it reads every tracked
	// member's device list (the seeded rows hold the template's keys, the homeserver each member's own) and
	// rotates what changed, as after a long downtime. The second start is an ordinary restart.
	first, err := startFerry(ctx, st, cfgPath)
	if err != nil {
		return nil, fmt.Errorf("first start: %w", err)
	}
	r.FirstStartSec = first.ready.Seconds()
	r.FirstStartCPUSec = procCPU(first.cmd.Process.Pid).Seconds()
	first.stop()
	r.FerryWarnings = append(r.FerryWarnings, first.warnings()...)
	child, err := startFerry(ctx, st, cfgPath)
	if err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	defer child.stop()
	cmd := child.cmd
	r.StartupSec = child.ready.Seconds()
	r.ReadyRSSMB, _ = procRSS(cmd.Process.Pid)
	r.StartCPUSec = procCPU(cmd.Process.Pid).Seconds()

	// Idle: no traffic. The first seconds after ready are left out (work that start-up set off).
	select {
	case <-time.After(st.idleSkip):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	hsBefore := e.hs.Counts()
	cpu0, pg0, t0 := procCPU(cmd.Process.Pid), clusterCPU(), time.Now()
	select {
	case <-time.After(st.idle):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	cpu1, pg1, t1 := procCPU(cmd.Process.Pid), clusterCPU(), time.Now()
	r.IdleSec = t1.Sub(t0).Seconds()
	r.IdleCPUPct = 100 * (cpu1 - cpu0).Seconds() / r.IdleSec
	r.IdlePGCPUPct = 100 * (pg1 - pg0).Seconds() / r.IdleSec
	r.IdleHSReqs = map[string]int64{}
	for k, v := range e.hs.Counts() {
		if d := v - hsBefore[k]; d > 0 {
			r.IdleHSReqs[k] = d
		}
	}
	r.RSSMB, r.PeakRSSMB = procRSS(cmd.Process.Pid)
	r.LoadAfter = loadavg()
	if err = dbSizes(ctx, db, r); err != nil {
		return nil, err
	}
	r.FerryWarnings = append(r.FerryWarnings, child.warnings()...)
	return r, nil
}

// child is ferry's binary running.
type child struct {
	cmd   *exec.Cmd
	ready time.Duration
	warn  chan string
	done  chan struct{}
	// stopping: warnings logged while ferry stops (cancelled work) are not collected
	stopping atomic.Bool
}

func (c *child) warnings() []string {
	var out []string
	for len(c.warn) > 0 {
		out = append(out, <-c.warn)
	}
	return out
}

// stop stops ferry as an operator would (SIGTERM: a clean stop) and waits for it.
func (c *child) stop() {
	c.stopping.Store(true)
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(60 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

// startFerry starts ferry's binary and waits until it logs that it is ready.
func startFerry(ctx context.Context, st settings, cfgPath string) (*child, error) {
	cmd := exec.Command(st.ferryBin, "-c", cfgPath)
	cmd.Stderr = os.Stderr
	// The benchmark's own FERRY_ variables (FERRY_TEST_PG, ...) are not ferry's config.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FERRY_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var logFile *os.File
	if st.ferryLog != "" {
		if logFile, err = os.OpenFile(st.ferryLog, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644); err != nil {
			return nil, err
		}
	}
	c := &child{cmd: cmd, warn: make(chan string, 16), done: make(chan struct{})}
	ready := make(chan struct{})
	start := time.Now()
	if err = cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		once := false
		for sc.Scan() {
			var line struct {
				Level   string `json:"level"`
				Message string `json:"message"`
				Error   string `json:"error"`
			}
			if json.Unmarshal(sc.Bytes(), &line) != nil {
				continue
			}
			if line.Message == "ferry is ready" && !once {
				once = true
				close(ready)
			}
			if logFile != nil {
				_, _ = logFile.Write(append(sc.Bytes(), '\n'))
			}
			if (line.Level == "warn" || line.Level == "error") && !c.stopping.Load() {
				select {
				case c.warn <- strings.TrimSpace(line.Message + " " + line.Error):
				default:
				}
			}
		}
		_ = cmd.Wait()
		if logFile != nil {
			_ = logFile.Close()
		}
		close(c.done)
	}()
	select {
	case <-ready:
		c.ready = time.Since(start)
		return c, nil
	case <-c.done:
		return nil, fmt.Errorf("ferry exited before it was ready: %v", cmd.ProcessState)
	case <-time.After(10 * time.Minute):
		c.stop()
		return nil, fmt.Errorf("ferry was not ready within 10 minutes")
	case <-ctx.Done():
		c.stop()
		return nil, ctx.Err()
	}
}

// template names what the template link and ghost left in the database.
type template struct {
	ghost, sender, receiver id.UserID
	roomA, roomB            id.RoomID
	link                    string
}

func cloneSender(k, j int) id.UserID {
	return id.NewUserID(fmt.Sprintf("scale%d.%d", k, j), benchDomain)
}
func cloneReceiver(k int) id.UserID { return id.NewUserID(fmt.Sprintf("scalebob%d", k), benchDomain) }
func cloneRoom(k int, side string) id.RoomID {
	return id.RoomID(fmt.Sprintf("!scale%d%s:%s", k, side, benchDomain))
}

// seedClones copies the template's rows: those naming the ghost or the sender once per (link, ghost), those
// naming the receiver once per link, those naming only the rooms (or the link) once per link. It returns the
// template ghost's device ID.
func seedClones(ctx context.Context, db *sql.DB, t template, links, ghosts int) (id.DeviceID, error) {
	var dev id.DeviceID
	if err := db.QueryRowContext(ctx, `SELECT device_id FROM crypto_account WHERE account_id=$1`, string(t.ghost)).Scan(&dev); err != nil {
		return "", fmt.Errorf("template ghost's account: %w", err)
	}
	// The mapping: one row per copy, with every identifier it replaces. The template link itself (k=0) keeps its
	// rows and gains ghosts 1..G-1.
	if _, err := db.ExecContext(ctx, `CREATE TEMP TABLE clone_map (k int, j int, ghost text, sender text, receiver text, room_a text, room_b text, link text)`); err != nil {
		return "", err
	}
	var ks, js []int64
	var gs, ss, rs, as, bs, ls []string
	for k := range links {
		for j := range ghosts {
			if k == 0 && j == 0 {
				continue
			}
			sender := cloneSender(k, j)
			ks, js = append(ks, int64(k)), append(js, int64(j))
			gs, ss = append(gs, ghostOf(sender)), append(ss, string(sender))
			recv, a, b, l := string(cloneReceiver(k)), string(cloneRoom(k, "a")), string(cloneRoom(k, "b")), fmt.Sprintf("scale%d", k)
			if k == 0 {
				recv, a, b, l = string(t.receiver), string(t.roomA), string(t.roomB), t.link
			}
			rs, as, bs, ls = append(rs, recv), append(as, a), append(bs, b), append(ls, l)
		}
	}
	if _, err := db.ExecContext(ctx, `INSERT INTO clone_map SELECT * FROM unnest($1::int[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])`,
		pq.Array(ks), pq.Array(js), pq.Array(gs), pq.Array(ss), pq.Array(rs), pq.Array(as), pq.Array(bs), pq.Array(ls)); err != nil {
		return "", err
	}
	tables, err := publicTables(ctx, db)
	if err != nil {
		return "", err
	}
	for _, table := range tables {
		if perMessageTables[table] || strings.HasSuffix(table, "_version") {
			continue
		}
		cols, err := tableColumns(ctx, db, table)
		if err != nil {
			return "", err
		}
		if err = cloneTable(ctx, db, t, table, cols); err != nil {
			return "", fmt.Errorf("%s: %w", table, err)
		}
	}
	return dev, nil
}

type column struct {
	name string
	text bool
}

func publicTables(ctx context.Context, db *sql.DB) ([]string, error) {
	rows, err := db.QueryContext(ctx, `SELECT tablename FROM pg_tables WHERE schemaname='public' ORDER BY 1`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err = rows.Scan(&s); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

func tableColumns(ctx context.Context, db *sql.DB, table string) ([]column, error) {
	rows, err := db.QueryContext(ctx, `SELECT column_name, data_type IN ('text', 'character varying', 'character', 'jsonb', 'json')
		FROM information_schema.columns WHERE table_schema='public' AND table_name=$1 AND is_generated='NEVER' AND identity_generation IS NULL
		AND coalesce(column_default, '') NOT LIKE 'nextval%' ORDER BY ordinal_position`, table)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []column
	for rows.Next() {
		var c column
		if err = rows.Scan(&c.name, &c.text); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// cloneTable copies one table's template rows. A row's kind is decided by the first identifier it names:
// ghost, sender, receiver, then rooms or link; link tables are per link whatever user created them.
func cloneTable(ctx context.Context, db *sql.DB, t template, table string, cols []column) error {
	var text []string
	for _, c := range cols {
		if c.text {
			text = append(text, c.name)
		}
	}
	if len(text) == 0 {
		return nil
	}
	// One text value per row that holds every textual column, to classify the row.
	var parts []string
	for _, c := range text {
		parts = append(parts, fmt.Sprintf("coalesce(s.%q::text, '')", c))
	}
	all := strings.Join(parts, " || ' ' || ")
	has := func(v string) string { return fmt.Sprintf("position(%s in %s) > 0", pq.QuoteLiteral(v), all) }
	isLink := table == "link" || table == "link_room"
	kinds := []struct{ where, filter string }{
		// per (link, ghost)
		{has(string(t.ghost)), ""},
		{fmt.Sprintf("NOT %s AND %s", has(string(t.ghost)), has(string(t.sender))), ""},
		// per link: only the first ghost's copy of the mapping
		{fmt.Sprintf("NOT %s AND NOT %s AND %s", has(string(t.ghost)), has(string(t.sender)), has(string(t.receiver))), "m.j = 0 AND m.k > 0"},
		{fmt.Sprintf("NOT %s AND NOT %s AND NOT %s AND (%s OR %s)", has(string(t.ghost)), has(string(t.sender)), has(string(t.receiver)),
			has(string(t.roomA)), has(string(t.roomB))), "m.j = 0 AND m.k > 0"},
	}
	if isLink {
		kinds = kinds[3:]
		kinds[0].where = fmt.Sprintf("(%s OR %s OR %s)", has(string(t.roomA)), has(string(t.roomB)), has(t.link))
	}
	if table == "crypto_megolm_inbound_session" {
		// The bot's inbound session from the sender names no user: it is the sender's, per (link, ghost).
		kinds[3].filter = ""
	}
	var names, exprs []string
	for _, c := range cols {
		names = append(names, fmt.Sprintf("%q", c.name))
		if !c.text {
			exprs = append(exprs, fmt.Sprintf("s.%q", c.name))
			continue
		}
		expr := fmt.Sprintf("s.%q::text", c.name)
		for _, rep := range [][2]string{{string(t.ghost), "m.ghost"}, {string(t.sender), "m.sender"}, {string(t.receiver), "m.receiver"},
			{string(t.roomA), "m.room_a"}, {string(t.roomB), "m.room_b"}} {
			expr = fmt.Sprintf("replace(%s, %s, %s)", expr, pq.QuoteLiteral(rep[0]), rep[1])
		}
		if isLink && (c.name == "id" || c.name == "link_id") {
			expr = fmt.Sprintf("replace(%s, %s, m.link)", expr, pq.QuoteLiteral(t.link))
		}
		if strings.HasSuffix(c.name, "session_id") {
			expr = fmt.Sprintf("%s || '~' || m.k || '.' || m.j", expr)
		}
		exprs = append(exprs, fmt.Sprintf("(%s)::%s", expr, colType(ctx, db, table, c.name)))
	}
	for _, kind := range kinds {
		filter := "true"
		if kind.filter != "" {
			filter = kind.filter
		}
		q := fmt.Sprintf(`INSERT INTO %q (%s) SELECT %s FROM %q s, clone_map m WHERE %s AND %s ON CONFLICT DO NOTHING`,
			table, strings.Join(names, ", "), strings.Join(exprs, ", "), table, kind.where, filter)
		if _, err := db.ExecContext(ctx, q); err != nil {
			return err
		}
	}
	return nil
}

func colType(ctx context.Context, db *sql.DB, table, col string) string {
	var t string
	_ = db.QueryRowContext(ctx, `SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid=$1::regclass AND attname=$2`,
		fmt.Sprintf("%q", table), col).Scan(&t)
	if t == "" {
		t = "text"
	}
	return t
}

// ghostOf is ferry's ghost for a sender (bridge.Ghosts.Ghost), set by scaleOne.
var ghostOf func(sender id.UserID) string

// seedMemberKeys replaces the copied device and cross-signing rows of the seeded members with their own keys,
// as mautrix's key query would have stored them (the device, its self-signature and its signature by the
// self-signing key, the master and self-signing keys, the self-signing key's signature by the master key).
func seedMemberKeys(ctx context.Context, db *sql.DB, seeded []fakehs.SeededUser) error {
	var users, devs, idKeys, sigKeys, masters, selfs, devSelf, selfSig, devSig []string
	for _, u := range seeded {
		users, devs = append(users, string(u.User)), append(devs, string(u.Device))
		idKeys, sigKeys = append(idKeys, string(u.IdentityKey)), append(sigKeys, string(u.SigningKey))
		masters, selfs = append(masters, string(u.Master)), append(selfs, string(u.SelfSigning))
		devSelf, selfSig, devSig = append(devSelf, u.DeviceSelfSig), append(selfSig, u.SelfSigningSig), append(devSig, u.DeviceSig)
	}
	u := pq.Array(users)
	stmts := []struct {
		q    string
		args []any
	}{
		{`DELETE FROM crypto_device WHERE user_id = ANY($1)`, []any{u}},
		{`DELETE FROM crypto_cross_signing_keys WHERE user_id = ANY($1)`, []any{u}},
		{`DELETE FROM crypto_cross_signing_signatures WHERE signed_user_id = ANY($1)`, []any{u}},
		{`INSERT INTO crypto_device (user_id, device_id, identity_key, signing_key, trust, deleted, name)
			SELECT u, d, i, s, 0, false, d FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS x(u, d, i, s)`,
			[]any{u, pq.Array(devs), pq.Array(idKeys), pq.Array(sigKeys)}},
		{`INSERT INTO crypto_cross_signing_keys (user_id, usage, key, first_seen_key)
			SELECT u, 'master', m, m FROM unnest($1::text[], $2::text[]) AS x(u, m)
			UNION ALL SELECT u, 'self_signing', s, s FROM unnest($1::text[], $3::text[]) AS x(u, s)`,
			[]any{u, pq.Array(masters), pq.Array(selfs)}},
		{`INSERT INTO crypto_cross_signing_signatures (signed_user_id, signed_key, signer_user_id, signer_key, signature)
			SELECT u, s, u, s, a FROM unnest($1::text[], $2::text[], $3::text[]) AS x(u, s, a)
			UNION ALL SELECT u, ss, u, m, b FROM unnest($1::text[], $4::text[], $5::text[], $6::text[]) AS x(u, ss, m, b)
			UNION ALL SELECT u, s, u, ss, c FROM unnest($1::text[], $2::text[], $4::text[], $7::text[]) AS x(u, s, ss, c)`,
			[]any{u, pq.Array(sigKeys), pq.Array(devSelf), pq.Array(selfs), pq.Array(masters), pq.Array(selfSig), pq.Array(devSig)}},
	}
	for i, st := range stmts {
		if _, err := db.ExecContext(ctx, st.q, st.args...); err != nil {
			return fmt.Errorf("statement %d: %w", i, err)
		}
	}
	return nil
}

// seedGhostAccess gives every copied ghost its own access token (the /sync path: stored as ferry stores it,
// and known to the fake homeserver), or removes the tokens (the appservice path has none).
func seedGhostAccess(ctx context.Context, db *sql.DB, e *env, t template, dev id.DeviceID, links, ghosts int, path string) error {
	var users []id.UserID
	for k := range links {
		for j := range ghosts {
			if k == 0 && j == 0 {
				continue
			}
			users = append(users, id.UserID(ghostOf(cloneSender(k, j))))
		}
	}
	if path == "appservice" {
		if _, err := db.ExecContext(ctx, `DELETE FROM crypto_secrets WHERE account_id LIKE '@\_ferry\_%' AND name IN ('im.ferry.access_token', 'im.ferry.account_password')`); err != nil {
			return err
		}
		return e.hs.CloneAccounts(t.ghost, dev, users, nil)
	}
	tokens := make([]string, len(users))
	accounts := make([]string, len(users))
	secrets := make([][]byte, len(users))
	for i, u := range users {
		b := make([]byte, 16)
		_, _ = rand.Read(b)
		tokens[i] = "scale_" + hex.EncodeToString(b)
		accounts[i] = string(u)
		var err error
		if secrets[i], err = libolmpickle.Pickle([]byte(e.pickleKey), []byte(string(dev)+" "+tokens[i])); err != nil {
			return err
		}
	}
	if _, err := db.ExecContext(ctx, `UPDATE crypto_secrets SET secret=u.v FROM unnest($1::text[], $2::bytea[]) AS u(a, v)
		WHERE crypto_secrets.account_id=u.a AND crypto_secrets.name='im.ferry.access_token'`, pq.Array(accounts), pq.ByteaArray(secrets)); err != nil {
		return err
	}
	return e.hs.CloneAccounts(t.ghost, dev, users, tokens)
}

func scaleConfig(e *env, port int, path string) string {
	pg := strings.Replace(e.db.uri, "postgres://", "postgres://", 1)
	return fmt.Sprintf(`homeserver:
  address: %s
  domain: %s
  registration_shared_secret: %q
appservice:
  address: http://127.0.0.1:%d
  hostname: 127.0.0.1
  port: %d
  id: %s
  bot:
    username: %s
    displayname: Ferry bridge bot
  as_token: %q
  hs_token: %q
database:
  type: postgres
  uri: %q
  max_open_conns: 20
  max_idle_conns: 20
encryption:
  pickle_key: %q
  device_mode: %s
  appservice: %v
permissions:
  "*": relay
logging:
  min_level: %s
  stdout:
    format: json
`, e.hs.URL, benchDomain, e.sharedSecret, port, port, benchASID, botLocalpart, e.asToken, e.hsToken, pg, e.pickleKey,
		crypto.DeviceModePerGhost, path == "appservice", e.st.ferryLogLevel)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// clusterCPU is the CPU time of the Postgres cluster that scripts/with-postgres.sh started (its postmaster and
// every child: backends, WAL writer, checkpointer, autovacuum), or of every postgres process on the machine when
// the server is not that throwaway cluster.
func clusterCPU() time.Duration {
	data, err := os.ReadFile(filepath.Join(os.Getenv("FERRY_TEST_PG_DATA"), "postmaster.pid"))
	if os.Getenv("FERRY_TEST_PG_DATA") == "" || err != nil {
		return postgresCPU()
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(data), "\n", 2)[0]))
	if err != nil {
		return postgresCPU()
	}
	total := procCPU(pid)
	entries, _ := os.ReadDir("/proc")
	for _, ent := range entries {
		if ent.Name()[0] < '0' || ent.Name()[0] > '9' {
			continue
		}
		stat, err := os.ReadFile("/proc/" + ent.Name() + "/stat")
		if err != nil {
			continue
		}
		closing := strings.LastIndexByte(string(stat), ')')
		fields := strings.Fields(string(stat[closing+1:]))
		if len(fields) > 1 && fields[1] == strconv.Itoa(pid) {
			child, _ := strconv.Atoi(ent.Name())
			total += procCPU(child)
		}
	}
	return total
}

// procCPU is a process's user + system CPU time from /proc/<pid>/stat.
func procCPU(pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	closing := strings.LastIndexByte(string(data), ')')
	fields := strings.Fields(string(data[closing+1:]))
	if len(fields) < 13 {
		return 0
	}
	u, _ := strconv.ParseUint(fields[11], 10, 64)
	s, _ := strconv.ParseUint(fields[12], 10, 64)
	return time.Duration(u+s) * time.Second / clockTicks
}

// procRSS is a process's resident and peak resident memory in MB, from /proc/<pid>/status.
func procRSS(pid int) (rss, peak float64) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[0], 64)
		switch k {
		case "VmRSS":
			rss = kb / 1024
		case "VmHWM":
			peak = kb / 1024
		}
	}
	return rss, peak
}

func dbSizes(ctx context.Context, db *sql.DB, r *scaleResult) error {
	if err := db.QueryRowContext(ctx, `SELECT pg_database_size(current_database())`).Scan(&r.DBBytes); err != nil {
		return err
	}
	rows, err := db.QueryContext(ctx, `SELECT tablename, pg_total_relation_size(quote_ident(tablename)) FROM pg_tables WHERE schemaname='public'`)
	if err != nil {
		return err
	}
	defer rows.Close()
	r.Tables = map[string]int64{}
	for rows.Next() {
		var name string
		var size int64
		if err = rows.Scan(&name, &size); err != nil {
			return err
		}
		r.Tables[name] = size
	}
	for _, t := range ghostTables {
		r.GhostBytes += r.Tables[t]
	}
	for _, t := range linkTables {
		r.LinkBytes += r.Tables[t]
	}
	return rows.Err()
}
