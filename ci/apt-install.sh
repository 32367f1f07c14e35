#!/usr/bin/env bash
# Install Debian packages with apt, as root; the CI scripts' one way to do it.
#   ci/apt-install.sh [--recommends] PACKAGE...
# Packages already installed are skipped; nothing to install: nothing is done (no
# `apt-get update`). A mirror can fail for a moment: up to 3 attempts, 5 s apart, each
# bounded in time. No service is started from the packages' scripts (containers have no
# init; Slurm's would start daemons). Not root with something missing: says what, exits 1.
set -euo pipefail
options=(--no-install-recommends)
if [ "${1:-}" = --recommends ]; then
    options=()
    shift
fi
need=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "apt-install: missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# 101 = "do not start services from maintainer scripts"
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
echo "apt-install: ${need[*]}"
for attempt in 1 2 3; do
    if timeout 300 apt-get update -qq &&
       timeout 600 apt-get install -y -qq "${options[@]}" "${need[@]}" >/dev/null; then
        exit 0
    fi
    echo "apt-install: attempt $attempt failed; retrying in 5 s" >&2
    dpkg --configure -a >/dev/null 2>&1 || true   # an install cut short leaves dpkg half-done
    sleep 5
done
echo "apt-install: could not install ${need[*]}" >&2
exit 1
