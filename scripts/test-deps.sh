#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: Go modules, and the
# Debian packages the interop tests use. Idempotent; quiet when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use; add here, never in a test.
pkgs=(iproute2 procps haproxy nginx libnginx-mod-stream curl chromium)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [ "$(id -u)" != 0 ]; then
		echo "test-deps: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
go mod download
