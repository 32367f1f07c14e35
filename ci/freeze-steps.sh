#!/usr/bin/env bash
# CI steps for the static binary (issue 3). Called by .ci/run after `make test`:
#     bash ci/freeze-steps.sh
# As root it installs what it needs with apt (build tools: binutils patchelf musl-tools gcc
# libc6-dev patch; tests: busybox-static debootstrap; images: buildah podman runc),
# builds dist/jobd, checks it against the targets, runs the root-filesystem matrix, checks that
# `make dist` is reproducible and runs `make image-test`. Not root: build and measure only.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== freeze: %s (%s)\n' "$*" "$(date +%T)"; }
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -eq 0 ]; then
    step "apt: build, test and image tools"
    need=()
    for pkg in binutils patchelf musl-tools gcc libc6-dev patch file busybox-static debootstrap \
               buildah podman runc bc; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
fi

step "make build"
time make build

step "binary figures (make bench-binary)"
make bench-binary

# The API suite against the binary (tests/conftest.py: JOBD_TEST_IMPL picks the implementation).
step "API suite against dist/jobd"
make .venv/.installed
rc=0
JOBD_TEST_IMPL=binary .venv/bin/python -m pytest tests --ignore=tests/test_rootfs.py || rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || exit "$rc"     # 5: no API tests collected

if [ "$(id -u)" -ne 0 ]; then
    echo "freeze: not root: root-filesystem matrix, reproducibility and image test skipped"
    exit 0
fi

step "root-filesystem matrix (tests/test_rootfs.py)"
.venv/bin/python -m pytest tests/test_rootfs.py

step "make dist-check (two builds, same tarball bytes)"
time make dist-check

step "make image-test"
time make image-test
