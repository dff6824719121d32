#!/usr/bin/env bash
# Manages the Synapse homeserver used by ferry's end-to-end tests and `make demo HS=synapse`.
#
#   scripts/synapse.sh install
#       Installs Synapse 1.163.2 and its dependencies, exactly as pinned with hashes in
#       scripts/synapse/requirements.txt, into a venv under .cache/synapse-1.163.2 (once; does nothing if there).
#   scripts/synapse.sh config DIR [options]
#       Writes DIR/homeserver.yaml (and its log config and signing key) for a test homeserver:
#         --port N              client API on 127.0.0.1:N (default 8008); nothing else listens
#         --server-name NAME    default ferry.test
#         --registration FILE   an appservice registration (repeatable)
#         --shared-secret S     registration_shared_secret (default: random)
#         --postgres URI        a PostgreSQL database (postgres://user@host:port/db) instead of SQLite
#         --no-appservice-encryption
#                               leave out the experimental features appservice-mode encryption needs
#                               (to-device messages and device lists in transactions)
#         --log-level L         default INFO
#   scripts/synapse.sh start DIR    starts Synapse from DIR/homeserver.yaml in the background and waits until its
#                                   client API answers (log in DIR/homeserver.log, pid in DIR/homeserver.pid)
#   scripts/synapse.sh stop DIR     stops it
#   scripts/synapse.sh python       prints the venv's python (run Synapse with: python -m synapse.app.homeserver)
set -euo pipefail

version=1.163.2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.cache/synapse-$version/venv"
python="$venv/bin/python"
requirements="$root/scripts/synapse/requirements.txt"
stamp="$venv/.ferry-installed"

die() { echo "synapse.sh: $*" >&2; exit 1; }

installed() {
	# The stamp holds the requirements' checksum, so a changed pin reinstalls.
	[ -x "$python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(sha256sum "$requirements" | cut -d' ' -f1)" ]
}

install() {
	if installed; then
		echo "synapse.sh: Synapse $version already installed in ${venv#"$root"/}"
		return 0
	fi
	local py=""
	for c in python3.11 python3.12 python3.13 python3.10 python3; do
		if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
			py=$(command -v "$c")
			break
		fi
	done
	[ -n "$py" ] || die "no Python >= 3.10 with the venv module found: install python3 and python3-venv"
	local start
	start=$(date +%s)
	rm -rf "$venv"
	"$py" -m venv "$venv" || die "python -m venv failed (Debian: apt-get install python3-venv)"
	# --no-deps with --require-hashes: exactly the pinned set, nothing resolved at install time.
	if ! "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input --require-hashes --no-deps -r "$requirements"; then
		die "pip install of Synapse $version failed (see above); PyPI must be reachable"
	fi
	"$python" -c 'import synapse, psycopg2; print("synapse", synapse.__version__)' >/dev/null || die "the installed Synapse does not import"
	sha256sum "$requirements" | cut -d' ' -f1 >"$stamp"
	echo "synapse.sh: installed Synapse $version into ${venv#"$root"/} in $(( $(date +%s) - start ))s"
}

# yq: a YAML double-quoted scalar.
yq() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }

config() {
	local dir=${1:?usage: synapse.sh config DIR [options]}
	shift
	local port=8008 server_name=ferry.test secret="" pg="" as_encryption=1 level=INFO
	local regs=()
	while [ $# -gt 0 ]; do
		case "$1" in
		--port) port=$2; shift 2 ;;
		--server-name) server_name=$2; shift 2 ;;
		--registration) regs+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
		--shared-secret) secret=$2; shift 2 ;;
		--postgres) pg=$2; shift 2 ;;
		--no-appservice-encryption) as_encryption=0; shift ;;
		--log-level) level=$2; shift 2 ;;
		*) die "config: unknown option $1" ;;
		esac
	done
	mkdir -p "$dir/media"
	dir=$(cd "$dir" && pwd)
	[ -n "$secret" ] || secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
	local macaroon form
	macaroon=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
	form=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')

	local database
	if [ -n "$pg" ]; then
		# postgres://user[:password]@host:port/dbname[?...]
		local rest=${pg#postgres://}
		rest=${rest#postgresql://}
		rest=${rest%%\?*}
		local auth=${rest%%@*} hostport=${rest#*@}
		local hp=${hostport%%/*} db=${hostport#*/}
		local user=${auth%%:*} password=""
		[ "$auth" != "$user" ] && password=${auth#*:}
		database="database:
  name: psycopg2
  txn_limit: 10000
  args:
    user: $(yq "$user")
    password: $(yq "$password")
    dbname: $(yq "$db")
    host: $(yq "${hp%%:*}")
    port: ${hp##*:}
    cp_min: 1
    cp_max: 10"
	else
		database="database:
  name: sqlite3
  args:
    database: $(yq "$dir/homeserver.db")"
	fi

	local reglist=" []"
	if [ ${#regs[@]} -gt 0 ]; then
		reglist=""
		for r in "${regs[@]}"; do
			[ -f "$r" ] || die "config: appservice registration $r does not exist"
			reglist+=$'\n'"  - $(yq "$r")"
		done
	fi

	local experimental="experimental_features: {}"
	if [ $as_encryption = 1 ]; then
		# What appservice-mode encryption needs on 1.163 (synapse/config/experimental.py): to-device messages
		# in transactions (MSC2409/MSC4203) and device-list changes and one-time key counts (MSC3202). Device
		# creation without login (MSC4190) and the device_id masquerade are per registration, not switched here.
		experimental="experimental_features:
  msc2409_to_device_messages_enabled: true
  msc3202_transaction_extensions: true"
	fi

	# Rate limits loose enough for test users that register, log in, join and send in bursts.
	local loose="{per_second: 1000, burst_count: 1000}"
	cat >"$dir/homeserver.yaml" <<EOF
# Generated by scripts/synapse.sh for ferry's tests: loopback only, no federation, loose rate limits.
server_name: $(yq "$server_name")
pid_file: $(yq "$dir/homeserver.pid")
public_baseurl: "http://127.0.0.1:$port/"
listeners:
  - port: $port
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
$database
log_config: $(yq "$dir/log.config")
media_store_path: $(yq "$dir/media")
signing_key_path: $(yq "$dir/signing.key")
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
report_stats: false
enable_metrics: false
url_preview_enabled: false
presence:
  enabled: false
registration_shared_secret: $(yq "$secret")
macaroon_secret_key: $(yq "$macaroon")
form_secret: $(yq "$form")
enable_registration: true
enable_registration_without_verification: true
bcrypt_rounds: 4
app_service_config_files:$reglist
$experimental
rc_message: $loose
rc_registration: $loose
rc_login:
  address: $loose
  account: $loose
  failed_attempts: $loose
rc_joins:
  local: $loose
  remote: $loose
rc_joins_per_room: $loose
rc_invites:
  per_room: $loose
  per_user: $loose
  per_issuer: $loose
rc_key_requests: $loose
rc_admin_redaction: $loose
rc_3pid_validation: $loose
rc_media_create: $loose
rc_room_creation: $loose
rc_delayed_event_mgmt: $loose
rc_reports: $loose
rc_profile: $loose
EOF
	cat >"$dir/log.config" <<EOF
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $(yq "$dir/homeserver.log")
    encoding: utf8
root:
  level: $level
  handlers: [file]
disable_existing_loggers: false
EOF
	if [ ! -f "$dir/signing.key" ]; then
		"$python" -m synapse._scripts.generate_signing_key -o "$dir/signing.key" \
			|| die "config: generating the signing key failed (is Synapse installed? scripts/synapse.sh install)"
	fi
	echo "$dir/homeserver.yaml"
}

port_of() { sed -n 's/^  - port: \([0-9]*\)$/\1/p' "$1/homeserver.yaml" | head -1; }

start() {
	local dir=${1:?usage: synapse.sh start DIR}
	installed || die "Synapse $version is not installed: run scripts/synapse.sh install"
	[ -f "$dir/homeserver.yaml" ] || die "$dir/homeserver.yaml is missing: run scripts/synapse.sh config $dir first"
	dir=$(cd "$dir" && pwd)
	local port
	port=$(port_of "$dir")
	(
		cd "$dir"
		nohup "$python" -m synapse.app.homeserver -c homeserver.yaml >"$dir/homeserver.out" 2>&1 &
		echo $! >"$dir/homeserver.pid.launcher"
	)
	local i
	for i in $(seq 1 600); do
		if curl -fsS -o /dev/null "http://127.0.0.1:$port/_matrix/client/versions" 2>/dev/null; then
			echo "synapse.sh: Synapse answers on http://127.0.0.1:$port"
			return 0
		fi
		if ! kill -0 "$(cat "$dir/homeserver.pid.launcher")" 2>/dev/null; then
			tail -n 20 "$dir/homeserver.out" "$dir/homeserver.log" >&2 2>/dev/null || true
			die "Synapse exited during start-up (logs in $dir)"
		fi
		sleep 0.1
	done
	die "Synapse did not answer on port $port within 60 s (logs in $dir)"
}

stop() {
	local dir=${1:?usage: synapse.sh stop DIR}
	local pidfile="$dir/homeserver.pid.launcher"
	[ -f "$pidfile" ] || { echo "synapse.sh: no Synapse started from $dir"; return 0; }
	local pid
	pid=$(cat "$pidfile")
	if kill "$pid" 2>/dev/null; then
		for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$pid" 2>/dev/null || true
	fi
	rm -f "$pidfile"
	echo "synapse.sh: stopped Synapse ($dir)"
}

case "${1:-}" in
install) install ;;
config) shift; config "$@" ;;
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
python) echo "$python" ;;
*)
	echo "usage: $0 install | config DIR [options] | start DIR | stop DIR | python" >&2
	exit 2
	;;
esac
