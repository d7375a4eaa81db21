#!/usr/bin/env bash
# Installs Debian's Slurm (slurmctld, slurmd, srun/sbatch), munge and iptables when they are
# missing, for the Slurm tests' cluster (tools/slurm/test-cluster.sh; iptables closes a node's port
# in one case). CI runs as root; elsewhere this needs sudo.
set -euo pipefail
have() { command -v slurmctld && command -v slurmd && command -v munged && command -v iptables; } >/dev/null
if have; then exit 0; fi
if [[ $(id -u) -eq 0 ]]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo -n); else
  echo "ensure-slurm: Slurm is not installed and this is not root; run: apt-get install -y slurm-wlm munge iptables" >&2
  exit 1
fi
echo "ensure-slurm: installing Debian's slurm-wlm, munge and iptables" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >&2
# The packages' services cannot start without an init system (harmless): the tests start their own.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends slurm-wlm munge iptables >&2 || true
have || {
  echo "ensure-slurm: apt-get install slurm-wlm munge iptables did not provide slurmctld, slurmd, munged and iptables" >&2
  exit 1
}
