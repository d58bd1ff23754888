#!/usr/bin/env bash
# Installs the peers of the side-by-side benchmark (make bench-deps) from
# Debian's packages when missing. Idempotent; quiet when all is there. Not
# part of `make test`: only `make bench` needs these.
set -euo pipefail

pkgs=(haproxy nginx libnginx-mod-stream socat iperf3 wrk util-linux procps)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [ "$(id -u)" != 0 ]; then
		echo "bench-deps: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
