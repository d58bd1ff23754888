# sluice: the two commands a newcomer needs are `make run` and `make test`.
GO      ?= go
BIN     := bin/sluice
# A count, not a duration: with a duration, Go 1.26's fuzz coordinator can fail
# a target with a bare "context deadline exceeded" when the deadline passes while
# a worker is busy (go.dev/issue/75804, fixed in Go 1.27); a count has no deadline.
FUZZTIME ?= 200000x

.PHONY: all build run test test-deps unit integration fuzz soak bench bench-micro bench-peers bench-deps vet man clean

all: build

# The revision for `sluice version`, in case the go command cannot stamp it.
REV := $(shell r=$$(git rev-parse --short=12 HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null && echo $$r || echo $$r-dirty; })

build:
	$(GO) build -ldflags "-X main.buildRev=$(REV)" -o $(BIN) ./cmd/sluice

# Build and start sluice on its built-in demo configuration.
run: build
	./$(BIN) run

# The man page, written by the binary from the help's source (cmd/sluice/help.go,
# rules/options.go); cmd/sluice's TestManPage fails when docs/sluice.1 is not it.
man:
	$(GO) run ./cmd/sluice help man > docs/sluice.1.tmp && mv docs/sluice.1.tmp docs/sluice.1

# Everything CI runs: installs what the tests need, then vet, race-enabled
# tests, and a short run of every fuzz target.
test: test-deps vet unit fuzz

test-deps:
	./scripts/test-deps.sh

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

# Each fuzz target for FUZZTIME executions (or a duration: make fuzz FUZZTIME=5m).
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

# The long forms of the reliability tests (docs/reliability.md): the same
# tests as in make test, in rounds, sharing SOAK between them (make soak
# SOAK=1h). SOAK_TIMEOUT bounds the whole run; raise it with SOAK.
SOAK ?= 10m
SOAK_TIMEOUT ?= 1h
SOAK_TESTS := TestLoadVerified|TestHostileClients|TestFaultBackendDies|TestFaultBackendSilentOrResets|TestFaultSIGTERMUnderLoad|TestFaultCtlKilledAtRandom|TestFaultStaleEventOnReusedFd|TestEMFILEUnderLoad|TestFaultUDPUnderLoad|TestRateTablePastSize|TestMultiClientKilledAtEachStep
soak:
	SLUICE_SOAK=$(SOAK) $(GO) test -race -count=1 -v -timeout $(SOAK_TIMEOUT) -run '^($(SOAK_TESTS))$$' ./test/integration/

# The micro-benchmarks, then sluice side by side with HAProxy, nginx, socat,
# a plain Go proxy and no proxy (bench/peers; about 25 minutes with the
# defaults). Its section of bench/RESULTS.md is rewritten.
bench: bench-micro bench-peers

# Channel micro-benchmarks with allocations.
bench-micro:
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./bench/ ./channel/

# e.g. make bench-peers BENCHFLAGS='--reps 5 --scenarios bulk1,bulk4 --peers haproxy,sluice'
BENCHFLAGS ?= --reps 3 --duration 10s
bench-peers: bench-deps
	$(GO) run ./bench/peers $(BENCHFLAGS)

# The peers of bench/peers, from Debian's packages when missing (not part of make test).
bench-deps:
	./bench/peers/deps.sh

clean:
	rm -rf bin
