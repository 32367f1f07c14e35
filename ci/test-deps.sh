#!/usr/bin/env bash
# What `make test` needs beyond Python, installed with apt when run as root and missing:
# build tools for dist/jobd (ci/install-build-deps.sh), busybox-static and debootstrap for
# the root-filesystem matrix, and Debian's single-node Slurm (ci/slurm-steps.sh).
# Not root: nothing is installed; the root-only tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "test-deps: not root: the root-only tests (root filesystems, Slurm) will be skipped"
    exit 0
fi
bash ci/apt-install.sh busybox-static debootstrap
bash ci/slurm-steps.sh
