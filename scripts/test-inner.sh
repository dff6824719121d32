#!/usr/bin/env bash
# Runs with FERRY_TEST_PG set (see with-postgres.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== go test (unit + PostgreSQL + SQLite)"
go test -count=1 ./...
echo "== end-to-end (Dendrite v0.13.8 + ferry + matrix-js-sdk)"
scripts/e2e.sh
