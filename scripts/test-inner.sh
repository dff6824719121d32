#!/usr/bin/env bash
# Runs with FERRY_TEST_PG set (see with-postgres.sh). FERRY_E2E_HS=dendrite|synapse runs the end-to-end suite on
# one homeserver; by default it runs on both, one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== go test -race (unit + PostgreSQL + SQLite)"
go test -race -count=1 ./...
servers=(${FERRY_E2E_HS:-dendrite synapse})
for hs in "${servers[@]}"; do
	echo "== end-to-end on $hs (ferry + matrix-js-sdk)"
	FERRY_E2E_HS=$hs scripts/e2e.sh
done
