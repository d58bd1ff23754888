#!/usr/bin/env bash
# Runs every Go fuzz target in the module for a fixed time each.
# usage: scripts/fuzz.sh [DURATION]   (default 10s)
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-10s}
found=0
while IFS= read -r f; do
	dir=$(dirname "$f")
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //'); do
		found=$((found + 1))
		echo "fuzz: ./$dir $target for $t"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$t" "./$dir"
	done
done < <(grep -rl --include='*_test.go' '^func Fuzz' . | sort)
echo "fuzz: $found targets run"
