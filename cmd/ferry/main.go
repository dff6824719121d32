// Command ferry is a Matrix application service that links rooms and relays end-to-end encrypted chats and
// call signaling between them. This file is the only place that reads flags or exits.
package main

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"syscall"
	"time"

	"github.com/lib/pq"
	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	_ "go.mau.fi/util/dbutil/litestream" // registers the sqlite3-fk-wal driver
	"go.mau.fi/util/random"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"go.ferry.im/ferry"
	"go.ferry.im/ferry/bridge"
	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
	"go.ferry.im/ferry/internal/config"
	"go.ferry.im/ferry/internal/metrics"
)

// Set at build time with -ldflags "-X main.Version=... -X main.Commit=...".
var (
	Version = "0.1.0-dev"
	Commit  = "unknown"
)

// The crypto layer implements what the relay declares, including the optional interfaces the relay detects with a
// type assertion at run time: a method renamed on one side would silently switch a feature off, so pin them here.
var (
	_ bridge.Crypto              = (*crypto.Machine)(nil)
	_ bridge.SenderPreparer      = (*crypto.Machine)(nil)
	_ bridge.TrustFlagger        = (*crypto.Machine)(nil)
	_ bridge.KeyDestroyer        = (*crypto.Machine)(nil)
	_ bridge.OwnDecrypter        = (*crypto.Machine)(nil)
	_ bridge.ReplayIndexTaker    = (*crypto.Machine)(nil)
	_ bridge.DeviceReporter      = (*crypto.Machine)(nil)
	_ bridge.RecoveryKeyProvider = (*crypto.Machine)(nil)
	_ bridge.AdminHelperManager  = (*crypto.Machine)(nil)
	_ bridge.ToDeviceHandler     = (*crypto.Machine)(nil)
)

// Exit codes.
const (
	exitOK         = 0
	exitFailure    = 1
	exitConfig     = 2
	exitDatabase   = 3
	exitHomeserver = 4
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) > 0 && args[0] == "doctor" {
		return runDoctor(args[1:], os.Stdout)
	}
	fs := flag.NewFlagSet("ferry", flag.ContinueOnError)
	configPath := fs.String("c", "config.yaml", "path to the config file")
	regPath := fs.String("r", "registration.yaml", "path to the appservice registration file (with -g)")
	generate := fs.Bool("g", false, "write the appservice registration and exit")
	example := fs.Bool("e", false, "write the example config to the -c path and exit")
	version := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: ferry [-c config.yaml] [-e | -g [-r registration.yaml] | -version]\n       ferry doctor -c config.yaml [-r registration.yaml]   (check the set-up, one line per finding)")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	switch {
	case *version:
		fmt.Printf("ferry %s (commit %s)\n", Version, Commit)
		return exitOK
	case *example:
		if _, err := os.Stat(*configPath); err == nil {
			fmt.Fprintf(os.Stderr, "ferry: %s already exists; not overwriting it\n", *configPath)
			return exitConfig
		}
		if err := config.WriteFileAtomic(*configPath, ferry.ExampleConfig, 0600); err != nil {
			fmt.Fprintf(os.Stderr, "ferry: %v\n", err)
			return exitFailure
		}
		fmt.Printf("Wrote the example config to %s: edit it, then run ferry -g -c %s -r registration.yaml\n", *configPath, *configPath)
		return exitOK
	}
	var upgrade config.Upgrade
	var upgradeErr error
	if !*generate {
		// A config written by an older ferry is brought up to the current layout before it is read. A file
		// that does not load is left alone (Load names its problem below); one that loads but cannot be
		// rewritten still runs, with a warning once logging is up.
		upgrade, upgradeErr = config.UpgradeFile(*configPath)
	}
	cfg, err := config.Load(*configPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry: %v\n", err)
		return exitConfig
	}
	if *generate {
		if err = generateRegistration(cfg, *configPath, *regPath); err != nil {
			fmt.Fprintf(os.Stderr, "ferry: %v\n", err)
			return exitFailure
		}
		fmt.Printf("Wrote the appservice registration to %s and its tokens to %s. Register it with your homeserver, then start ferry.\n", *regPath, *configPath)
		return exitOK
	}
	if err = cfg.ValidateForRun(); err != nil {
		fmt.Fprintf(os.Stderr, "ferry: %v\n", err)
		return exitConfig
	}
	if cfg.Encryption.PickleKey == crypto.PickleKeyGenerate {
		cfg.Encryption.PickleKey = random.String(64)
		if err = config.WriteValues(*configPath, map[string]string{"encryption.pickle_key": cfg.Encryption.PickleKey}); err != nil {
			fmt.Fprintf(os.Stderr, "ferry: failed to save the generated pickle key: %v\n", err)
			return exitConfig
		}
	}
	log, logs, err := newLogger(cfg.Logging)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry: logging: %v\n", err)
		return exitConfig
	}
	defer logs.Close()
	// SIGHUP reopens the log files and reloads the permissions; caught from here on, so it never stops ferry.
	hangups := make(chan os.Signal, 1)
	signal.Notify(hangups, syscall.SIGHUP)
	defer signal.Stop(hangups)
	if upgradeErr != nil {
		log.Warn().Err(upgradeErr).Msg("Failed to upgrade the config file; it loads as it is, but keeps its old layout")
	} else if upgrade.Changed() {
		log.Info().Strs("moved", upgrade.Moved).Strs("added", upgrade.Added).Msg("Upgraded the config file to the current layout")
	}
	for _, name := range config.UnknownEnvOverrides(os.Environ()) {
		log.Warn().Str("variable", name).Msg("Ignoring an environment variable that names no config key")
	}
	bridge.Version = Version
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	code := start(ctx, cfg, *configPath, log, hangups, logs)
	log.Info().Int("exit_code", code).Msg("ferry stopped")
	return code
}

// registrationFor builds the appservice registration that matches the config, as ferry uses it at run time: its
// sender is the bot (every request names the user it acts as). The file -g writes names another sender.
func registrationFor(cfg *config.Config) *appservice.Registration {
	reg := &appservice.Registration{
		ID:              cfg.Appservice.ID,
		URL:             cfg.Appservice.Address,
		AppToken:        cfg.Appservice.ASToken,
		ServerToken:     cfg.Appservice.HSToken,
		SenderLocalpart: cfg.Appservice.Bot.Username,
		RateLimited:     new(false),
	}
	// One exclusive namespace covers the bot and every ghost.
	users := fmt.Sprintf("^@(%s|%s.*):%s$", regexp.QuoteMeta(cfg.Appservice.Bot.Username), regexp.QuoteMeta(cfg.Bridge.GhostPrefix), regexp.QuoteMeta(cfg.Homeserver.Domain))
	reg.Namespaces.UserIDs.Register(regexp.MustCompile(users), true)
	if cfg.Encryption.Appservice {
		reg.EphemeralEvents = true
		reg.SoruEphemeralEvents = true
		reg.MSC3202 = true
		reg.MSC4190 = true
	}
	return reg
}

func generateRegistration(cfg *config.Config, configPath, regPath string) error {
	if cfg.Appservice.ASToken == "" || cfg.Appservice.HSToken == "" {
		cfg.Appservice.ASToken = random.String(64)
		cfg.Appservice.HSToken = random.String(64)
		err := config.WriteValues(configPath, map[string]string{"appservice.as_token": cfg.Appservice.ASToken, "appservice.hs_token": cfg.Appservice.HSToken})
		if err != nil {
			return fmt.Errorf("failed to save tokens to the config: %w", err)
		}
	}
	reg := registrationFor(cfg)
	reg.SenderLocalpart = senderLocalpart(cfg.Appservice.ASToken)
	data, err := reg.YAML()
	if err != nil {
		return err
	}
	return config.WriteFileAtomic(regPath, []byte(data), 0600)
}

// senderLocalpart is the registration's sender_localpart: a user of the appservice's own that ferry never acts as.
// The bot is an ordinary user of the exclusive namespace instead, because Synapse refuses /sync to an
// appservice's sender user, and the bot's device needs a /sync wherever the homeserver does not push to-device
// messages. Derived from the as_token, so regenerating the registration keeps it.
func senderLocalpart(asToken string) string {
	sum := sha256.Sum256([]byte("ferry appservice sender\x00" + asToken))
	return "ferry-as-" + hex.EncodeToString(sum[:12])
}

func start(ctx context.Context, cfg *config.Config, configPath string, log zerolog.Logger, hangups <-chan os.Signal, logs *logFiles) int {
	log.Info().Str("version", Version).Str("commit", Commit).Msg("Starting ferry")
	mcrypto.PostgresArrayWrapper = pq.Array
	dbLog := log.With().Str("component", "database").Logger()
	if !slices.Contains(sql.Drivers(), database.DriverFor(cfg.Database.Type)) {
		// Release binaries are static (no cgo) and carry no SQLite driver.
		log.Error().Str("database_type", cfg.Database.Type).
			Msg("This build of ferry has no driver for database.type (release binaries are built without cgo and support postgres only); use postgres, or build ferry from source with make build")
		return exitDatabase
	}
	if err := database.PrepareFile(cfg.Database.Type, cfg.Database.URI); err != nil {
		log.Error().Err(err).Msg("Failed to create the database file")
		return exitDatabase
	}
	root, err := dbutil.NewFromConfig("ferry", dbutil.Config{PoolConfig: dbutil.PoolConfig{
		Type: database.DriverFor(cfg.Database.Type), URI: database.TuneURI(cfg.Database.Type, cfg.Database.URI), MaxOpenConns: cfg.Database.MaxOpenConns, MaxIdleConns: cfg.Database.MaxIdleConns,
	}}, dbutil.ZeroLogger(dbLog))
	if err != nil {
		log.Error().Err(err).Msg("Failed to open the database")
		return exitDatabase
	}
	defer root.Close()
	db := database.New(root, dbutil.ZeroLogger(dbLog.With().Str("db_section", "ferry").Logger()))
	// A database that is restarting (or not up yet) is waited for; only a definite error stops start-up.
	if err = retryStartup(ctx, log, "upgrade the database", func() error { return db.Upgrade(ctx) }); err != nil {
		if ctx.Err() != nil {
			return exitOK
		}
		log.Error().Err(err).Msg("Database upgrade failed")
		return exitDatabase
	}
	metrics.SetBuildInfo(Version, Commit)
	stopMetrics, err := serveMetrics(cfg.Metrics, db, log)
	if err != nil {
		log.Error().Err(err).Msg("Failed to listen for metrics scrapes")
		return exitConfig
	}
	defer stopMetrics()
	stateStore := sqlstatestore.NewSQLStateStore(root, dbutil.ZeroLogger(dbLog.With().Str("db_section", "state").Logger()), false)
	if err = retryStartup(ctx, log, "upgrade the state store", func() error { return stateStore.Upgrade(ctx) }); err != nil {
		if ctx.Err() != nil {
			return exitOK
		}
		log.Error().Err(database.UpgradeError{Section: "state store", Err: err}).Msg("Database upgrade failed")
		return exitDatabase
	}

	as := appservice.Create()
	// ferry retries failed requests itself (start-up steps, the relay's durable retries, the /sync loop); the
	// crypto layer's client is made below, before bridge.New would turn mautrix's own retries off.
	as.DefaultHTTPRetries = 0
	as.Log = log.With().Str("component", "appservice").Logger()
	as.HomeserverDomain = cfg.Homeserver.Domain
	as.Registration = registrationFor(cfg)
	as.StateStore = stateStore
	as.Host = appservice.HostConfig{Hostname: cfg.Appservice.Hostname, Port: cfg.Appservice.Port}
	if err = as.SetHomeserverURL(cfg.Homeserver.Address); err != nil {
		log.Error().Err(err).Msg("Invalid homeserver.address")
		return exitConfig
	}
	// After SetHomeserverURL, which replaces the HTTP client (a unix: address brings its own transport).
	if as.HTTPClient.Transport == nil {
		as.HTTPClient.Transport = bridge.HomeserverTransport()
	}
	// Every request to the homeserver is counted by endpoint and errcode.
	as.HTTPClient.Transport = metrics.Transport(as.HTTPClient.Transport)

	// The HTTP endpoint starts first so the homeserver can deliver while ferry finishes starting: intake only
	// records events; workers start later.
	mach := crypto.NewMachine(log.With().Str("component", "crypto").Logger(), cfg.Encryption, root, stateStore,
		as.NewMautrixClient(as.BotMXID()), nil)
	br := bridge.New(log.With().Str("component", "bridge").Logger(), &cfg.Bridge, cfg.Permissions, db, as, stateStore, mach)
	mach.SetIsOwn(br.Ghosts.IsOwn)
	// Per-ghost devices: ghost clients come from the appservice, and with a shared secret ferry registers its
	// accounts with passwords (for Dendrite's cross-signing UIA) before the appservice would register them.
	mach.SharedSecret = cfg.Homeserver.RegistrationSharedSecret
	mach.Transient = database.Transient
	mach.RetryWait = bridge.RetryWait
	mach.NewUserClient = as.NewMautrixClient
	as.StateStore = mach.WrapStateStore(stateStore)
	// The reload command re-reads only the permissions; everything else needs a restart.
	br.Reload = func() (bridge.Permissions, error) {
		reloaded, err := config.Load(configPath)
		if err == nil {
			err = reloaded.Validate()
		}
		if err != nil {
			return nil, err
		}
		return reloaded.Permissions, nil
	}
	go handleHangups(ctx, hangups, logs, br, log)
	mach.SessionReceived = br.SessionArrived
	mach.SyncedTimeline = br.IngestSynced
	mach.SyncedEphemeral = br.HandleEphemeral
	// The bot's /sync shows each room's events in the room's order, and pushed events are checked against it:
	// the device's /sync without appservice-mode encryption (Dendrite's path), a rooms-only /sync of the bot user
	// with it (Synapse can leave a transaction unsent: crypto/roomsync.go).
	br.SyncOrders.Store(true)
	mach.RoomSync = true
	mach.RoomSyncRefused = func(error) { br.SyncOrders.Store(false) }
	mach.RoomSyncWanted = br.RoomSyncWanted
	br.WakeRoomSync = mach.WakeRoomSync
	listener, err := net.Listen("tcp", net.JoinHostPort(cfg.Appservice.Hostname, fmt.Sprint(cfg.Appservice.Port)))
	if err != nil {
		log.Error().Err(err).Msg("Failed to listen for the homeserver")
		return exitConfig
	}
	// With appservice-mode encryption the homeserver pushes to-device events, device lists and key counts in
	// transactions; otherwise ferry's devices /sync for them.
	var toDevice bridge.ToDeviceHandler
	if cfg.Encryption.Appservice {
		toDevice = mach
	}
	server := &http.Server{Handler: br.Router(toDevice), ReadHeaderTimeout: 30 * time.Second}
	go func() {
		if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error().Err(err).Msg("HTTP server stopped")
		}
	}()
	log.Info().Str("address", listener.Addr().String()).Msg("Listening for the homeserver")
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdownCtx)
	}()

	path, err := checkHomeserver(ctx, cfg, as, log)
	if err != nil {
		if ctx.Err() != nil {
			return exitOK
		}
		log.Error().Err(err).Msg("Homeserver check failed")
		return exitHomeserver
	}
	// A database restored from a backup is behind what ferry already sent: treat it as after an unclean stop.
	if err = retryStartup(ctx, log, "check whether the database was restored from a backup", func() error {
		return checkRestored(ctx, db, as.BotClient(), log, mach, br)
	}); err != nil {
		if ctx.Err() != nil {
			return exitOK
		}
		log.Error().Err(err).Msg("Failed to check whether the database was restored from a backup")
		return exitDatabase
	}
	if err = retryStartup(ctx, log, "set up encryption", func() error { return mach.Init(ctx) }); err != nil {
		if ctx.Err() != nil {
			return exitOK
		}
		log.Error().Err(err).Msg("Failed to set up encryption")
		return exitHomeserver
	}
	if err = probePushes(ctx, mach, as, db, log); err != nil {
		if ctx.Err() != nil {
			return exitOK
		}
		log.Error().Err(err).Msg("Appservice-mode encryption cannot work with this homeserver")
		return exitHomeserver
	}
	if cfg.Encryption.Appservice && !mach.AppserviceMode() {
		// The homeserver lacks MSC4190 or does not push to-device messages: Init or the probe said so and fell
		// back to logins and /sync.
		path = encryptionPathSync
	}
	br.EncryptionPath = path
	// The rooms-only /sync orders only transactions that do not follow the last one, and idles otherwise
	// (bridge/txngaps.go); the device's /sync orders every pushed event (Dendrite pushes late without a sign).
	br.HoldOnGaps.Store(mach.AppserviceMode())
	mach.Start(ctx)
	defer mach.Stop()
	if err = retryStartup(ctx, log, "start the relay", func() error { return br.Start(ctx) }); err != nil {
		if ctx.Err() != nil {
			return exitOK
		}
		log.Error().Err(err).Msg("Failed to start the relay")
		return exitDatabase
	}
	log.Info().Msg("ferry is ready")
	<-ctx.Done()
	log.Info().Msg("Shutting down")
	br.Stop()
	return exitOK
}

// The encryption paths, as logged and shown by the status command.
const (
	encryptionPathSync       = "login + /sync (m.login.application_service devices, to-device and device lists through /sync)"
	encryptionPathAppservice = "appservice mode (MSC2409 to-device, MSC3202 device lists and key counts, MSC4190 devices)"
)

// checkHomeserver waits for the homeserver (retrying with backoff and saying why), registers the bot, checks
// whoami, pings the appservice link where supported, and reports which encryption path the homeserver allows.
func checkHomeserver(ctx context.Context, cfg *config.Config, as *appservice.AppService, log zerolog.Logger) (string, error) {
	bot := as.BotIntent()
	backoff := startupBackoff
	var versions *mautrix.RespVersions
	// ferry's own loop retries (and logs why); the client's silent internal retries would hide the reason.
	probe := as.NewMautrixClient(as.BotMXID())
	probe.DefaultHTTPRetries = 0
	// /versions needs no user and no token: Synapse refuses to let the appservice act as a user it has not
	// registered yet, and answers any request with a token it does not know M_UNKNOWN_TOKEN (which the register
	// step below reports as what it is, instead of this loop taking it for an unreachable homeserver).
	probe.SetAppServiceUserID = false
	probe.AccessToken = ""
	for {
		var err error
		versions, err = probe.Versions(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		log.Warn().Err(err).Str("homeserver", cfg.Homeserver.Address).Dur("retry_in", backoff).Msg("Homeserver unreachable, retrying")
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, time.Minute)
	}
	if as.SpecVersions != nil {
		*as.SpecVersions = *versions
	}
	// From here on the homeserver answers: rate limits, server errors and lost connections are retried (a busy or
	// restarting homeserver, a proxy in between), and only a definite answer stops start-up.
	if err := retryStartup(ctx, log, "register the bot", func() error { return bot.EnsureRegistered(ctx) }); errors.Is(err, mautrix.MUnknownToken) {
		return "", fmt.Errorf("the homeserver does not know ferry's as_token (M_UNKNOWN_TOKEN): install the registration ferry -g wrote "+
			"(its as_token must equal appservice.as_token) in the homeserver's appservice config and restart the homeserver: %w", err)
	} else if err != nil {
		return "", fmt.Errorf("failed to register the bot %s: %w", as.BotMXID(), err)
	}
	var whoami *mautrix.RespWhoami
	err := retryStartup(ctx, log, "whoami", func() (err error) {
		whoami, err = bot.Whoami(ctx)
		return err
	})
	switch {
	case errors.Is(err, mautrix.MUnknownToken):
		return "", fmt.Errorf("the homeserver does not know ferry's as_token (M_UNKNOWN_TOKEN): install the registration ferry -g wrote "+
			"(its as_token must equal appservice.as_token) in the homeserver's appservice config and restart the homeserver: %w", err)
	case errors.Is(err, mautrix.MForbidden):
		return "", fmt.Errorf("the homeserver refused to let ferry's as_token act as the bot %s (M_FORBIDDEN): the installed registration's "+
			"users namespace must cover appservice.bot.username; install the registration ferry -g wrote for this config and restart the homeserver: %w", as.BotMXID(), err)
	case err != nil:
		return "", fmt.Errorf("whoami failed: %w", err)
	case whoami.UserID != as.BotMXID():
		return "", fmt.Errorf("whoami returned %s, expected the bot %s: check appservice.bot.username and the registration", whoami.UserID, as.BotMXID())
	}
	if versions.Supports(mautrix.FeatureAppservicePing) {
		if err = pingUntilReached(ctx, as, log); errors.Is(err, errWrongHSToken) {
			return "", err
		} else if err != nil {
			return "", fmt.Errorf("the homeserver cannot reach ferry at %s: %w", cfg.Appservice.Address, err)
		}
		log.Info().Msg("Homeserver reached ferry through appservice ping")
	} else {
		log.Info().Msg("Homeserver has no appservice ping; skipping the reverse connectivity check")
	}
	if cfg.Appservice.Bot.Displayname != "" {
		if err = bot.SetDisplayName(ctx, cfg.Appservice.Bot.Displayname); err != nil {
			log.Warn().Err(err).Msg("Failed to set the bot's display name")
		}
	}
	if cfg.Appservice.Bot.Avatar != "" {
		if err = bot.SetAvatarURL(ctx, id.ContentURIString(cfg.Appservice.Bot.Avatar).ParseOrIgnore()); err != nil {
			log.Warn().Err(err).Msg("Failed to set the bot's avatar")
		}
	}
	path := encryptionPathSync
	if cfg.Encryption.Appservice {
		// Confirmed (or, without MSC4190, replaced by the /sync path) when the crypto layer creates its devices.
		path = encryptionPathAppservice
	}
	log.Info().Str("encryption_path", path).Stringer("bot", as.BotMXID()).Msg("Homeserver checked")
	return path, nil
}

// startupBackoff is the first wait between start-up retries (the homeserver's reachability, each step of its
// check, the appservice ping); it doubles, up to a minute.
var startupBackoff = time.Second

// retryStartup runs one start-up step until it succeeds or fails definitely: transient failures (rate limits,
// server and gateway errors, lost connections, a database that restarts) are retried with backoff, honouring a
// rate limit's wait, and logged with the step and the reason. It returns the definite error, or the context's.
func retryStartup(ctx context.Context, log zerolog.Logger, step string, fn func() error) error {
	backoff := startupBackoff
	for {
		err := fn()
		if err == nil || ctx.Err() != nil || !bridge.Transient(err) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		wait := bridge.RetryWait(err, backoff)
		log.Warn().Err(err).Str("step", step).Dur("retry_in", wait).Msg("Start-up step failed for now, retrying")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(backoff*2, time.Minute)
	}
}

// errWrongHSToken: the homeserver reached ferry through the ping, and ferry refused its hs_token.
var errWrongHSToken = errors.New("the homeserver reached ferry but presents another hs_token than appservice.hs_token")

// pingAttempts bounds the appservice pings at start: a failed ping is tried again with backoff (1, 2, 4, 8 s),
// since the homeserver's own connection to ferry can fail for a moment (Synapse has answered 502
// M_CONNECTION_FAILED to a ping while ferry was listening); a refusal of the ping itself is not retried.
const pingAttempts = 5

// pingUntilReached asks the homeserver to reach ferry (appservice ping). A ping the homeserver could not deliver
// for a moment (Synapse has answered 502 M_CONNECTION_FAILED while ferry was listening; a proxy in front of ferry
// may fail) is tried again with backoff, pingAttempts times, honouring a rate limit's wait; a refusal of the ping
// itself (M_FORBIDDEN, M_URL_NOT_SET, ferry refusing the homeserver's hs_token) is not.
func pingUntilReached(ctx context.Context, as *appservice.AppService, log zerolog.Logger) error {
	backoff := startupBackoff
	for attempt := 1; ; attempt++ {
		_, err := as.BotIntent().AppservicePing(ctx, as.Registration.ID, "")
		if err == nil {
			return nil
		}
		var httpErr mautrix.HTTPError
		if errors.As(err, &httpErr) && httpErr.RespError != nil && httpErr.RespError.ErrCode == "M_BAD_STATUS" {
			// The homeserver reached ferry, and ferry refused it: its hs_token is not ferry's.
			if status, _ := httpErr.RespError.ExtraData["status"].(float64); status == http.StatusForbidden || status == http.StatusUnauthorized {
				return fmt.Errorf("%w: install the registration ferry -g wrote for this config and restart the homeserver: %w", errWrongHSToken, err)
			}
		}
		definite := errors.As(err, &httpErr) && httpErr.RespError != nil &&
			(httpErr.RespError.ErrCode == mautrix.MForbidden.ErrCode || httpErr.RespError.ErrCode == "M_URL_NOT_SET")
		if definite || attempt == pingAttempts || ctx.Err() != nil {
			return err
		}
		wait := bridge.RetryWait(err, backoff)
		log.Warn().Err(err).Dur("retry_in", wait).Msg("The homeserver could not reach ferry through the appservice ping, retrying")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff *= 2
	}
}

// Push probe timing: the homeserver gets probeAttempts chances of probeWait each to push the probe back.
const (
	probeAttempts = 3
	probeWait     = 10 * time.Second
)

// pushesProvenKey is the kv entry that is "yes" once a push probe came back on this database's homeserver.
const pushesProvenKey = "appservice_pushes_proven"

// keepAppserviceMode tells whether a failed push probe leaves appservice mode on: when the homeserver proved
// before that it pushes what that mode needs, a probe lost now is a transient failure (it was down, or counted
// ferry as down and dropped the probe), not a homeserver without the feature.
func keepAppserviceMode(probeErr error, provenBefore bool) bool {
	return provenBefore && (errors.Is(probeErr, crypto.ErrNoToDevicePushes) || errors.Is(probeErr, crypto.ErrNoKeyCountPushes))
}

// probePushes checks, in appservice mode, that the homeserver pushes to-device messages and key counts to ferry
// (crypto.Machine.ProbePushes), and says how to turn them on when it does not. Before each attempt ferry pings
// the homeserver, which makes Synapse retry delivery at once if it still counts ferry as down (it drops pushes
// until then). Once a probe came back on this database's homeserver, later starts do not wait for it.
func probePushes(ctx context.Context, mach *crypto.Machine, as *appservice.AppService, db *database.Database, log zerolog.Logger) error {
	kick := func(ctx context.Context) {
		if _, err := as.BotIntent().AppservicePing(ctx, as.Registration.ID, ""); err != nil {
			log.Debug().Err(err).Msg("Appservice ping before the push probe failed")
		}
	}
	var proven string
	_ = retryStartup(ctx, log, "read whether pushes were proven", func() (err error) {
		proven, err = db.KV.Get(ctx, pushesProvenKey)
		return err
	})
	if proven == "yes" {
		// Pushes were proven before, so the probe decides nothing: a probe lost now only means the homeserver
		// counts ferry as down for a while (Synapse does after a failed transaction, up to 8.5 min, dropping
		// the probe). It runs beside the relay, so a restart does not wait for it.
		go func() {
			err := mach.ProbePushes(ctx, probeAttempts, probeWait, kick)
			if keepAppserviceMode(err, true) {
				log.Warn().Err(err).Msg("The homeserver did not push the probe back this time, although it did before: keeping appservice-mode " +
					"encryption (a homeserver drops pushes while it counts ferry as down, and resumes once a transaction goes through)")
			} else if err != nil && ctx.Err() == nil {
				log.Debug().Err(err).Msg("The push probe failed")
			}
		}()
		return nil
	}
	// Sending the probe can fail for a moment like any request; a probe that does not come back is the answer.
	var err error
	if serr := retryStartup(ctx, log, "push probe", func() error {
		err = mach.ProbePushes(ctx, probeAttempts, probeWait, kick)
		if errors.Is(err, crypto.ErrNoToDevicePushes) || errors.Is(err, crypto.ErrNoKeyCountPushes) {
			return nil
		}
		return err
	}); serr != nil {
		return serr
	}
	if err == nil && mach.AppserviceMode() {
		_ = retryStartup(ctx, log, "record that pushes were proven", func() error { return db.KV.Set(ctx, pushesProvenKey, "yes") })
	}
	var fix string
	switch {
	case errors.Is(err, crypto.ErrNoToDevicePushes):
		fix = "on Synapse set experimental_features.msc2409_to_device_messages_enabled and msc3202_transaction_extensions to true in " +
			"homeserver.yaml, install the registration ferry -g wrote with encryption.appservice: true (receive_ephemeral, org.matrix.msc3202), " +
			"and restart Synapse"
	case errors.Is(err, crypto.ErrNoKeyCountPushes):
		fix = "on Synapse set experimental_features.msc3202_transaction_extensions: true in homeserver.yaml, install the registration " +
			"ferry -g wrote with encryption.appservice: true (org.matrix.msc3202: true), and restart Synapse"
	case err != nil:
		return err
	default:
		if mach.AppserviceMode() {
			log.Info().Msg("The homeserver pushes to-device messages, device lists and one-time key counts to ferry")
		}
		return nil
	}
	if fallbackErr := mach.FallBackToSync(ctx); fallbackErr != nil {
		return fmt.Errorf("encryption.appservice is true, but %w, and the homeserver refuses the m.login.application_service "+
			"fallback (%w): %s; or set encryption.appservice to false and install a registration written without it", err, fallbackErr, fix)
	}
	log.Warn().Msgf("encryption.appservice is true, but %v: falling back to m.login.application_service devices with "+
		"to-device and device lists through /sync (%s, or set encryption.appservice to false to silence this)", err, fix)
	return nil
}

// handleHangups answers SIGHUP until ctx ends: the log files are reopened (for log rotation) and the permissions
// re-read from the config file, as the reload command does; everything else in the config needs a restart.
func handleHangups(ctx context.Context, hangups <-chan os.Signal, logs *logFiles, br *bridge.Bridge, log zerolog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hangups:
		}
		if err := logs.Reopen(); err != nil {
			log.Error().Err(err).Msg("Failed to reopen the log files")
		} else {
			log.Info().Msg("Reopened the log files")
		}
		perms, err := br.Reload()
		if err != nil {
			log.Error().Err(err).Msg("Failed to reload the permissions; they are unchanged")
			continue
		}
		br.SetPermissions(perms)
		log.Info().Int("entries", len(perms)).Msg("Permissions reloaded")
	}
}
