#!/usr/bin/env bash
# Manages the Dendrite homeserver binaries used by ferry's end-to-end tests (e2e/).
#   scripts/dendrite.sh install   build dendrite, generate-keys and generate-config v0.13.8 into
#                                 .cache/dendrite-v0.13.8/bin (once; does nothing if they are there)
#   scripts/dendrite.sh bindir    print that directory
set -euo pipefail

version=v0.13.8
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bindir="$root/.cache/dendrite-$version/bin"
tools=(dendrite generate-keys generate-config)

have_all() {
	local t
	for t in "${tools[@]}"; do [ -x "$bindir/$t" ] || return 1; done
}

case "${1:-}" in
install)
	if have_all; then
		echo "dendrite.sh: Dendrite $version already installed in ${bindir#"$root"/}"
		exit 0
	fi
	command -v go >/dev/null 2>&1 || { echo "dendrite.sh: 'go' not found in PATH: install Go to build Dendrite" >&2; exit 1; }
	mkdir -p "$bindir"
	pkgs=()
	for t in "${tools[@]}"; do pkgs+=("github.com/matrix-org/dendrite/cmd/$t@$version"); done
	start=$(date +%s)
	# Dendrite uses SQLite through cgo. Run outside the repo so ferry's go.mod does not get involved.
	if ! (cd / && CGO_ENABLED=1 GOWORK=off GOBIN="$bindir" go install "${pkgs[@]}"); then
		echo "dendrite.sh: go install of Dendrite $version failed (see the output above)" >&2
		exit 1
	fi
	echo "dendrite.sh: built Dendrite $version into ${bindir#"$root"/} in $(( $(date +%s) - start ))s"
	;;
bindir)
	echo "$bindir"
	;;
*)
	echo "usage: $0 install|bindir" >&2
	exit 2
	;;
esac
