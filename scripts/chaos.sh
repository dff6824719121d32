#!/usr/bin/env bash
# `make chaos`: the chaos test (e2e/tests/95-chaos.test.js) with FERRY_CHAOS_MESSAGES messages (default 10,000) on
# each homeserver in FERRY_E2E_HS (default both), one after the other. Needs FERRY_TEST_PG (with-postgres.sh)
# and a built bin/.
set -euo pipefail
cd "$(dirname "$0")/.."
export FERRY_BIN="${FERRY_BIN:-$PWD/bin/ferry}"
export FERRY_CHAOS_MESSAGES="${FERRY_CHAOS_MESSAGES:-10000}" # FERRY_CHAOS_MESSAGES=1000 make chaos: a quick run
export FERRY_CHAOS_WAIT_MS="${FERRY_CHAOS_WAIT_MS:-1800000}"
servers=(${FERRY_E2E_HS:-dendrite synapse})
for hs in "${servers[@]}"; do
	echo "== chaos on $hs: $FERRY_CHAOS_MESSAGES messages"
	FERRY_E2E_HS=$hs scripts/node22 --test --test-concurrency=1 --test-timeout=7200000 e2e/tests/95-chaos.test.js
done
