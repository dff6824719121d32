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

# The two suites run beside each other: each test waits on its homeserver and clients far more than it computes,
# so two test files at a time share the two cores well. Two workers (e2e-worker.sh) take the files: each starts
# with its own homeserver's and, when done, helps with the other's from its end (where the long chaos test is), so
# both end together. Each worker has its own PostgreSQL cluster when this one is a throwaway (the chaos test
# restarts its cluster, which must not cut off the other worker's test). A line per test file as it ends; each
# suite's whole output in file order at the end.
out=$(mktemp -d)
files=(e2e/tests/*.test.js)
for hs in "${servers[@]}"; do
	for i in "${!files[@]}"; do echo "$i ${files[$i]}"; done >"$out/queue-$hs"
done
pg=()
if [ -n "${FERRY_TEST_PG_DATA:-}" ]; then pg=(env -u FERRY_TEST_PG -u FERRY_TEST_PG_DATA -u FERRY_TEST_PG_CTL scripts/with-postgres.sh); fi
echo "== end-to-end on ${servers[*]}, beside each other (ferry + matrix-js-sdk)"
"${pg[@]}" scripts/e2e-worker.sh "$out" "${servers[1]}" "${servers[0]}" >"$out/worker-1.log" 2>&1 &
w1=$!
"${pg[@]}" scripts/e2e-worker.sh "$out" "${servers[0]}" "${servers[1]}" >"$out/worker-0.log" 2>&1 &
w0=$!
started=$(date +%s)
declare -A shown=()
progress() {
	for status in "$out"/*-*.status; do
		[ -e "$status" ] && [ -z "${shown[$status]:-}" ] || continue
		shown[$status]=1
		local name hs index verdict=ok
		name=${status##*/}
		hs=${name%%-*}
		index=${name#*-}
		index=${index%.status}
		[ "$(cat "$status")" = 0 ] || verdict=FAILED
		printf '  %4ds  %-8s %-40s %s\n' $(($(date +%s) - started)) "$hs" "$(basename "${files[$index]}")" "$verdict"
	done
}
while kill -0 "$w0" 2>/dev/null || kill -0 "$w1" 2>/dev/null; do
	progress
	sleep 2
done
wait "$w0" "$w1" || true
progress
# tally LOG WORD prints the number on the last "# WORD N" line of a test file's TAP output (0 if none).
tally() {
	local n
	n=$(sed -n "s/^# $2 \([0-9]*\)\$/\1/p" "$1" | tail -n 1)
	echo "${n:-0}"
}
failed=()
for hs in "${servers[@]}"; do
	echo "== end-to-end on $hs (ferry + matrix-js-sdk)"
	pass=0 fail=0 skip=0
	for i in "${!files[@]}"; do
		log="$out/$hs-$i.log"
		if [ ! -e "$out/$hs-$i.status" ]; then
			echo "${files[$i]}: not run" >&2
			failed+=("$hs ${files[$i]}")
			continue
		fi
		cat "$log"
		[ "$(cat "$out/$hs-$i.status")" = 0 ] || failed+=("$hs ${files[$i]}")
		pass=$((pass + $(tally "$log" pass)))
		fail=$((fail + $(tally "$log" fail)))
		skip=$((skip + $(tally "$log" skipped)))
	done
	echo "== $hs: $pass pass, $fail fail, $skip skipped"
done
cat "$out"/worker-*.log
rm -rf "$out"
if [ ${#failed[@]} -gt 0 ]; then
	printf 'end-to-end failed: %s\n' "${failed[@]}" >&2
	exit 1
fi
