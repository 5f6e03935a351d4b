#!/usr/bin/env bash
# A real one-node SLURM cluster for tests: `tests/slurm_cluster.sh start|stop|status`.
# Installs Debian's slurm-wlm and munge when missing (root), two fake GPUs as GRES on
# /dev/zero and /dev/full (SLURM then sets CUDA_VISIBLE_DEVICES per job), no accounting DB.
set -euo pipefail
STATE=${SLURM_TEST_STATE:-/tmp/crce-slurm}
PARTITION=${SLURM_TEST_PARTITION:-debug}

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  mkdir -p "$STATE"/{spool,ctld,log} /etc/munge /run/munge /var/log/munge /etc/slurm
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" || /usr/sbin/munged --force
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=crce-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/ctld
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  cat > /etc/slurm/gres.conf <<CONF
NodeName=$host Name=gpu File=/dev/zero
NodeName=$host Name=gpu File=/dev/full
CONF
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -c
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -c
  for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "SLURM up: $(sinfo -h -o '%P %D %T %c %G')"
      return 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "SLURM did not come up" >&2
  tail -20 "$STATE"/log/*.log >&2 || true
  return 1
}

stop() {
  # slurmctld saves its state on SIGTERM, so wait for the daemons to exit before removing
  # the state directory (removing it under a live slurmctld races with that save).
  local daemon
  for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null || true
  done
  for _ in $(seq 30); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
    sleep 1
  done
  pkill -9 -x slurmd 2>/dev/null || true
  pkill -9 -x slurmctld 2>/dev/null || true
  for _ in $(seq 5); do
    rm -rf "$STATE" 2>/dev/null && return 0
    sleep 1
  done
  echo "WARNING: could not remove $STATE" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
