#!/usr/bin/env bash
# Runs with FERRY_TEST_PG set (see with-postgres.sh). FERRY_E2E_HS=dendrite|synapse runs the end-to-end suite on
# one homeserver; by default it runs on both, beside each other (FERRY_E2E_SERIAL=1: one after the other).
set -euo pipefail
cd "$(dirname "$0")/.."
# prep_done waits for the end-to-end dependencies test.sh prepares beside the Go tests (FERRY_PREP_STATUS), also
# when this script ends early, so that nothing keeps installing after make test returns.
prep_done() {
	[ -n "${FERRY_PREP_STATUS:-}" ] || return 0
	while [ ! -e "$FERRY_PREP_STATUS" ]; do sleep 1; done
}
trap prep_done EXIT
echo "== go test -race (unit + PostgreSQL + SQLite)"
go test -race -count=1 ./...
if [ -n "${FERRY_PREP_STATUS:-}" ]; then
	echo "== prepare end-to-end dependencies (begun beside the Go tests)"
	prep_done
	cat "$FERRY_PREP_LOG"
	if [ "$(cat "$FERRY_PREP_STATUS")" != 0 ]; then
		echo "preparing the end-to-end dependencies failed" >&2
		exit 1
	fi
fi
servers=(${FERRY_E2E_HS:-dendrite synapse})
if [ ${#servers[@]} -eq 1 ] || [ -n "${FERRY_E2E_SERIAL:-}" ]; then
	for hs in "${servers[@]}"; do
		echo "== end-to-end on $hs (ferry + matrix-js-sdk)"
		FERRY_E2E_HS=$hs scripts/e2e.sh
	done
	exit 0
fi

# The suites run beside each other: each test waits on its homeserver and clients far more than it computes, so
# two suites share the two cores well. Each suite gets its own PostgreSQL cluster when this one is a throwaway
# (the chaos test restarts its cluster, which must not cut off the other suite's tests), and its own output file,
# printed whole when it ends.
out=$(mktemp -d)
for hs in "${servers[@]}"; do
	pg=()
	if [ -n "${FERRY_TEST_PG_DATA:-}" ]; then pg=(env -u FERRY_TEST_PG -u FERRY_TEST_PG_DATA -u FERRY_TEST_PG_CTL scripts/with-postgres.sh); fi
	(
		set +e # a failed suite must still write its status
		FERRY_E2E_HS=$hs "${pg[@]}" scripts/e2e.sh >"$out/$hs.log" 2>&1
		echo $? >"$out/$hs.status"
	) &
done
echo "== end-to-end on ${servers[*]} beside each other (ferry + matrix-js-sdk); each suite's output follows when it ends"
failed=()
left=("${servers[@]}")
while [ ${#left[@]} -gt 0 ]; do
	sleep 2
	still=()
	for hs in "${left[@]}"; do
		if [ -e "$out/$hs.status" ]; then
			echo "== end-to-end on $hs (ferry + matrix-js-sdk)"
			cat "$out/$hs.log"
			[ "$(cat "$out/$hs.status")" = 0 ] || failed+=("$hs")
		else
			still+=("$hs")
		fi
	done
	left=("${still[@]+"${still[@]}"}")
done
wait
rm -rf "$out"
if [ ${#failed[@]} -gt 0 ]; then
	echo "end-to-end failed on: ${failed[*]}" >&2
	exit 1
fi
