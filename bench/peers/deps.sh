#!/usr/bin/env bash
# Installs the peers of the side-by-side benchmark (make bench-deps) from
# Debian's packages when missing. Idempotent; quiet when all is there. Not
# part of `make test`: only `make bench` needs these.
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/debian-pkgs.sh bench-deps haproxy nginx libnginx-mod-stream socat iperf3 wrk util-linux procps
