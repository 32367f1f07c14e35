#!/usr/bin/env bash
# CI steps for the Slurm executor's tests (Debian 12, as root). .ci/run calls this.
#
# 1. Install Debian's single-node Slurm (slurmctld, slurmd, slurm-client) unless present.
#    No slurm.conf is written, before or after: the packages' init scripts would start
#    daemons with it. The tests write their own config in a temp dir and start and stop
#    their own daemons (tests/slurm_cluster.py), with auth/none, so munge is not needed
#    (the packages pull it in; it is never started).
# 2. Smoke-check: start a cluster, run one job, stop it (about 4 s).
#
# Not root: says so and exits 0 (the Slurm tests then skip with that reason).
# Install or smoke check failing: exits 1, so CI does not pass without its Slurm tests.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

if [ "$(id -u)" != 0 ]; then
    echo "slurm-steps: not root: Slurm is not installed and its tests will be skipped"
    exit 0
fi

have_slurm() {
    local b
    for b in slurmctld slurmd sbatch squeue scancel scontrol sinfo; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

if have_slurm; then
    echo "slurm-steps: Slurm already installed"
else
    export DEBIAN_FRONTEND=noninteractive
    # 101 = "do not start services from maintainer scripts" (containers have no init).
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
    ok=0
    for attempt in 1 2 3; do
        if timeout 300 apt-get update -qq &&
           timeout 600 apt-get install -y -qq --no-install-recommends \
               slurmctld slurmd slurm-client; then
            ok=1
            break
        fi
        echo "slurm-steps: apt attempt $attempt failed; retrying in 5 s" >&2
        sleep 5
    done
    if [ "$ok" != 1 ] || ! have_slurm; then
        echo "slurm-steps: could not install Slurm" >&2
        exit 1
    fi
fi
echo "slurm-steps: $(slurmctld -V)"

timeout 120 python3 "$root/tests/slurm_cluster.py"
