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
    for pkg in binutils patchelf musl-tools gcc libc6-dev patch busybox-static debootstrap \
               buildah podman runc bc; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
fi

failed=()
run() {   # run NAME COMMAND...: a failing step is reported at the end; later steps still run
    local name=$1; shift
    step "$name"
    local start=$SECONDS
    if "$@"; then echo "freeze: $name: ok ($((SECONDS - start)) s)"; else
        echo "freeze: $name: FAILED ($((SECONDS - start)) s)"; failed+=("$name"); fi
}
api_suite() {   # 5: no tests collected
    local rc=0
    JOBD_TEST_IMPL=binary .venv/bin/python -m pytest tests --ignore=tests/test_rootfs.py || rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]
}

run "make build" make build
[ -x dist/jobd ] || { echo "freeze: no dist/jobd, nothing more to check"; exit 1; }
# Timing on a shared CI machine is noisy: the figures are shown, a miss only warned about.
run "binary figures (make bench-binary)" bash -c "make bench-binary || echo \"freeze: WARNING: binary out of target (table above)\""
run "test venv" make .venv/.installed
# The API suite against the binary (tests/conftest.py: JOBD_TEST_IMPL picks the implementation).
run "API suite against dist/jobd" api_suite
if [ "$(id -u)" -eq 0 ]; then
    run "root-filesystem matrix (tests/test_rootfs.py)" .venv/bin/python -m pytest tests/test_rootfs.py
    run "make dist-check (two builds, same tarball bytes)" make dist-check
    run "make image-test" make image-test
else
    echo "freeze: not root: root-filesystem matrix, reproducibility and image test skipped"
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf '\nfreeze: FAILED steps: %s\n' "$(IFS=,; echo "${failed[*]}")"
    exit 1
fi
printf '\nfreeze: all steps passed\n'
