#!/usr/bin/env bash
# The SLURM daemons and commands the tests bring up as a one-node cluster on loopback (tests/slurm): Debian's
# munge, slurmctld, slurmd and slurm-client, installed as root or through sudo. Idempotent.
set -euo pipefail
needed=(munged slurmctld slurmd sbatch sinfo squeue scontrol)
have_all() { for c in "${needed[@]}"; do command -v "$c" >/dev/null || [ -x "/usr/sbin/$c" ] || return 1; done; }
have_all && exit 0
packages=(munge slurmctld slurmd slurm-client)
if [ "$(id -u)" = 0 ]; then run=(); elif sudo -n true 2>/dev/null; then run=(sudo -n); else
    echo "tools/get_slurm.sh: the SLURM tests need ${packages[*]}; install them as root (apt-get install" \
         "${packages[*]}) and run make test again" >&2
    exit 1
fi
echo "installing ${packages[*]} (the tests start their own one-node cluster; the services are not used)"
export DEBIAN_FRONTEND=noninteractive
"${run[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1 \
    || { "${run[@]}" apt-get update -q >/dev/null && "${run[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; }
# the packages start system services with their default config; the tests use their own daemons
for service in slurmd slurmctld munge; do "${run[@]}" service "$service" stop >/dev/null 2>&1 || true; done
have_all
