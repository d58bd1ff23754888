# sluice: the two commands a newcomer needs are `make run` and `make test`.
GO      ?= go
BIN     := bin/sluice
FUZZTIME ?= 10s

.PHONY: all build run test test-deps unit integration fuzz bench vet clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/sluice

# Build and start sluice on its built-in demo configuration.
run: build
	./$(BIN) run

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

# Each fuzz target for FUZZTIME (make fuzz FUZZTIME=5m for a longer run).
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

# Channel micro-benchmarks with allocations.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./bench/ ./channel/

clean:
	rm -rf bin
