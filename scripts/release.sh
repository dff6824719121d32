#!/usr/bin/env bash
# Builds ferry's release binaries (`make release`): ferry and ferry-keycheck for each platform, static
# (CGO_ENABLED=0) with pure-Go Olm (-tags goolm), named <binary>-<version>-<os>-<arch>, plus SHA256SUMS. Then it
# checks what it built: each binary's embedded build settings name its platform, no cgo and the goolm tag, and
# the checksums verify.
#   VERSION (default: git describe), COMMIT, DIST (default dist), RELEASE_PLATFORMS (default "linux/amd64 linux/arm64")
set -euo pipefail
cd "$(dirname "$0")/.."
GO="${GO:-go}"
VERSION="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}"
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
DIST="${DIST:-dist}"
PLATFORMS="${RELEASE_PLATFORMS:-linux/amd64 linux/arm64}"
BINARIES=(ferry ferry-keycheck)

rm -rf "$DIST"
mkdir -p "$DIST"
for platform in $PLATFORMS; do
	os="${platform%/*}"
	arch="${platform#*/}"
	for bin in "${BINARIES[@]}"; do
		out="$DIST/$bin-$VERSION-$os-$arch"
		echo "release: $out"
		CGO_ENABLED=0 GOOS="$os" GOARCH="$arch" GOFLAGS="-tags=goolm -buildvcs=false" \
			"$GO" build -trimpath -ldflags "-s -w -X main.Version=$VERSION -X main.Commit=$COMMIT" -o "$out" "./cmd/$bin"
		settings="$("$GO" version -m "$out")"
		for want in "GOOS=$os" "GOARCH=$arch" "CGO_ENABLED=0" "-tags=goolm"; do
			if ! grep -q -- "build[[:space:]]*$want\$" <<<"$settings"; then
				echo "release: $out was not built with $want" >&2
				exit 1
			fi
		done
	done
done
(cd "$DIST" && sha256sum -- * >SHA256SUMS && sha256sum --quiet -c SHA256SUMS)
echo "release: $DIST/SHA256SUMS"
