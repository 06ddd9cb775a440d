#!/usr/bin/env bash
# A real single-node SLURM (munged + slurmctld + slurmd on this host) from
# Debian 12 packages, for dask-annot's SLURM tests and for trying the deploy/
# examples on a laptop. Run as root; no systemd, cgroups or accounting needed.
#
#   bash deploy/slurm-local.sh install  # only install the Debian packages (what scripts/test-prereqs.sh runs)
#   bash deploy/slurm-local.sh start    # install if missing, configure, start, wait until the node takes jobs
#   bash deploy/slurm-local.sh status   # daemons, sinfo, squeue
#   bash deploy/slurm-local.sh stop     # cancel jobs, stop the three daemons (by PID file)
#   bash deploy/slurm-local.sh restart  # stop, rewrite the config, start
#
# Idempotent. `start` leaves a cluster that already answers and has a usable
# node alone (whoever started it and whatever its config), so it can run
# before every test session; `restart` rewrites our config.
#
# Environment:
#   DASK_ANNOT_SLURM_CPUS       CPUs the node advertises (default: nproc; may exceed it)
#   DASK_ANNOT_SLURM_MEM_MB     node RealMemory (default: 80% of MemTotal)
#   DASK_ANNOT_SLURM_PARTITION  partition name (default: debug)
#   DASK_ANNOT_SLURM_WAIT       seconds to wait for the node (default: 90)
set -euo pipefail

action="${1:-start}"
node="$(hostname -s)"
# (nproc obeys OMP_NUM_THREADS, which Dask and BLAS users often set to 1: ignore it here)
cpus="${DASK_ANNOT_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
partition="${DASK_ANNOT_SLURM_PARTITION:-debug}"
wait_s="${DASK_ANNOT_SLURM_WAIT:-90}"
mem_mb="${DASK_ANNOT_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 * 0.8 / 1024)}' /proc/meminfo)}"

conf=/etc/slurm/slurm.conf
ctld_pidfile=/run/slurmctld.pid
slurmd_pidfile=/run/slurmd.pid
munge_pidfile=/run/munge/munged.pid
munge_key=/etc/munge/munge.key
logs=/var/log/slurm

say() { printf '[deploy/slurm-local] %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

# A PID counts as alive unless /proc says it is gone or a zombie: in some
# sandboxes `kill -0` still succeeds for a while on a daemon that has exited.
alive_pid() {
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}
alive() { [[ -s "$1" ]] && alive_pid "$(<"$1")"; }

stop_daemon() {  # stop_daemon NAME PIDFILE: TERM, wait up to 10 s, then KILL
  local name="$1" pidfile="$2" pid
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  pid="$(<"$pidfile")"
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive_pid "$pid" || break; sleep 0.2; done
  if alive_pid "$pid"; then say "$name still running, SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}

install_if_missing() {
  local missing=0 cmd
  for cmd in slurmctld slurmd sbatch squeue munged mungekey; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing=1
  done
  [[ "$missing" -eq 0 ]] && return 0
  say "installing slurmctld slurmd slurm-client munge from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Without recommends (no PMIx): slurmd logs a harmless "can not load PMIx" at start.
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s "$munge_key" ]]; then
    say "creating $munge_key"
    mungekey --create --keyfile="$munge_key" 2>/dev/null \
      || head -c 1024 /dev/urandom >"$munge_key"
  fi
  # munged refuses keys and directories that are not its own or are group/world writable
  chown munge:munge /etc/munge "$munge_key" /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge
  chmod 0400 "$munge_key"
  chmod 0755 /run/munge
  if alive "$munge_pidfile" && munge_works; then return 0; fi
  rm -f "$munge_pidfile"
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_works && return 0; sleep 0.2; done
  fail "munged did not answer; see /var/log/munge/munged.log"
}

write_config() {
  mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$logs"
  cat >"$conf" <<EOF
# Written by dask-annot deploy/slurm-local.sh: one node ($node), for tests and trials.
ClusterName=dask-annot-local
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$ctld_pidfile
SlurmdPidFile=$slurmd_pidfile
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Containers and sandboxes have no usable cgroups: track job processes through
# /proc and do not bind tasks to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No accounting database.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
# Take the node's CPUs and memory from this file even when they exceed the hardware.
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks for no memory gets this much per CPU instead of the whole node.
DefMemPerCPU=1024
KillWait=5
InactiveLimit=0
MinJobAge=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$partition Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  say "wrote $conf (node $node: $cpus CPUs, $mem_mb MB, partition $partition)"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

# 0 when slurmctld answers and the node can take jobs.
usable() {
  scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

wait_for_node() {
  local deadline=$((SECONDS + wait_s)) state resumed=0
  while ((SECONDS < deadline)); do
    state="$(node_state || true)"
    case "$state" in
      idle|mixed|allocated|completing) say "node $node is $state"; return 0 ;;
      down*|drain*)
        if ((resumed == 0)); then
          say "node $node is $state: resuming it"
          scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
          resumed=1
        fi ;;
    esac
    sleep 1
  done
  scontrol show node >&2 || true
  tail -n 30 "$logs/slurmctld.log" "$logs/slurmd.log" >&2 || true
  fail "node $node is '${state:-unknown}' after ${wait_s}s"
}

start() {
  install_if_missing
  start_munge
  if alive "$ctld_pidfile" && alive "$slurmd_pidfile" && usable; then
    say "already running: node $node is $(node_state)"
    return 0
  fi
  [[ -f "$conf" ]] && alive "$ctld_pidfile" || write_config
  if ! alive "$ctld_pidfile"; then
    rm -f "$ctld_pidfile"
    say "starting slurmctld"
    # slurmctld refuses state saved under another ClusterName (e.g. by another
    # single-node setup script); -c discards that state anyway.
    rm -f /var/lib/slurm/slurmctld/clustername
    /usr/sbin/slurmctld -c   # -c: forget jobs and node states of an earlier run
  fi
  if ! alive "$slurmd_pidfile"; then
    rm -f "$slurmd_pidfile"
    say "starting slurmd"
    /usr/sbin/slurmd
  fi
  wait_for_node
}

stop() {
  if alive "$ctld_pidfile"; then
    local jobs
    jobs="$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 40); do [[ -z "$(squeue -h -o '%i' 2>/dev/null)" ]] && break; sleep 0.25; done
    fi
  fi
  stop_daemon slurmd "$slurmd_pidfile"
  stop_daemon slurmctld "$ctld_pidfile"
  stop_daemon munged "$munge_pidfile"
  # so that a SLURM configured under another ClusterName can start here next
  rm -f /var/lib/slurm/slurmctld/clustername
}

status() {
  local pair
  for pair in "munged:$munge_pidfile" "slurmctld:$ctld_pidfile" "slurmd:$slurmd_pidfile"; do
    if alive "${pair#*:}"; then echo "${pair%%:*}: running (pid $(<"${pair#*:}"))"; else echo "${pair%%:*}: stopped"; fi
  done
  if alive "$ctld_pidfile"; then sinfo; squeue; fi
}

[[ "$(id -u)" -eq 0 ]] || fail "run as root (it installs packages and starts system daemons)"
case "$action" in
  install) install_if_missing ;;
  start) start ;;
  stop) stop ;;
  restart) stop; write_config; start ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|restart|status" >&2; exit 2 ;;
esac
