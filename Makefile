# ferry's build and test entry points. Every Go command here runs with the goolm tag (mautrix's pure-Go Olm;
# ferry never links libolm): it is set once, below, for all of them.
export GOFLAGS := -tags=goolm -buildvcs=false
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -X main.Version=$(VERSION) -X main.Commit=$(COMMIT)

.PHONY: build test unit e2e chaos demo screenshots bench vet fmt fuzz clean release

# bin/ferry-faultproxy is test kit: the end-to-end tests put it between ferry and the homeserver.
build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ferry ./cmd/ferry
	$(GO) build -o bin/ferry-keycheck ./cmd/ferry-keycheck
	$(GO) build -o bin/ferry-faultproxy ./cmd/ferry-faultproxy

# Versioned, static release binaries of ferry and ferry-keycheck for linux/amd64 and linux/arm64, with SHA-256
# checksums, in dist/ (scripts/release.sh; VERSION=v1.2.3 to name it).
release:
	VERSION=$(VERSION) COMMIT=$(COMMIT) scripts/release.sh

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

# Everything: vet, unit and Postgres tests, then end-to-end tests against Dendrite and matrix-js-sdk.
test:
	scripts/test.sh

# Unit and database tests only (Postgres is started when none answers).
unit:
	scripts/with-postgres.sh $(GO) test -count=1 ./...

# End-to-end tests only.
e2e: build
	scripts/with-postgres.sh scripts/e2e.sh

# The chaos test with 10,000 messages on each homeserver (FERRY_E2E_HS=dendrite|synapse for one): faults both
# ways, ferry SIGKILLed every few seconds, a PostgreSQL and a homeserver restart (`make test` runs it with 1,000).
chaos: build
	scripts/with-postgres.sh scripts/chaos.sh

# A homeserver + ferry on loopback with two linked encrypted rooms; keeps running. HS=synapse (the default:
# it installs from PyPI wheels in about half a minute, where Dendrite compiles for two) or HS=dendrite.
HS ?= synapse
demo: build
	FERRY_E2E_HS=$(HS) scripts/demo.sh

# Real screenshots of a linked conversation in nheko under Xvfb, into docs/screenshots/ (installs what it needs;
# HS=dendrite for Dendrite).
screenshots:
	FERRY_E2E_HS=$(HS) scripts/screenshots.sh

# The relay load tool (see docs/BENCHMARKS.md), then the Go micro-benchmarks.
bench:
	FERRY_PG_FSYNC=on scripts/with-postgres.sh $(GO) run ./cmd/ferry-bench -rate 500,100 $(BENCHFLAGS)
	FERRY_PG_FSYNC=on scripts/with-postgres.sh $(GO) test -run '^$$' -bench . -benchmem ./...

# ferry at scale (issue 17, docs/BENCHMARKS.md "At scale"): ferry's binary on databases seeded with 100, 1,000
# and 10,000 linked pairs (5 ghosts each), on both encryption paths: start-up, memory, idle CPU, database size.
# About 20 minutes; SCALE=100,1000 for a quicker run.
SCALE ?= 100,1000,10000
.PHONY: bench-scale
bench-scale: build
	FERRY_PG_FSYNC=on scripts/with-postgres.sh $(GO) run ./cmd/ferry-bench -scale $(SCALE) -hs-latency 2ms $(BENCHFLAGS)

# Every fuzz target of a parser of outside input, one after the other, each for FUZZTIME (seed corpora in
# <package>/testdata/fuzz/<target>). One worker each: the machine is shared.
FUZZTIME ?= 20s
FUZZ_TARGETS := bridge:FuzzTransaction bridge:FuzzDecryptedEvent bridge:FuzzTranslate bridge:FuzzCallContent \
	bridge:FuzzParseCommand bridge:FuzzParseDisappear bridge:FuzzGhostRoundTrip crypto:FuzzMegolmMessageIndex \
	internal/config:FuzzLoadConfig cmd/ferry:FuzzParseLevel
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t#*:}; \
		echo "fuzz: $$name in ./$$pkg for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -parallel 1 ./$$pkg/; \
	done

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin dist .cache/e2e
