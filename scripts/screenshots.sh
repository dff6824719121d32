#!/usr/bin/env bash
# Real screenshots of a linked conversation in a desktop client (nheko), written to docs/screenshots/ (or
# FERRY_SHOTS_DIR): the homeserver FERRY_E2E_HS names (synapse by default, or dendrite) and ferry on 127.0.0.1,
# Alice and Bob talking across two linked encrypted rooms, and each one's nheko session, side by side on an Xvfb
# screen. Installs what it needs: nheko, Xvfb, ImageMagick, xdotool and an emoji font from Debian's packages
# (apt-get, as root or through sudo), the homeserver, Node 22 with matrix-js-sdk, and builds ferry.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nheko xvfb imagemagick xdotool fonts-noto-color-emoji fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	sudo=()
	[ "$(id -u)" = 0 ] || sudo=(sudo)
	echo "screenshots: installing ${missing[*]}" >&2
	"${sudo[@]}" apt-get update -qq
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

export FERRY_E2E_HS="${FERRY_E2E_HS:-synapse}"
case "$FERRY_E2E_HS" in
synapse | dendrite) scripts/$FERRY_E2E_HS.sh install ;;
*) echo "screenshots: FERRY_E2E_HS=$FERRY_E2E_HS: expected synapse or dendrite" >&2; exit 2 ;;
esac
make build
export FERRY_BIN="${FERRY_BIN:-$PWD/bin/ferry}"
exec scripts/node22 e2e/screenshots.js
