package main

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.mau.fi/util/dbutil"
	"go.mau.fi/util/random"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/crypto/sql_store_upgrade"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/config"
)

// Doctor statuses, the first word of each line it prints.
const (
	statusOK   = "ok"
	statusWarn = "warn"
	statusFail = "FAIL"
	statusSkip = "skip"
)

// Doctor timing: how long one check may take, how far the clocks may drift apart, and how long the push probe
// waits for its to-device message to come back.
const (
	doctorTimeout   = 10 * time.Second
	skewWarn        = 5 * time.Second
	skewFail        = time.Minute
	doctorProbeWait = 15 * time.Second
	// doctorProbeAttempts splits doctorProbeWait: each attempt pings the homeserver again and sends a new probe.
	doctorProbeAttempts = 3
)

// doctorProbeType is the to-device message the doctor's probe device sends itself.
const doctorProbeType = "im.ferry.doctor_probe"

// finding is one line of the doctor's report.
type finding struct {
	status, check, detail, fix string
}

// doctor checks a ferry set-up from the outside: config, database, homeserver, registration, tokens, the
// homeserver's way back to ferry, appservice-mode encryption, the bot's power and the clocks. It changes nothing
// that ferry keeps: the only things it creates on the homeserver (a probe device of the bot, in appservice mode)
// it deletes again.
type doctor struct {
	out      io.Writer
	cfg      *config.Config
	regPath  string
	findings []finding
	// Set as the checks go: what later checks depend on.
	db         *dbutil.Database
	as         *appservice.AppService
	versions   *mautrix.RespVersions
	tokenValid bool
	// listener stands in for ferry on its port while ferry is stopped; ferryRunning when the port is taken.
	listener     *doctorListener
	ferryRunning bool
}

func (d *doctor) report(status, check, detail, fix string) {
	f := finding{status: status, check: check, detail: oneLine(detail), fix: oneLine(fix)}
	d.findings = append(d.findings, f)
	line := fmt.Sprintf("%-4s  %s: %s", f.status, f.check, f.detail)
	if f.fix != "" {
		line += " -- fix: " + f.fix
	}
	fmt.Fprintln(d.out, line)
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// runDoctor is `ferry doctor`: it prints one line per finding and exits 0 when nothing failed, 1 otherwise.
func runDoctor(args []string, out io.Writer) int {
	fs := flag.NewFlagSet("ferry doctor", flag.ContinueOnError)
	configPath := fs.String("c", "config.yaml", "path to the config file")
	regPath := fs.String("r", "registration.yaml", "path to the appservice registration file, to compare with the config")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	d := &doctor{out: out, regPath: *regPath}
	ctx := context.Background()
	if !d.checkConfig(*configPath) {
		return exitFailure
	}
	d.checkPickleKey()
	d.checkDatabase(ctx)
	if d.db != nil {
		defer d.db.Close()
	}
	d.checkHomeserver(ctx)
	d.checkRegistrationFile()
	d.checkToken(ctx)
	d.standIn()
	d.checkPing(ctx)
	d.checkAppserviceMode(ctx)
	d.checkRoomSync(ctx)
	d.checkPower(ctx)
	if d.listener != nil {
		d.listener.close()
	}
	failed := 0
	for _, f := range d.findings {
		if f.status == statusFail {
			failed++
		}
	}
	if failed > 0 {
		fmt.Fprintf(out, "%d of %d checks failed\n", failed, len(d.findings))
		return exitFailure
	}
	fmt.Fprintf(out, "all %d checks passed\n", len(d.findings))
	return exitOK
}

func (d *doctor) checkConfig(path string) bool {
	cfg, err := config.Load(path)
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			d.report(statusFail, "config", line, "correct the key named, see config.example.yaml")
		}
		return false
	}
	if err = cfg.ValidateForRun(); err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			d.report(statusFail, "config", line, "run ferry -g -c "+path+" to write the tokens and the registration")
		}
		return false
	}
	d.cfg = cfg
	if data, err := os.ReadFile(path); err == nil {
		if _, upgrade, err := config.Preview(path, data); err == nil && upgrade.Changed() {
			d.report(statusOK, "config", fmt.Sprintf("%s loads; written by an older ferry or lacking keys (%d renamed, %d absent): ferry upgrades it in place at its next start",
				path, len(upgrade.Moved), len(upgrade.Added)), "")
			return true
		}
	}
	d.report(statusOK, "config", path+" loads", "")
	return true
}

func (d *doctor) checkPickleKey() {
	switch key := d.cfg.Encryption.PickleKey; {
	case key == crypto.PickleKeyGenerate:
		d.report(statusWarn, "pickle key", "not generated yet: ferry generates it at its first start and writes it into the config",
			"back the config up after the first start; without the key the stored keys are useless")
	case len(key) < 32:
		d.report(statusWarn, "pickle key", fmt.Sprintf("set, but only %d characters long", len(key)),
			"only on a fresh database: set encryption.pickle_key to generate (changing it later makes the stored keys unreadable)")
	default:
		d.report(statusOK, "pickle key", "set; keep a backup of it with the database's", "")
	}
}

// schemaTables are the version tables in ferry's database and the schema versions this ferry knows.
var schemaTables = []struct {
	name, table string
	known       int
}{
	{"ferry", database.VersionTable, len(database.UpgradeTable)},
	{"crypto store", crypto.StoreVersionTable, len(sql_store_upgrade.Table)},
	{"state store", "mx_version", len(sqlstatestore.UpgradeTable)},
}

func (d *doctor) checkDatabase(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, doctorTimeout)
	defer cancel()
	cfg := d.cfg.Database
	if path, ok := sqlitePath(cfg); ok {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			d.report(statusOK, "database", "the SQLite file "+path+" does not exist yet (ferry creates it at start)", "")
			return
		}
	}
	db, err := dbutil.NewFromConfig("ferry", dbutil.Config{PoolConfig: dbutil.PoolConfig{
		Type: database.DriverFor(cfg.Type), URI: database.TuneURI(cfg.Type, cfg.URI), MaxOpenConns: 2, MaxIdleConns: 1,
	}}, dbutil.NoopLogger)
	if err == nil {
		err = db.RawDB.PingContext(ctx)
	}
	if err != nil {
		d.report(statusFail, "database", "cannot reach the "+cfg.Type+" database: "+err.Error(),
			"check database.uri and that the database server runs and accepts ferry's user")
		if db != nil {
			_ = db.Close()
		}
		return
	}
	d.db = db
	var parts []string
	status := statusOK
	for _, t := range schemaTables {
		var version, compat int
		err := db.QueryRow(ctx, "SELECT version, compat FROM "+t.table+" LIMIT 1").Scan(&version, &compat)
		switch {
		case err != nil:
			parts = append(parts, t.name+" not created yet (ferry creates it at start)")
		case compat > t.known:
			status = statusFail
			parts = append(parts, fmt.Sprintf("%s v%d, written by a newer ferry (this one knows v%d)", t.name, version, t.known))
		case version < t.known:
			parts = append(parts, fmt.Sprintf("%s v%d (upgraded to v%d at start)", t.name, version, t.known))
		default:
			parts = append(parts, fmt.Sprintf("%s v%d", t.name, version))
		}
	}
	fix := ""
	if status == statusFail {
		fix = "run the ferry release that wrote this database, or restore a backup taken before the upgrade"
	}
	d.report(status, "database", "reachable; schema: "+strings.Join(parts, ", "), fix)
}

// sqlitePath returns the file of a SQLite database URI ("file:path?options").
func sqlitePath(cfg config.Database) (string, bool) {
	if cfg.Type != config.DatabaseTypeSQLite || !strings.HasPrefix(cfg.URI, "file:") {
		return "", false
	}
	path, _, _ := strings.Cut(strings.TrimPrefix(cfg.URI, "file:"), "?")
	return path, path != "" && path != ":memory:"
}

func (d *doctor) checkHomeserver(ctx context.Context) {
	d.as = appservice.Create()
	d.as.HomeserverDomain = d.cfg.Homeserver.Domain
	d.as.Registration = registrationFor(d.cfg)
	if err := d.as.SetHomeserverURL(d.cfg.Homeserver.Address); err != nil {
		d.report(statusFail, "homeserver", "homeserver.address: "+err.Error(), "set homeserver.address to the homeserver's client-server URL")
		d.as = nil
		return
	}
	ctx, cancel := context.WithTimeout(ctx, doctorTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(d.cfg.Homeserver.Address, "/")+"/_matrix/client/versions", nil)
	if err != nil {
		d.report(statusFail, "homeserver", err.Error(), "set homeserver.address to the homeserver's client-server URL")
		d.as = nil
		return
	}
	sent := time.Now()
	resp, err := d.as.HTTPClient.Do(req)
	if err != nil {
		d.report(statusFail, "homeserver", "unreachable at "+d.cfg.Homeserver.Address+": "+err.Error(),
			"check homeserver.address and that the homeserver runs")
		d.as = nil
		return
	}
	received := time.Now()
	defer resp.Body.Close()
	var versions mautrix.RespVersions
	if err = json.NewDecoder(resp.Body).Decode(&versions); err != nil || resp.StatusCode != http.StatusOK {
		d.report(statusFail, "homeserver", fmt.Sprintf("%s answered /versions with HTTP %d, not a Matrix homeserver's answer", d.cfg.Homeserver.Address, resp.StatusCode),
			"point homeserver.address at the client-server API (the URL clients use, or the homeserver's own listener)")
		d.as = nil
		return
	}
	d.versions = &versions
	if d.as.SpecVersions != nil {
		*d.as.SpecVersions = versions
	}
	d.report(statusOK, "homeserver", fmt.Sprintf("%s answers, spec versions up to %s", d.cfg.Homeserver.Address, latestVersion(&versions)), "")
	d.checkClock(resp.Header.Get("Date"), sent, received)
}

func latestVersion(v *mautrix.RespVersions) string {
	if len(v.Versions) == 0 {
		return "none"
	}
	return v.Versions[len(v.Versions)-1].String()
}

// checkClock compares the homeserver's Date header with the local clock at the time of the request. Dates have
// one-second resolution, so only the part of the difference beyond that (and beyond the round trip) counts.
func (d *doctor) checkClock(date string, sent, received time.Time) {
	serverTime, err := http.ParseTime(date)
	if err != nil {
		d.report(statusSkip, "clock", "the homeserver sent no Date header to compare with", "")
		return
	}
	mid := sent.Add(received.Sub(sent) / 2)
	skew := serverTime.Sub(mid.Truncate(time.Second))
	slack := time.Second + received.Sub(sent)
	abs := time.Duration(math.Abs(float64(skew)))
	switch {
	case abs > skewFail+slack:
		d.report(statusFail, "clock", fmt.Sprintf("ferry's clock is %s off the homeserver's", skew.Round(time.Second)),
			"run NTP (systemd-timesyncd, chrony) on both machines; disappearing messages and key rotation follow the clocks")
	case abs > skewWarn+slack:
		d.report(statusWarn, "clock", fmt.Sprintf("ferry's clock is %s off the homeserver's", skew.Round(time.Second)),
			"run NTP (systemd-timesyncd, chrony) on both machines")
	default:
		d.report(statusOK, "clock", "within "+slack.Round(time.Second).String()+" of the homeserver's", "")
	}
}

func (d *doctor) checkRegistrationFile() {
	reg, err := appservice.LoadRegistration(d.regPath)
	if err != nil {
		d.report(statusSkip, "registration file", "cannot read "+d.regPath+" ("+err.Error()+"): not compared with the config",
			"pass the file the homeserver loads with -r")
		return
	}
	var problems []string
	if subtle.ConstantTimeCompare([]byte(reg.AppToken), []byte(d.cfg.Appservice.ASToken)) != 1 {
		problems = append(problems, "its as_token differs from appservice.as_token")
	}
	if subtle.ConstantTimeCompare([]byte(reg.ServerToken), []byte(d.cfg.Appservice.HSToken)) != 1 {
		problems = append(problems, "its hs_token differs from appservice.hs_token")
	}
	if reg.ID != d.cfg.Appservice.ID {
		problems = append(problems, fmt.Sprintf("its id %q differs from appservice.id %q", reg.ID, d.cfg.Appservice.ID))
	}
	if reg.URL != d.cfg.Appservice.Address {
		problems = append(problems, fmt.Sprintf("its url %q differs from appservice.address %q", reg.URL, d.cfg.Appservice.Address))
	}
	if d.cfg.Encryption.Appservice && !(reg.EphemeralEvents && reg.MSC3202 && reg.MSC4190) {
		problems = append(problems, "encryption.appservice is true, but it lacks receive_ephemeral, org.matrix.msc3202 or io.element.msc4190")
	}
	if len(problems) > 0 {
		d.report(statusFail, "registration file", d.regPath+": "+strings.Join(problems, "; "),
			"run ferry -g -c <config> -r "+d.regPath+", install the new file on the homeserver and restart it")
		return
	}
	d.report(statusOK, "registration file", d.regPath+" matches the config", "")
}

// errcodeOf returns the Matrix errcode (or HTTP status) of a failed request.
func errcodeOf(err error) string {
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) {
		if httpErr.RespError != nil && httpErr.RespError.ErrCode != "" {
			return httpErr.RespError.ErrCode
		}
		if httpErr.Response != nil {
			return "HTTP " + strconv.Itoa(httpErr.Response.StatusCode)
		}
	}
	return "no answer"
}

func (d *doctor) skipped(check string) bool {
	if d.as == nil {
		d.report(statusSkip, check, "the homeserver is not reachable", "")
		return true
	}
	return false
}

func (d *doctor) checkToken(ctx context.Context) {
	const check = "registration and as_token"
	if d.skipped(check) {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, doctorTimeout)
	defer cancel()
	bot := d.as.BotClient()
	bot.DefaultHTTPRetries = 0
	whoami, err := bot.Whoami(ctx)
	switch {
	case errors.Is(err, mautrix.MUnknownToken):
		d.report(statusFail, check, "the homeserver does not know appservice.as_token (M_UNKNOWN_TOKEN): the registration is not installed, or its tokens differ from the config's",
			"list the file ferry -g wrote under app_service_config_files (Synapse) or app_service_api.config_files (Dendrite) and restart the homeserver")
	case errors.Is(err, mautrix.MForbidden) && strings.Contains(strings.ToLower(err.Error()), "regist"):
		d.tokenValid = true
		d.report(statusOK, check, "the homeserver knows as_token; the bot "+d.as.BotMXID().String()+" is not registered yet (ferry registers it at start)", "")
	case errors.Is(err, mautrix.MForbidden):
		d.report(statusFail, check, "the homeserver refused as_token for the bot "+d.as.BotMXID().String()+": "+err.Error(),
			"check that the registration's user namespace covers appservice.bot.username (ferry -g writes it so)")
	case err != nil:
		d.report(statusFail, check, "whoami as the bot failed ("+errcodeOf(err)+"): "+err.Error(), "see the homeserver's log")
	case whoami.UserID != d.as.BotMXID():
		d.report(statusFail, check, "whoami answered "+whoami.UserID.String()+", not the bot "+d.as.BotMXID().String(),
			"check appservice.bot.username and homeserver.domain")
	default:
		d.tokenValid = true
		d.report(statusOK, check, "installed: whoami as the bot answers "+whoami.UserID.String(), "")
	}
}

// doctorListener stands in for ferry on its appservice port while ferry is stopped, so the homeserver's ping and
// pushes can be seen. It answers transactions that carry room events with 503, so the homeserver keeps them for
// ferry; it takes only transactions without room events.
type doctorListener struct {
	server  *http.Server
	hsToken string
	// guards the following fields
	mu        sync.Mutex
	pings     int
	badTokens int
	refused   int                  // transactions refused for their room events
	probes    map[string]probeSeen // by nonce
}

// probeSeen is what came back with a probe message.
type probeSeen struct {
	otkCounts, deviceLists bool
}

func startDoctorListener(cfg *config.Config) (*doctorListener, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.Appservice.Hostname, strconv.Itoa(int(cfg.Appservice.Port))))
	if err != nil {
		return nil, err
	}
	l := &doctorListener{hsToken: cfg.Appservice.HSToken, probes: make(map[string]probeSeen)}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /_matrix/app/v1/ping", l.handlePing)
	mux.HandleFunc("PUT /_matrix/app/v1/transactions/{txnID}", l.handleTransaction)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"errcode": "M_UNRECOGNIZED", "error": "ferry doctor answers only pings and transactions"})
	})
	l.server = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = l.server.Serve(ln) }()
	return l, nil
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

// authorized checks the homeserver's hs_token, as ferry does.
func (l *doctorListener) authorized(r *http.Request) bool {
	token := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if token == "" {
		token = r.URL.Query().Get("access_token")
	}
	ok := subtle.ConstantTimeCompare([]byte(token), []byte(l.hsToken)) == 1
	if !ok {
		l.mu.Lock()
		l.badTokens++
		l.mu.Unlock()
	}
	return ok
}

func (l *doctorListener) handlePing(w http.ResponseWriter, r *http.Request) {
	if !l.authorized(r) {
		writeJSON(w, http.StatusForbidden, map[string]string{"errcode": "M_FORBIDDEN", "error": "wrong hs_token"})
		return
	}
	l.mu.Lock()
	l.pings++
	l.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{})
}

// doctorTransaction is what the doctor reads of a pushed transaction.
type doctorTransaction struct {
	Events         []json.RawMessage `json:"events"`
	ToDevice       []toDeviceEvent   `json:"to_device"`
	ToDeviceMSC    []toDeviceEvent   `json:"de.sorunome.msc2409.to_device"`
	OTKCounts      json.RawMessage   `json:"device_one_time_keys_count"`
	OTKCountsMSC   json.RawMessage   `json:"org.matrix.msc3202.device_one_time_keys_count"`
	DeviceLists    json.RawMessage   `json:"device_lists"`
	DeviceListsMSC json.RawMessage   `json:"org.matrix.msc3202.device_lists"`
}

type toDeviceEvent struct {
	Type    string `json:"type"`
	Content struct {
		Nonce string `json:"nonce"`
	} `json:"content"`
}

func (l *doctorListener) handleTransaction(w http.ResponseWriter, r *http.Request) {
	if !l.authorized(r) {
		writeJSON(w, http.StatusForbidden, map[string]string{"errcode": "M_FORBIDDEN", "error": "wrong hs_token"})
		return
	}
	var txn doctorTransaction
	if err := json.NewDecoder(io.LimitReader(r.Body, 16<<20)).Decode(&txn); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"errcode": "M_NOT_JSON", "error": "not a transaction"})
		return
	}
	hasCounts := len(txn.OTKCounts) > 2 || len(txn.OTKCountsMSC) > 2
	hasLists := len(txn.DeviceLists) > 2 || len(txn.DeviceListsMSC) > 2
	l.mu.Lock()
	for _, evt := range append(txn.ToDevice, txn.ToDeviceMSC...) {
		if evt.Type == doctorProbeType {
			l.probes[evt.Content.Nonce] = probeSeen{otkCounts: hasCounts, deviceLists: hasLists}
		}
	}
	l.mu.Unlock()
	if len(txn.Events) > 0 {
		// Room events are ferry's: refused, the homeserver keeps them and delivers them when ferry runs.
		l.mu.Lock()
		l.refused++
		l.mu.Unlock()
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"errcode": "M_UNKNOWN", "error": "ferry doctor is running; ferry takes room events when it runs"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{})
}

func (l *doctorListener) probe(nonce string) (probeSeen, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen, ok := l.probes[nonce]
	return seen, ok
}

func (l *doctorListener) counts() (pings, badTokens int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.pings, l.badTokens
}

// refusedCount is how many transactions the listener refused for their room events.
func (l *doctorListener) refusedCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.refused
}

func (l *doctorListener) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = l.server.Shutdown(ctx)
}

// standIn listens on ferry's appservice port while ferry is stopped, so the homeserver's ping and pushes reach
// the doctor; when the port is taken, ferry runs and answers itself.
func (d *doctor) standIn() {
	l, err := startDoctorListener(d.cfg)
	switch {
	case err == nil:
		d.listener = l
	case errors.Is(err, syscall.EADDRINUSE):
		d.ferryRunning = true
	default:
		d.report(statusFail, "appservice listener", "cannot listen on appservice.hostname and appservice.port: "+err.Error(),
			"set appservice.hostname to an address of this machine and appservice.port to a free port")
	}
}

func (d *doctor) checkPing(ctx context.Context) {
	const check = "homeserver reaches ferry"
	if d.skipped(check) {
		return
	}
	if !d.versions.Supports(mautrix.FeatureAppservicePing) {
		d.report(statusSkip, check, "the homeserver has no appservice ping: hs_token and the way back to ferry show only when ferry receives events", "")
		return
	}
	where := "ferry"
	if d.listener != nil {
		where = "ferry doctor (standing in for the stopped ferry)"
	} else if !d.ferryRunning {
		return // standIn said why
	}
	ctx, cancel := context.WithTimeout(ctx, doctorTimeout)
	defer cancel()
	bot := d.as.BotClient()
	bot.DefaultHTTPRetries = 0
	resp, err := bot.AppservicePing(ctx, d.as.Registration.ID, "")
	pings, badTokens := 0, 0
	if d.listener != nil {
		pings, badTokens = d.listener.counts()
	}
	switch {
	case err == nil:
		d.report(statusOK, check, fmt.Sprintf("the homeserver pinged %s at the registration's url in %d ms; hs_token matches", where, resp.DurationMS), "")
	case errors.Is(err, mautrix.MUnknownToken), errors.Is(err, mautrix.MForbidden):
		d.report(statusSkip, check, "the homeserver refused the ping ("+errcodeOf(err)+"): see the as_token check", "")
	case badTokens > 0:
		d.report(statusFail, check, "the homeserver reached ferry's port but sent a different hs_token than appservice.hs_token",
			"run ferry -g, install the registration it writes on the homeserver and restart the homeserver")
	case d.listener != nil && pings == 0:
		d.report(statusFail, check, fmt.Sprintf("the homeserver could not reach ferry (%s): nothing arrived at %s:%d", errcodeOf(err), d.cfg.Appservice.Hostname, d.cfg.Appservice.Port),
			"set appservice.address to a URL the homeserver can reach that leads to appservice.hostname:port, run ferry -g and reinstall the registration")
	default:
		d.report(statusFail, check, "the homeserver's ping of "+where+" failed ("+errcodeOf(err)+"): "+err.Error(),
			"check appservice.address in the registration and that ferry answers there; a 403 from ferry means the hs_token differs")
	}
}

func (d *doctor) checkAppserviceMode(ctx context.Context) {
	const check = "appservice-mode encryption"
	if !d.appserviceModeCheck(check, "off (encryption.appservice: false): ferry's devices log in and run /sync") {
		return
	}
	if d.listener == nil {
		d.report(statusSkip, check, "ferry is running: it proves the homeserver's pushes at every start (its log says which path it took)", "")
		return
	}
	// ferry registers the bot at its first start; the probe device needs the account.
	if err := d.as.BotIntent().EnsureRegistered(ctx); err != nil {
		d.report(statusFail, check, "the bot could not be registered ("+errcodeOf(err)+"): "+err.Error(), "see the homeserver's log")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, doctorTimeout+doctorProbeWait)
	defer cancel()
	// A device of the bot's own, created and deleted through the appservice (MSC4190), sends itself a message.
	cli := d.as.NewMautrixClient(d.as.BotMXID())
	cli.DefaultHTTPRetries = 0
	deviceID := id.DeviceID("FERRYDOCTOR" + strings.ToUpper(random.String(8)))
	if err := cli.CreateDeviceMSC4190(ctx, deviceID, "ferry doctor probe"); err != nil {
		d.report(statusFail, check, "the homeserver does not create devices for the appservice (MSC4190): "+errcodeOf(err),
			"on Synapse, install the registration ferry -g wrote with encryption.appservice: true (io.element.msc4190); elsewhere (Dendrite) set encryption.appservice to false")
		return
	}
	cli.DeviceID = deviceID
	defer func() {
		delCtx, delCancel := context.WithTimeout(context.Background(), doctorTimeout)
		defer delCancel()
		// An empty object, not no body: Synapse refuses a DELETE without one (M_BAD_JSON).
		if err := cli.DeleteDevice(delCtx, deviceID, &mautrix.ReqDeleteDevice[any]{}); err != nil {
			fmt.Fprintf(d.out, "%-4s  %s: the probe device %s could not be deleted (%s); delete it as the bot\n", statusWarn, check, deviceID, errcodeOf(err))
		}
	}()
	refusedBefore := d.listener.refusedCount()
	for attempt := 0; attempt < doctorProbeAttempts; attempt++ {
		// The ping makes a homeserver that counted ferry as down deliver again.
		_, _ = d.as.BotClient().AppservicePing(ctx, d.as.Registration.ID, "")
		nonce := random.String(16)
		req := &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{
			d.as.BotMXID(): {deviceID: {Raw: map[string]any{"nonce": nonce}}},
		}}
		if _, err := cli.SendToDevice(ctx, event.Type{Type: doctorProbeType, Class: event.ToDeviceEventType}, req); err != nil {
			d.report(statusFail, check, "the probe device could not send a to-device message: "+errcodeOf(err), "see the homeserver's log")
			return
		}
		deadline := time.Now().Add(doctorProbeWait / doctorProbeAttempts)
		for time.Now().Before(deadline) {
			if seen, ok := d.listener.probe(nonce); ok {
				if !seen.otkCounts && !seen.deviceLists {
					d.report(statusFail, check, "to-device messages are pushed (MSC2409), but no one-time key counts or device lists (MSC3202)",
						"on Synapse set experimental_features.msc3202_transaction_extensions: true, install the registration with org.matrix.msc3202: true and restart Synapse")
					return
				}
				d.report(statusOK, check, "available: MSC4190 devices, to-device pushes (MSC2409), key counts and device lists (MSC3202)", "")
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if d.listener.refusedCount() > refusedBefore {
		// The homeserver retried a transaction of room events the whole time (the doctor refuses those, so that
		// ferry gets them) and sends nothing after it until it goes through: the probe waits behind it.
		d.report(statusWarn, check, "not checked: the homeserver holds room events for the stopped ferry and pushes nothing after them until ferry takes them, the probe included",
			"start ferry (it takes them; its log says which encryption path it took), or stop it again and run ferry doctor")
		return
	}
	d.report(statusFail, check, "the homeserver creates appservice devices but pushed no to-device message to ferry's address within "+doctorProbeWait.String(),
		"on Synapse set experimental_features.msc2409_to_device_messages_enabled and msc3202_transaction_extensions to true, install the registration ferry -g wrote with encryption.appservice: true and restart Synapse; or set encryption.appservice to false")
}

// appserviceModeCheck tells whether a check of appservice-mode encryption can run; if not, it reports why (off
// says what encryption.appservice: false means for it).
func (d *doctor) appserviceModeCheck(check, off string) bool {
	switch {
	case !d.cfg.Encryption.Appservice:
		d.report(statusOK, check, off, "")
		return false
	case d.skipped(check):
		return false
	case !d.tokenValid:
		d.report(statusSkip, check, "needs a working as_token (see above)", "")
		return false
	}
	return true
}

// checkRoomSync: with appservice-mode encryption ferry's bot reads its rooms with a /sync of its own, without a
// device (crypto/roomsync.go), to relay in its place an event whose transaction the homeserver never sends.
func (d *doctor) checkRoomSync(ctx context.Context) {
	const check = "bot's rooms /sync"
	if !d.appserviceModeCheck(check, "not needed: the bot's device runs /sync (encryption.appservice: false)") {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, doctorTimeout)
	defer cancel()
	if err := d.as.BotIntent().EnsureRegistered(ctx); err != nil {
		d.report(statusFail, check, "the bot could not be registered ("+errcodeOf(err)+"): "+err.Error(), "see the homeserver's log")
		return
	}
	cli := d.as.NewMautrixClient(d.as.BotMXID()) // no device_id: it must not take the device's to-device messages
	cli.DefaultHTTPRetries = 0
	// Rooms filtered out: the check asks only whether the homeserver allows it.
	filter := `{"room":{"rooms":[]},"presence":{"not_types":["*"]},"account_data":{"not_types":["*"]}}`
	if _, err := cli.FullSyncRequest(ctx, mautrix.ReqSync{FilterID: filter, SetPresence: event.PresenceOffline}); err != nil {
		d.report(statusFail, check, "the homeserver refuses the bot's /sync without a device ("+errcodeOf(err)+"): ferry would rely on transactions alone, and miss an event whose transaction the homeserver never sends",
			"let the appservice /sync as the users of its namespace (Synapse and Dendrite do), then restart ferry")
		return
	}
	d.report(statusOK, check, "allowed: the bot reads its rooms' order with a /sync of its own, without a device", "")
}

func (d *doctor) checkPower(ctx context.Context) {
	const check = "bot's power"
	switch {
	case d.db == nil:
		d.report(statusSkip, check, "the database cannot be read, so the linked rooms are unknown", "")
		return
	case d.skipped(check):
		return
	case !d.tokenValid:
		d.report(statusSkip, check, "needs a working as_token (see above)", "")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, doctorTimeout)
	defer cancel()
	db := database.New(d.db, dbutil.NoopLogger)
	links, err := db.Links.All(ctx)
	if err != nil {
		d.report(statusSkip, check, "the links cannot be read ("+err.Error()+"); has ferry run on this database yet?", "")
		return
	}
	if len(links) == 0 {
		d.report(statusOK, check, "no linked rooms yet", "")
		return
	}
	bot := d.as.BotClient()
	bot.DefaultHTTPRetries = 0
	for _, link := range links {
		for _, room := range link.Rooms {
			var pl event.PowerLevelsEventContent
			if err := bot.StateEvent(ctx, room, event.StatePowerLevels, "", &pl); err != nil {
				d.report(statusFail, check, fmt.Sprintf("cannot read the power levels of %s (%s): is the bot still in the room?", room, errcodeOf(err)),
					"invite the bot back, or unlink the room with !ferry unlink")
				continue
			}
			have := pl.GetUserLevel(d.as.BotMXID())
			var short []string
			if need := pl.GetEventLevel(event.StateBridge); have < need {
				short = append(short, fmt.Sprintf("room state needs %d", need))
			}
			if need := pl.Invite(); have < need {
				short = append(short, fmt.Sprintf("inviting ghosts needs %d", need))
			}
			if need := pl.Redact(); d.cfg.Bridge.RedactOriginals && have < need {
				short = append(short, fmt.Sprintf("redacting disappearing originals needs %d", need))
			}
			if len(short) > 0 {
				d.report(statusWarn, check, fmt.Sprintf("%d in %s: %s", have, room, strings.Join(short, ", ")),
					fmt.Sprintf("give %s moderator power (50) in the room", d.as.BotMXID()))
				continue
			}
			d.report(statusOK, check, fmt.Sprintf("%d in %s, enough for everything ferry does there", have, room), "")
		}
	}
}
