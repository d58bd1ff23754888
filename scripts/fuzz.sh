#!/usr/bin/env bash
# Runs every Go fuzz target in the module for a fixed budget each.
# usage: scripts/fuzz.sh [BUDGET]   (default 200000x: executions; or a duration, 5m)
# make test uses a count: with a duration, Go 1.26 can fail a target with a bare
# "context deadline exceeded" at the deadline, having found nothing
# (go.dev/issue/75804); a count has no deadline to race.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-200000x}
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
