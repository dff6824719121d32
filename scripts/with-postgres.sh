#!/usr/bin/env bash
# Runs a command with FERRY_TEST_PG pointing at a PostgreSQL server: the one already named in FERRY_TEST_PG, else
# a throwaway cluster started here from the installed binaries (initdb/pg_ctl) on a free loopback port and removed
# afterwards. That is the normal path: no server needs to run before, and nothing outside the cluster is touched.
# The throwaway cluster runs with fsync=off (tests only need it to be fast); FERRY_PG_FSYNC=on starts it with
# fsync and synchronous commits on, as benchmarks need. FERRY_PG_SERVER=1 uses a server already answering on
# 127.0.0.1:5432 instead.
#
# `with-postgres.sh --restart [SECONDS]` restarts the throwaway cluster named by FERRY_TEST_PG_DATA and
# FERRY_TEST_PG_CTL (as the user it runs as), keeping it down for SECONDS (default 0) in between: fault tests use
# it to make PostgreSQL go away and come back.
set -euo pipefail

if [ "${1:-}" = --restart ]; then
	: "${FERRY_TEST_PG_DATA:?--restart needs FERRY_TEST_PG_DATA (only a throwaway cluster started by this script can be restarted)}"
	: "${FERRY_TEST_PG_CTL:?--restart needs FERRY_TEST_PG_CTL}"
	down=${2:-0}
	owner=$(stat -c %U "$FERRY_TEST_PG_DATA")
	as=()
	if [ "$(id -un)" != "$owner" ]; then as=(setpriv --reuid="$owner" --regid="$(stat -c %G "$FERRY_TEST_PG_DATA")" --clear-groups); fi
	# -l again: without it the restarted server would write its log to (and hold open) this script's output.
	log="$(dirname "$FERRY_TEST_PG_DATA")/pg.log"
	# The server's options as it was started (postmaster.opts: the binary, then its quoted arguments), minus -D.
	eval "set -- $(cat "$FERRY_TEST_PG_DATA/postmaster.opts")"
	shift
	opts=""
	while [ $# -gt 0 ]; do
		if [ "$1" = -D ]; then shift 2; continue; fi
		opts="$opts $1"
		shift
	done
	"${as[@]}" "$FERRY_TEST_PG_CTL" -D "$FERRY_TEST_PG_DATA" -m fast -w stop >/dev/null
	sleep "$down"
	"${as[@]}" "$FERRY_TEST_PG_CTL" -D "$FERRY_TEST_PG_DATA" -l "$log" -o "$opts" -w start >/dev/null
	exit 0
fi

if [ -n "${FERRY_TEST_PG:-}" ]; then
	exec "$@"
fi

if [ -n "${FERRY_PG_SERVER:-}" ]; then
	export FERRY_TEST_PG="postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	echo "with-postgres: using the PostgreSQL server on 127.0.0.1:5432"
	exec "$@"
fi

bindir=""
for dir in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")" /usr/lib/postgresql/*/bin /usr/local/pgsql/bin; do
	if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then bindir=$dir; break; fi
done
if [ -z "$bindir" ]; then
	echo "with-postgres: no PostgreSQL server answers and no initdb/pg_ctl found: install PostgreSQL (Debian: apt-get install postgresql)" >&2
	exit 1
fi

tmp=$(mktemp -d /tmp/ferry-pg.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 55432)
runas=()
if [ "$(id -u)" = 0 ]; then
	# initdb refuses to run as root: run the throwaway cluster as an unprivileged user.
	id -u nobody >/dev/null 2>&1 || { echo "with-postgres: running as root and no 'nobody' user to run PostgreSQL as" >&2; exit 1; }
	chown nobody "$tmp"
	runas=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
	command -v setpriv >/dev/null || runas=(su nobody -s /bin/sh -c)
fi
run() { if [ ${#runas[@]} -eq 0 ]; then "$@"; elif [ "${runas[0]}" = su ]; then "${runas[@]}" "$*"; else "${runas[@]}" "$@"; fi; }

cleanup() { run "$bindir/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT INT TERM

run "$bindir/initdb" --no-sync -D "$tmp/data" -U postgres --auth=trust -E UTF8 >"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log" >&2; exit 1; }
durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
[ "${FERRY_PG_FSYNC:-off}" = on ] && durability="-c fsync=on -c synchronous_commit=on"
run "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/pg.log" -w -o "-c listen_addresses=127.0.0.1 -p $port -k $tmp -c max_connections=300 $durability" start >/dev/null
export FERRY_TEST_PG="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
export FERRY_TEST_PG_DATA="$tmp/data" FERRY_TEST_PG_CTL="$bindir/pg_ctl"
echo "with-postgres: started a throwaway PostgreSQL on 127.0.0.1:$port (fsync=${FERRY_PG_FSYNC:-off})"
set +e
"$@"
rc=$?
exit $rc
