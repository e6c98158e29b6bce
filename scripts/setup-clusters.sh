#!/usr/bin/env bash
# Install the real cluster components the tests use: Open MPI, MPICH, iproute2 (network
# namespaces for multi-node tests), ping, and a one-node SLURM cluster with job accounting
# (scripts/setup-slurm.sh). Debian packages; needs root (CI runs as root).
# Idempotent: packages already present are skipped by apt.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "setup-clusters.sh: not root, so MPI and network namespaces are not installed; the cluster tests will skip" >&2
    exit 0
fi
packages=(openmpi-bin libopenmpi-dev mpich iproute2 iputils-ping)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "cluster components: $(mpirun --version 2>/dev/null | head -1); $(mpirun.mpich --version 2>/dev/null | grep -m1 Version || true)"
# SLURM after MPI: slurmd loads PMIx only if libopenmpi-dev was installed before it started.
bash "$(dirname "$0")/setup-slurm.sh"
