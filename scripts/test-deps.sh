#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: Go modules, and the
# Debian packages the interop tests use. Idempotent; quiet when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use; add here, never in a test.
./scripts/debian-pkgs.sh test-deps iproute2 procps haproxy nginx libnginx-mod-stream curl openssl chromium prometheus etcd-server groff-base
go mod download
