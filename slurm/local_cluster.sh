#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and CI (needs root).
#
#   bash slurm/local_cluster.sh          # install (if missing), configure, start; idempotent
#   bash slurm/local_cluster.sh stop     # stop the daemons
#
# Installs Debian's slurm-wlm and munge with apt-get when missing, writes a slurm.conf naming
# this host as controller and as the one node (CPUs = this machine's cores), starts munged,
# slurmctld and slurmd, and waits until the node is idle. Exits non-zero, saying why, when it
# cannot: CI must fail loudly rather than skip the SLURM tests.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
HOST="$(hostname -s)"
# The machine's CPUs: plain `nproc` honours OMP_NUM_THREADS (1 in many HPC shells), which would
# make a 1-CPU node on which every 2-rank job pends forever.
CPUS="${DISTFT_SLURM_CPUS:-$(nproc --all 2>/dev/null || getconf _NPROCESSORS_ONLN)}"

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

stop() {
  for d in slurmd slurmctld munged; do
    local pid
    pid="$(cat "/run/distft-$d.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" && say "stopped $d ($pid)"; fi
  done
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || die "run as root (apt-get and the daemons need it)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  say "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
fi

# --- munge: a key, then the daemon (as root: there is no munge service manager here).
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown -R root:root /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  munged --force --pid-file=/run/distft-munged.pid 2>/dev/null \
    || munged --force || die "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
  pgrep -xo munged > /run/distft-munged.pid || true
fi

# --- slurm.conf: this host is controller and the one node.
mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
MEM_MB="$(awk '/MemTotal/ {print int($2/1024*0.9)}' /proc/meminfo)"
CONF="$(cat <<EOF
# Written by distft slurm/local_cluster.sh: a single-node cluster for tests.
ClusterName=distft
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/distft-slurmctld.pid
SlurmdPidFile=/run/distft-slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
# Requeued jobs wait this long before they may start again (tests release them at once).
OverTimeLimit=0
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)"
if [ "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null || true)" != "$CONF" ]; then
  echo "$CONF" > "$CONF_DIR/slurm.conf"
  changed=1
else
  changed=0
fi

running() { local pid; pid="$(cat "/run/distft-$1.pid" 2>/dev/null || true)"; [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

if [ "$changed" = 1 ] && { running slurmctld || running slurmd; }; then
  say "slurm.conf changed: restarting the daemons"
  for d in slurmd slurmctld; do running "$d" && kill "$(cat "/run/distft-$d.pid")"; done
  sleep 2
fi
running slurmctld || slurmctld -i || die "slurmctld did not start (see $LOGS/slurmctld.log)"
running slurmd || slurmd -N "$HOST" || die "slurmd did not start (see $LOGS/slurmd.log)"

for _ in $(seq 60); do
  state="$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mixed|allocated|completing) say "ready: node $HOST ($CPUS CPUs) is $state"; exit 0 ;;
    down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
die "the node did not become idle in 60 s (state: ${state:-unknown})"
