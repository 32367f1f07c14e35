#!/usr/bin/env bash
# Make (once) and cache a Debian bookworm minbase root with python3, for the root-filesystem
# tests and as the local base image of `make image-test`. Root only; needs debootstrap.
#   ci/make-rootfs.sh [DIR]      (default: .cache/rootfs/bookworm under the repo root)
# The mirror is the one in this machine's apt sources (override with DEBIAN_MIRROR).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$repo/.cache/rootfs/bookworm}
packages=python3,python3-venv,libpython3.11,ca-certificates
stamp="$dir.ok"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$packages" ]; then
    echo "$dir"; exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "make-rootfs: must run as root" >&2; exit 1; }
command -v debootstrap >/dev/null || bash "$repo/ci/apt-install.sh" debootstrap
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v security | head -n1)}
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || { echo "make-rootfs: no Debian mirror in the apt sources; set DEBIAN_MIRROR" >&2; exit 1; }
rm -rf "$dir" "$dir.tmp" "$stamp"
mkdir -p "$(dirname "$dir")"
debootstrap --variant=minbase --include="$packages" bookworm "$dir.tmp" "$mirror" >&2 \
    || { echo "make-rootfs: debootstrap failed (log: $dir.tmp/debootstrap/debootstrap.log)" >&2; exit 1; }
rm -rf "$dir.tmp"/var/cache/apt/archives/*.deb "$dir.tmp"/var/lib/apt/lists/*
mv "$dir.tmp" "$dir"
echo "$packages" > "$stamp"
echo "$dir"
