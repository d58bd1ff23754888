#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are missing.
# Idempotent; quiet when all are there. Needs root only when one is missing.
# usage: scripts/debian-pkgs.sh WHO PKG...   (WHO names the caller in errors)
set -euo pipefail
who=$1
shift
missing=()
for p in "$@"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [ "$(id -u)" != 0 ]; then
		echo "$who: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
