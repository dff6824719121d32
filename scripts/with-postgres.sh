#!/usr/bin/env bash
# Runs a command with FERRY_TEST_PG pointing at a PostgreSQL server: the one already named in FERRY_TEST_PG,
# else the one answering on 127.0.0.1:5432, else a throwaway cluster started here from the installed binaries
# (initdb/pg_ctl) on a free loopback port, removed afterwards. FERRY_PG_THROWAWAY=1 forces the throwaway cluster.
set -euo pipefail

if [ -n "${FERRY_TEST_PG:-}" ]; then
	exec "$@"
fi

if [ -z "${FERRY_PG_THROWAWAY:-}" ] && command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 -U postgres 2>/dev/null; then
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

run "$bindir/initdb" -D "$tmp/data" -U postgres --auth=trust -E UTF8 >"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log" >&2; exit 1; }
run "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/pg.log" -w -o "-c listen_addresses=127.0.0.1 -p $port -k $tmp -c fsync=off" start >/dev/null
export FERRY_TEST_PG="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
echo "with-postgres: started a throwaway PostgreSQL on 127.0.0.1:$port"
set +e
"$@"
rc=$?
exit $rc
