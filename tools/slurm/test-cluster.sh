#!/usr/bin/env bash
# A throwaway Slurm cluster on this machine, for tests and for trying `launch --slurm`: one
# slurmctld and 3 slurmd, each slurmd in a network namespace of its own (its own address, its own
# node name), on a bridge; munge with a key made for the cluster. Needs root, `ip netns`, and
# Debian's slurm-wlm + munge (`apt-get install slurm-wlm munge`).
#
#   tools/slurm/test-cluster.sh up DIR [NODES]   start it; DIR holds its config, state and logs
#   tools/slurm/test-cluster.sh down DIR         stop every daemon and job, remove the namespaces
#   tools/slurm/test-cluster.sh exec DIR CMD...  run CMD where the cluster's commands work
#                                                (sbatch, srun, squeue, scancel, scontrol)
#   tools/slurm/test-cluster.sh on DIR I CMD...  run CMD on node I (in its network namespace)
#   tools/slurm/test-cluster.sh ps DIR           the processes on the nodes besides Slurm's own,
#                                                one "NODE PID COMMAND LINE" each
#
# Node i is named dtnode<i> at 10.214.<k>.<i> (k from the cluster's id, so two clusters do not
# clash); names resolve inside the namespaces through /etc/netns/<ns>/hosts, as `ip netns exec`
# provides. slurm.conf's %n keeps each slurmd's spool, pid and log files apart.
set -euo pipefail

cmd=${1:?usage: test-cluster.sh up|down|exec DIR ...}
dir=${2:?usage: test-cluster.sh up|down|exec DIR ...}
dir=$(realpath -m "$dir")
id=$(printf '%s' "$dir" | cksum | awk '{print $1 % 200 + 20}')
ns=dtsl$id
net=10.214.$id

in_ctl() { ip netns exec "${ns}ctl" env SLURM_CONF="$dir/slurm.conf" "$@"; }

wait_for() { # wait_for SECONDS WHAT CMD...: polls CMD until it succeeds
  local until=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > until)); then echo "test-cluster: $what did not happen in time (logs in $dir)" >&2; return 1; fi
    sleep 0.2
  done
}

up() {
  local nodes=${3:-3}
  mkdir -p "$dir/ctld"
  # munge: a key of its own, a socket of its own (a system munged, if any, is left alone).
  dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chmod 600 "$dir/munge.key"
  munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
  local names=() i
  for ((i = 1; i <= nodes; i++)); do names+=("dtnode$i"); done
  {
    echo "ClusterName=dtrain"
    echo "SlurmctldHost=ctl($net.254)"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$dir/munge.sock"
    echo "CredType=cred/munge"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "StateSaveLocation=$dir/ctld"
    echo "SlurmctldPidFile=$dir/slurmctld.pid"
    echo "SlurmctldLogFile=$dir/slurmctld.log"
    echo "SlurmdSpoolDir=$dir/%n/spool"
    echo "SlurmdPidFile=$dir/%n/slurmd.pid"
    echo "SlurmdLogFile=$dir/%n/slurmd.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "SwitchType=switch/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "ReturnToService=2"
    echo "KillWait=5"
    echo "InactiveLimit=0"
    for ((i = 1; i <= nodes; i++)); do echo "NodeName=dtnode$i NodeAddr=$net.$i CPUs=2 State=UNKNOWN"; done
    echo "PartitionName=debug Nodes=dtnode[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
  } >"$dir/slurm.conf"
  # slurmd loads a cgroup plugin even with proctrack/linuxproc; name the hierarchy mounted here.
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    echo "CgroupPlugin=cgroup/v2" >"$dir/cgroup.conf"
  else
    echo "CgroupPlugin=cgroup/v1" >"$dir/cgroup.conf"
  fi
  local hosts="127.0.0.1 localhost"$'\n'"$net.254 ctl"
  for ((i = 1; i <= nodes; i++)); do hosts+=$'\n'"$net.$i dtnode$i"; done

  ip netns add "${ns}ctl"
  ip -n "${ns}ctl" link add br0 type bridge
  ip -n "${ns}ctl" addr add "$net.254/24" dev br0
  ip -n "${ns}ctl" link set br0 up
  ip -n "${ns}ctl" link set lo up
  mkdir -p "/etc/netns/${ns}ctl"
  echo "$hosts" >"/etc/netns/${ns}ctl/hosts"
  for ((i = 1; i <= nodes; i++)); do
    local n="${ns}n$i"
    ip netns add "$n"
    ip -n "${ns}ctl" link add "p$i" type veth peer name eth0 netns "$n"
    ip -n "${ns}ctl" link set "p$i" master br0
    ip -n "${ns}ctl" link set "p$i" up
    ip -n "$n" addr add "$net.$i/24" dev eth0
    ip -n "$n" link set eth0 up
    ip -n "$n" link set lo up
    mkdir -p "/etc/netns/$n" "$dir/dtnode$i/spool"
    echo "$hosts" >"/etc/netns/$n/hosts"
  done
  # slurmctld checks that its host name is SlurmctldHost's: a UTS namespace gives it that name.
  ip netns exec "${ns}ctl" unshare --uts sh -c "hostname ctl; exec slurmctld -f '$dir/slurm.conf' -i"
  for ((i = 1; i <= nodes; i++)); do
    # Its own host name too (a UTS namespace): what the node's processes see as `hostname`.
    ip netns exec "${ns}n$i" unshare --uts sh -c "hostname dtnode$i; exec slurmd -f '$dir/slurm.conf' -N dtnode$i"
  done
  wait_for 30 "$nodes nodes idle" sh -c "[ \"\$(ip netns exec ${ns}ctl env SLURM_CONF=$dir/slurm.conf sinfo -h -t idle -o %D)\" = $nodes ]"
  echo "test-cluster: $nodes nodes up (SLURM_CONF=$dir/slurm.conf; commands: $0 exec $dir CMD)"
}

down() {
  in_ctl scancel --full --quiet --user=root 2>/dev/null || true
  local f
  for f in "$dir"/dtnode*/slurmd.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.5
  for f in "$dir"/dtnode*/slurmd.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  # Whatever still runs in a node's namespace (a job's step the daemons left) goes too.
  for n in $(ip netns list | awk -v p="$ns" 'index($1, p) == 1 {print $1}'); do
    for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$n"
    rm -rf "/etc/netns/$n"
  done
}

ps_nodes() {
  local n pid cmdline
  for n in $(ip netns list | awk -v p="$ns" 'index($1, p "n") == 1 {print $1}'); do
    for pid in $(ip netns pids "$n" 2>/dev/null); do
      cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
      case "$cmdline" in slurmd* | slurmstepd* | "") continue ;; esac
      echo "dtnode${n#"${ns}n"} $pid $cmdline"
    done
  done
}

case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  exec) shift 2; in_ctl "$@" ;;
  on) node=${3:?usage: test-cluster.sh on DIR I CMD...}; shift 3; ip netns exec "${ns}n$node" "$@" ;;
  ps) ps_nodes ;;
  *) echo "test-cluster.sh: unknown command '$cmd' (up, down, exec, on or ps)" >&2; exit 2 ;;
esac
