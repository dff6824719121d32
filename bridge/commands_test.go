package bridge

import (
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"maunium.net/go/mautrix/id"

	"go.ferry.im/ferry/crypto"
	"go.ferry.im/ferry/database"
)

var (
	_ DeviceReporter      = (*crypto.Machine)(nil)
	_ RecoveryKeyProvider = (*crypto.Machine)(nil)
	_ AdminHelperManager  = (*crypto.Machine)(nil)
	_ TrustFlagger        = (*crypto.Machine)(nil)
)

func TestAdminHelperText(t *testing.T) {
	const helper = id.UserID("@ferrybot-admin:x")
	for name, tc := range map[string]struct {
		s    crypto.AdminHelperStatus
		want []string
	}{
		"removed":          {s: crypto.AdminHelperStatus{UserID: helper, Removed: true, Possible: true}, want: []string{"was removed", "will not create it again"}},
		"exists, idle":     {s: crypto.AdminHelperStatus{UserID: helper, Exists: true, Possible: true}, want: []string{"exists", "It is logged out", "`!ferry admin-helper remove`"}},
		"exists, in use":   {s: crypto.AdminHelperStatus{UserID: helper, Exists: true, Possible: true, LoggedIn: true}, want: []string{"logged in right now"}},
		"possible, absent": {s: crypto.AdminHelperStatus{UserID: helper, Possible: true}, want: []string{"has no admin helper", "only if"}},
		"not needed":       {s: crypto.AdminHelperStatus{UserID: helper}, want: []string{"does not need one here"}},
	} {
		t.Run(name, func(t *testing.T) {
			got := adminHelperText(tc.s, "!ferry admin-helper remove").Plain
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("%q does not contain %q", got, w)
				}
			}
		})
	}
}

func TestParseCommand(t *testing.T) {
	for name, tc := range map[string]struct {
		body       string
		prefix     string
		management bool
		wantOK     bool
		wantName   string
		wantArgs   []string
	}{
		"prefix and command":                 {body: "!ferry link #a:x", prefix: "!ferry", wantOK: true, wantName: "link", wantArgs: []string{"#a:x"}},
		"bare prefix means help":             {body: "!ferry", prefix: "!ferry", wantOK: true, wantName: "help"},
		"bare prefix with spaces":            {body: "  !ferry  \n", prefix: "!ferry", wantOK: true, wantName: "help"},
		"prefix glued to a word":             {body: "!ferryhelp", prefix: "!ferry"},
		"prefix in the middle":               {body: "say !ferry help", prefix: "!ferry"},
		"no prefix outside management":       {body: "help", prefix: "!ferry"},
		"no prefix in management room":       {body: "help", prefix: "!ferry", management: true, wantOK: true, wantName: "help"},
		"prefix in management room":          {body: "!ferry links", prefix: "!ferry", management: true, wantOK: true, wantName: "links"},
		"bare prefix in management room":     {body: "!ferry", prefix: "!ferry", management: true, wantOK: true, wantName: "help"},
		"prefix-like word in management":     {body: "!ferryx status", prefix: "!ferry", management: true, wantOK: true, wantName: "!ferryx", wantArgs: []string{"status"}},
		"empty body":                         {body: "", prefix: "!ferry"},
		"empty body in management room":      {body: "", prefix: "!ferry", management: true},
		"blank body in management room":      {body: " \t\n ", prefix: "!ferry", management: true},
		"extra spaces, tabs and newlines":    {body: "!ferry \t link\n\n  #a:x   ", prefix: "!ferry", wantOK: true, wantName: "link", wantArgs: []string{"#a:x"}},
		"tab after prefix":                   {body: "!ferry\tping", prefix: "!ferry", wantOK: true, wantName: "ping"},
		"non-breaking space after prefix":    {body: "!ferry\u00a0ping", prefix: "!ferry", wantOK: true, wantName: "ping"},
		"command name is lower-cased":        {body: "!ferry LINK #Team:x", prefix: "!ferry", wantOK: true, wantName: "link", wantArgs: []string{"#Team:x"}},
		"prefix in any case":                 {body: "!FERRY Help", prefix: "!ferry", wantOK: true, wantName: "help"},
		"capitalised in management room":     {body: "Status", prefix: "!ferry", management: true, wantOK: true, wantName: "status"},
		"double-quoted argument":             {body: `!ferry help "link"`, prefix: "!ferry", wantOK: true, wantName: "help", wantArgs: []string{"link"}},
		"quoted argument with spaces":        {body: `!ferry x "a b"  c`, prefix: "!ferry", wantOK: true, wantName: "x", wantArgs: []string{"a b", "c"}},
		"single-quoted argument":             {body: `!ferry x 'a b'`, prefix: "!ferry", wantOK: true, wantName: "x", wantArgs: []string{"a b"}},
		"typographic quotes":                 {body: "!ferry x “a b” ‘c d’", prefix: "!ferry", wantOK: true, wantName: "x", wantArgs: []string{"a b", "c d"}},
		"empty quoted argument":              {body: `!ferry x ""`, prefix: "!ferry", wantOK: true, wantName: "x", wantArgs: []string{""}},
		"unterminated quote runs to the end": {body: `!ferry x "a b`, prefix: "!ferry", wantOK: true, wantName: "x", wantArgs: []string{"a b"}},
		"apostrophe inside a word is kept":   {body: `!ferry x don't`, prefix: "!ferry", wantOK: true, wantName: "x", wantArgs: []string{"don't"}},
		"text after closing quote joins":     {body: `!ferry x "a b"c d`, prefix: "!ferry", wantOK: true, wantName: "x", wantArgs: []string{"a bc", "d"}},
		"quoted empty command means help":    {body: `!ferry ""`, prefix: "!ferry", wantOK: true, wantName: "help"},
		"other prefix":                       {body: "?bridge version", prefix: "?bridge", wantOK: true, wantName: "version"},
		"empty prefix matches nothing":       {body: "help", prefix: ""},
		"empty prefix in management room":    {body: "help", prefix: "", management: true, wantOK: true, wantName: "help"},
		"matrix.to argument":                 {body: "!ferry link https://matrix.to/#/#a:x", prefix: "!ferry", wantOK: true, wantName: "link", wantArgs: []string{"https://matrix.to/#/#a:x"}},
	} {
		t.Run(name, func(t *testing.T) {
			gotName, gotArgs, ok := ParseCommand(tc.body, tc.prefix, tc.management)
			if ok != tc.wantOK || gotName != tc.wantName || !slices.Equal(gotArgs, tc.wantArgs) {
				t.Fatalf("ParseCommand(%q, %q, %t) = %q, %q, %t; want %q, %q, %t",
					tc.body, tc.prefix, tc.management, gotName, gotArgs, ok, tc.wantName, tc.wantArgs, tc.wantOK)
			}
		})
	}
}

func TestDispatchCommand(t *testing.T) {
	plain := RoomContext{}
	linked := RoomContext{Linked: true, Encrypted: true}
	mgmt := RoomContext{Management: true, Encrypted: true}
	for name, tc := range map[string]struct {
		body        string
		level       Level
		room        RoomContext
		wantCommand bool
		wantHandler string   // the handler that runs, or ""
		wantRefusal []string // substrings of the refusal's plain body
	}{
		"ordinary message":                 {body: "hello there", level: LevelUser, room: linked},
		"ordinary message from an admin":   {body: "hello", level: LevelAdmin, room: plain},
		"plain text in a management room":  {body: "links", level: LevelUser, room: mgmt, wantCommand: true, wantHandler: "links"},
		"prefix in a management room":      {body: "!ferry links", level: LevelUser, room: mgmt, wantCommand: true, wantHandler: "links"},
		"user links":                       {body: "!ferry link #b:x", level: LevelUser, room: plain, wantCommand: true, wantHandler: "link"},
		"admin links":                      {body: "!ferry link #b:x", level: LevelAdmin, room: plain, wantCommand: true, wantHandler: "link"},
		"relay user links":                 {body: "!ferry link #b:x", level: LevelRelay, room: plain, wantCommand: true, wantRefusal: []string{"`user`", "yours is `relay`"}},
		"relay user asks for help":         {body: "!ferry help", level: LevelRelay, room: linked, wantCommand: true, wantRefusal: []string{"need permission level `user`"}},
		"relay user in a management room":  {body: "help", level: LevelRelay, room: mgmt, wantCommand: true, wantRefusal: []string{"`user`"}},
		"blocked user is ignored":          {body: "!ferry help", level: LevelBlock, room: plain, wantCommand: true},
		"user rotates":                     {body: "!ferry rotate", level: LevelUser, room: linked, wantCommand: true, wantRefusal: []string{"`rotate` needs permission level `admin`; yours is `user`"}},
		"admin rotates":                    {body: "!ferry rotate", level: LevelAdmin, room: linked, wantCommand: true, wantHandler: "rotate"},
		"admin rotates unencrypted room":   {body: "!ferry rotate", level: LevelAdmin, room: plain, wantCommand: true, wantRefusal: []string{"only in an encrypted room"}},
		"user reloads":                     {body: "!ferry reload", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"`admin`"}},
		"admin reloads":                    {body: "!ferry reload", level: LevelAdmin, room: plain, wantCommand: true, wantHandler: "reload"},
		"recovery key outside a DM":        {body: "!ferry recovery-key", level: LevelAdmin, room: linked, wantCommand: true, wantRefusal: []string{"management room"}},
		"recovery key in a DM":             {body: "recovery-key", level: LevelAdmin, room: mgmt, wantCommand: true, wantHandler: "recovery-key"},
		"recovery key for a user":          {body: "recovery-key", level: LevelUser, room: mgmt, wantCommand: true, wantRefusal: []string{"`admin`"}},
		"unlink in an unlinked room":       {body: "!ferry unlink", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"not linked"}},
		"unlink in a linked room":          {body: "!ferry unlink", level: LevelUser, room: linked, wantCommand: true, wantHandler: "unlink"},
		"unknown command":                  {body: "!ferry frobnicate", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"Unknown command `frobnicate`", "`!ferry help`"}},
		"unknown command in a DM":          {body: "frobnicate", level: LevelUser, room: mgmt, wantCommand: true, wantRefusal: []string{"Unknown command `frobnicate`", "Try `help`"}},
		"link without a room":              {body: "!ferry link", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"Usage: `!ferry link <room> [room]`", "Example: `!ferry link #team:example.org`"}},
		"link with two rooms":              {body: "!ferry link #a:x #b:x", level: LevelUser, room: mgmt, wantCommand: true, wantHandler: "link"},
		"link with three rooms":            {body: "!ferry link #a:x #b:x #c:x", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"Usage: `!ferry link <room> [room]`"}},
		"an alias":                         {body: "!ferry approve", level: LevelUser, room: linked, wantCommand: true, wantHandler: "accept"},
		"an alias in a DM":                 {body: "list", level: LevelUser, room: mgmt, wantCommand: true, wantHandler: "links"},
		"a typo":                           {body: "!ferry lnik #b:x", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"Unknown command `lnik`. Did you mean `!ferry link`?", "`!ferry help`"}},
		"a typo of an alias":               {body: "!ferry aprove", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"Did you mean `!ferry accept`?"}},
		"the start of a name":              {body: "stat", level: LevelUser, room: mgmt, wantCommand: true, wantRefusal: []string{"Did you mean `status`?"}},
		"usage without prefix in a DM":     {body: "link", level: LevelUser, room: mgmt, wantCommand: true, wantRefusal: []string{"Usage: `link <room> [room]`"}},
		"ping with an argument":            {body: "!ferry ping now", level: LevelUser, room: plain, wantCommand: true, wantRefusal: []string{"Usage: `!ferry ping`"}},
		"encryption with a subcommand":     {body: "!ferry encryption require", level: LevelUser, room: linked, wantCommand: true, wantHandler: "encryption"},
		"upper-case command":               {body: "!ferry STATUS", level: LevelUser, room: linked, wantCommand: true, wantHandler: "status"},
		"help for a command":               {body: "!ferry help link", level: LevelUser, room: plain, wantCommand: true, wantHandler: "help"},
		"reply-stripped body is a command": {body: "!ferry version", level: LevelUser, room: plain, wantCommand: true, wantHandler: "version"},
	} {
		t.Run(name, func(t *testing.T) {
			res := dispatchCommand(commandTable, commandRequest{Body: tc.body, Prefix: "!ferry", Level: tc.level, Room: tc.room})
			if res.Command != tc.wantCommand {
				t.Fatalf("Command = %t, want %t", res.Command, tc.wantCommand)
			}
			gotHandler := ""
			if res.Handler != nil {
				gotHandler = res.Handler.Name
			}
			if gotHandler != tc.wantHandler {
				t.Fatalf("handler = %q, want %q (refusal %q)", gotHandler, tc.wantHandler, res.Refusal.Plain)
			}
			if len(tc.wantRefusal) == 0 && res.Refusal.Plain != "" {
				t.Fatalf("unexpected refusal %q", res.Refusal.Plain)
			}
			if res.Command && res.Handler == nil && tc.level > LevelBlock && res.Refusal.Plain == "" {
				t.Fatal("a command from a permitted user was dropped without an answer")
			}
			for _, want := range tc.wantRefusal {
				if !strings.Contains(res.Refusal.Plain, want) {
					t.Errorf("refusal %q does not contain %q", res.Refusal.Plain, want)
				}
			}
		})
	}
}

func TestHelpListsWhatTheSenderMayRunHere(t *testing.T) {
	names := func(level Level, room RoomContext) []string {
		var out []string
		for _, h := range visibleCommands(commandTable, level, room) {
			out = append(out, h.Name)
		}
		return out
	}
	everyone := []string{"link", "accept", "reject", "links", "status", "encryption", "help", "devices", "ping", "version"}
	for name, tc := range map[string]struct {
		level Level
		room  RoomContext
		want  []string
	}{
		"block":                     {level: LevelBlock, room: RoomContext{Linked: true}, want: nil},
		"relay":                     {level: LevelRelay, room: RoomContext{Linked: true, Encrypted: true}, want: nil},
		"user, unlinked room":       {level: LevelUser, room: RoomContext{}, want: everyone},
		"user, linked room":         {level: LevelUser, room: RoomContext{Linked: true}, want: []string{"link", "accept", "reject", "unlink", "links", "status", "disappear", "encryption", "help", "devices", "ping", "version"}},
		"user, management room":     {level: LevelUser, room: RoomContext{Management: true, Encrypted: true}, want: everyone},
		"admin, unencrypted room":   {level: LevelAdmin, room: RoomContext{}, want: append(slices.Clone(everyone), "admin-helper", "reload")},
		"admin, linked encrypted":   {level: LevelAdmin, room: RoomContext{Linked: true, Encrypted: true}, want: []string{"link", "accept", "reject", "unlink", "links", "status", "disappear", "encryption", "help", "devices", "ping", "version", "rotate", "admin-helper", "reload"}},
		"admin, management room":    {level: LevelAdmin, room: RoomContext{Management: true, Encrypted: true}, want: append(slices.Clone(everyone), "rotate", "recovery-key", "admin-helper", "reload")},
		"admin, unencrypted direct": {level: LevelAdmin, room: RoomContext{Management: true}, want: append(slices.Clone(everyone), "recovery-key", "admin-helper", "reload")},
	} {
		t.Run(name, func(t *testing.T) {
			if got := names(tc.level, tc.room); !slices.Equal(got, tc.want) {
				t.Fatalf("visible commands = %v, want %v", got, tc.want)
			}
		})
	}

	t.Run("help text has one line per command", func(t *testing.T) {
		room := RoomContext{Linked: true, Encrypted: true}
		user := helpText("!ferry", LevelUser, room)
		admin := helpText("!ferry", LevelAdmin, room)
		if user.Plain == admin.Plain {
			t.Fatal("help is the same for users and admins")
		}
		for _, h := range visibleCommands(commandTable, LevelUser, room) {
			if strings.Count(user.Plain, "\n- `!ferry "+h.line()+"`") != 1 {
				t.Errorf("user help lists %s not exactly once:\n%s", h.Name, user.Plain)
			}
		}
		for _, hidden := range []string{"rotate", "reload", "recovery-key"} {
			if strings.Contains(user.Plain, "`!ferry "+hidden) {
				t.Errorf("user help lists %s:\n%s", hidden, user.Plain)
			}
		}
		if !strings.Contains(admin.Plain, "- `!ferry rotate`") {
			t.Errorf("admin help lacks rotate:\n%s", admin.Plain)
		}
		if !strings.HasPrefix(user.HTML, "Commands you may use here") || !strings.Contains(user.HTML, "<ul><li><code>!ferry help [command]</code>") {
			t.Errorf("help HTML = %s", user.HTML)
		}
		mgmt := helpText("!ferry", LevelUser, RoomContext{Management: true})
		if !strings.Contains(mgmt.Plain, "- `link <room") || strings.Contains(mgmt.Plain, "`!ferry link") {
			t.Errorf("management room help should omit the prefix:\n%s", mgmt.Plain)
		}
	})
}

func TestCommandTable(t *testing.T) {
	seen := map[string]bool{}
	for _, h := range commandTable {
		if seen[h.Name] {
			t.Errorf("command %s listed twice", h.Name)
		}
		seen[h.Name] = true
		if h.Name != strings.ToLower(h.Name) || strings.ContainsAny(h.Name, " \t") {
			t.Errorf("command name %q must be lower case without spaces", h.Name)
		}
		if h.Func == nil || h.Help == "" || h.MinLevel < LevelUser {
			t.Errorf("command %s: needs a handler, a help line and at least level user", h.Name)
		}
		if strings.ContainsAny(h.Help, "`*\n") {
			t.Errorf("command %s: help line %q must be plain text on one line", h.Name, h.Help)
		}
		if h.MaxArgs >= 0 && h.MaxArgs < h.MinArgs {
			t.Errorf("command %s: MaxArgs < MinArgs", h.Name)
		}
	}
}

func TestRenderNotice(t *testing.T) {
	for name, tc := range map[string]struct {
		format    string
		args      []any
		wantPlain string
		wantHTML  string
	}{
		"text":                  {format: "Hello.", wantPlain: "Hello.", wantHTML: "Hello."},
		"code and bold":         {format: "Run `%s` in **%s**.", args: []any{"!ferry help", "Room A"}, wantPlain: "Run `!ferry help` in Room A.", wantHTML: "Run <code>!ferry help</code> in <strong>Room A</strong>."},
		"arguments are escaped": {format: "Room **%s** by %s", args: []any{"<b>x</b> & `y` **z**", "@a:x"}, wantPlain: "Room <b>x</b> & `y` **z** by @a:x", wantHTML: "Room <strong>&lt;b&gt;x&lt;/b&gt; &amp; `y` **z**</strong> by @a:x"},
		"static text escaped":   {format: "a < b & c", wantPlain: "a < b & c", wantHTML: "a &lt; b &amp; c"},
		"numbers keep verbs":    {format: "%d queued, %t, %s", args: []any{3, true, LevelAdmin}, wantPlain: "3 queued, true, admin", wantHTML: "3 queued, true, admin"},
		"lines and a list":      {format: "Head:\n- one\n- `two`\nTail\nEnd", wantPlain: "Head:\n- one\n- `two`\nTail\nEnd", wantHTML: "Head:<ul><li>one</li><li><code>two</code></li></ul>Tail<br>End"},
		"unclosed spans close":  {format: "`open **bold", wantPlain: "`open **bold", wantHTML: "<code>open **bold</code>"},
		"lone star":             {format: "a * b", wantPlain: "a * b", wantHTML: "a * b"},
		"bold outside code":     {format: "**b** `c`", wantPlain: "b `c`", wantHTML: "<strong>b</strong> <code>c</code>"},
	} {
		t.Run(name, func(t *testing.T) {
			got := renderNotice(tc.format, tc.args...)
			if got.Plain != tc.wantPlain || got.HTML != tc.wantHTML {
				t.Fatalf("renderNotice = %q / %q\nwant %q / %q", got.Plain, got.HTML, tc.wantPlain, tc.wantHTML)
			}
		})
	}
	joined := renderNotice("a").join(renderNotice("- b")).join(renderNotice("c"))
	if joined.Plain != "a\n- b\nc" || joined.HTML != "a<ul><li>b</li></ul>c" {
		t.Fatalf("join = %q / %q", joined.Plain, joined.HTML)
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                                     "0s",
		-time.Second:                          "0s",
		1400 * time.Millisecond:               "1s",
		45 * time.Second:                      "45s",
		200 * time.Second:                     "3m 20s",
		2*time.Hour + 5*time.Minute:           "2h 5m",
		76*time.Hour + 30*time.Minute:         "3d 4h",
		24*time.Hour - time.Millisecond:       "1d 0h",
		59*time.Minute + 59*time.Second:       "59m 59s",
		59*time.Second + 600*time.Millisecond: "1m 0s",
	} {
		if got := formatDuration(d); got != want {
			t.Errorf("formatDuration(%s) = %q, want %q", d, got, want)
		}
	}
	now := time.Now()
	if got := formatAge(time.Time{}, now); got != "never" {
		t.Errorf("formatAge(zero) = %q", got)
	}
	if got := formatAge(now.Add(-90*time.Second), now); got != "1m 30s ago" {
		t.Errorf("formatAge(90s) = %q", got)
	}
}

func TestDevicesText(t *testing.T) {
	got := devicesText(crypto.DeviceSummary{BotDeviceID: "ABC", GhostDevices: 2, Mode: crypto.DeviceModePerGhost, ShareMinTrust: crypto.TrustCrossSignedTOFU, ReceiveMinTrust: crypto.TrustUnverified})
	for _, want := range []string{"`ABC`, not cross-signed", "(ghost devices): 2", "`per_ghost`", "at least `cross_signed_tofu`", "at least `unverified`"} {
		if !strings.Contains(got.Plain, want) {
			t.Errorf("devices text lacks %q:\n%s", want, got.Plain)
		}
	}
}

// FuzzParseCommand checks the parser and the dispatcher on arbitrary input: no panics, a lower-case non-empty
// command name, the prefix working in management rooms too, and no handler ever running for a user below its
// level or outside the rooms it needs.
func FuzzParseCommand(f *testing.F) {
	for _, seed := range []struct {
		body, prefix string
		management   bool
		level        uint8
	}{
		{"!ferry help", "!ferry", false, 2},
		{"!ferry link #a:x", "!ferry", false, 2},
		{"links", "!ferry", true, 3},
		{`!ferry x "a b" 'c`, "!ferry", false, 2},
		{"  !FERRY\t\u00a0Status  ", "!ferry", false, 1},
		{"", "!ferry", true, 0},
	} {
		f.Add(seed.body, seed.prefix, seed.management, seed.level)
	}
	f.Fuzz(func(t *testing.T, body, prefix string, management bool, level uint8) {
		name, args, ok := ParseCommand(body, prefix, management)
		if !ok {
			if name != "" || args != nil {
				t.Fatalf("not a command, yet name %q args %q", name, args)
			}
		} else {
			if name == "" || name != strings.ToLower(name) {
				t.Fatalf("command name %q is empty or not lower case", name)
			}
			if utf8.ValidString(body) {
				for _, s := range append([]string{name}, args...) {
					if !utf8.ValidString(s) {
						t.Fatalf("invalid UTF-8 %q from valid input", s)
					}
				}
			}
		}
		if !management {
			mName, mArgs, mOK := ParseCommand(body, prefix, true)
			if ok && (!mOK || mName != name || !reflect.DeepEqual(mArgs, args)) {
				t.Fatalf("prefixed command parsed differently in a management room: %q %q %t vs %q %q", mName, mArgs, mOK, name, args)
			}
		}

		room := RoomContext{Management: management, Linked: level&8 != 0 && !management, Encrypted: level&16 != 0}
		lvl := Level(level % 4)
		res := dispatchCommand(commandTable, commandRequest{Body: body, Prefix: prefix, Level: lvl, Room: room})
		if res.Command != ok {
			t.Fatalf("dispatch Command = %t, parser ok = %t", res.Command, ok)
		}
		if h := res.Handler; h != nil {
			if lvl < h.MinLevel || h.Needs.unmet(room) != "" || len(res.Args) < h.MinArgs || h.MaxArgs >= 0 && len(res.Args) > h.MaxArgs {
				t.Fatalf("handler %s runs for level %s in %+v with %d args", h.Name, lvl, room, len(res.Args))
			}
		} else if ok && lvl > LevelBlock && res.Refusal.Plain == "" {
			t.Fatal("a command from a non-blocked user got neither a handler nor a refusal")
		}
	})
}

func TestQueuedExceptTheCommandItself(t *testing.T) {
	counts := map[database.InboxState]int{database.InboxPending: 3, database.InboxWaitingKeys: 1}
	for name, tc := range map[string]struct {
		room, commandRoom id.RoomID
		want              int
	}{
		"the command's room":   {room: "!a:x", commandRoom: "!a:x", want: 2},
		"another room":         {room: "!b:x", commandRoom: "!a:x", want: 3},
		"all rooms":            {room: "", commandRoom: "!a:x", want: 2},
		"nothing else pending": {room: "!a:x", commandRoom: "!a:x", want: 0},
	} {
		t.Run(name, func(t *testing.T) {
			c := counts
			if tc.want == 0 {
				c = map[database.InboxState]int{database.InboxPending: 0}
			}
			if got := queuedExcept(c, tc.room, tc.commandRoom); got != tc.want {
				t.Fatalf("queuedExcept = %d, want %d", got, tc.want)
			}
		})
	}
}

func TestUnknownCommandNameIsTruncated(t *testing.T) {
	long := strings.Repeat("é", 100)
	res := dispatchCommand(commandTable, commandRequest{Body: long, Prefix: "!ferry", Level: LevelUser, Room: RoomContext{Management: true}})
	if !strings.Contains(res.Refusal.Plain, strings.Repeat("é", maxEchoedName)+"…`") || strings.Contains(res.Refusal.Plain, strings.Repeat("é", maxEchoedName+1)) {
		t.Fatalf("refusal = %q", res.Refusal.Plain)
	}
}
