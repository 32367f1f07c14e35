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
    bash "$here/apt-install.sh" slurmctld slurmd slurm-client
    have_slurm || { echo "slurm-steps: could not install Slurm" >&2; exit 1; }
fi
echo "slurm-steps: $(slurmctld -V)"

timeout 120 python3 "$root/tests/slurm_cluster.py"
