#!/usr/bin/env bash
# Installs what the multi-machine tests start on this machine, when it is missing (Debian's
# packages): Slurm and munge for the Slurm test cluster (tools/slurm/test-cluster.sh), iptables to
# close a node's port in one of its cases, and OpenSSH (server and client) for the ssh host list's
# hosts. CI runs as root; elsewhere this needs sudo.
set -euo pipefail
have() { command -v slurmctld && command -v slurmd && command -v munged && command -v iptables && command -v ssh && test -x /usr/sbin/sshd; } >/dev/null
if have; then exit 0; fi
packages=(slurm-wlm munge iptables openssh-server openssh-client)
if [[ $(id -u) -eq 0 ]]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo -n); else
  echo "ensure-cluster-tools: missing, and this is not root; run: apt-get install -y ${packages[*]}" >&2
  exit 1
fi
echo "ensure-cluster-tools: installing Debian's ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# The packages' services cannot start without an init system (harmless): the tests start their own.
install() { "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2; }
# The package lists are usually fresh (ensure-prometheus.sh updated them): update only if needed.
install || { "${sudo[@]}" apt-get update -qq >&2 && install; } || true
have || {
  echo "ensure-cluster-tools: apt-get install ${packages[*]} did not provide slurmctld, slurmd, munged, iptables, ssh and sshd" >&2
  exit 1
}
