#!/usr/bin/env bash
# Runs with FERRY_TEST_PG set (see with-postgres.sh). FERRY_E2E_HS=dendrite|synapse runs the end-to-end suite on
# one homeserver; by default it runs on both, one after the other.
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
for hs in "${servers[@]}"; do
	echo "== end-to-end on $hs (ferry + matrix-js-sdk)"
	FERRY_E2E_HS=$hs scripts/e2e.sh
done
