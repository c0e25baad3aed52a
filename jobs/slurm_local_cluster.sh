#!/usr/bin/env bash
# A throwaway Slurm cluster on this one machine, entirely under DIR: for tests that
# `sbatch jobs/slurm_multiworker.sbatch` against a real slurmctld/slurmd.
#
#   eval "$(jobs/slurm_local_cluster.sh start DIR)"   # prints `export SLURM_CONF=DIR/slurm.conf`
#   jobs/slurm_local_cluster.sh status DIR            # sinfo
#   jobs/slurm_local_cluster.sh stop DIR              # cancels jobs, stops every daemon of DIR
#
# Needs root and Slurm 22.05 + MUNGE (Debian 12: `apt-get install -y slurm-wlm munge`; `start`
# runs that when a tool is missing, unless SLURM_LOCAL_NO_INSTALL=1). Nothing is written to
# /etc: munged, slurmctld and one slurmd per node run as root with their own config, munge
# key and socket, ports, pid files, spool and logs under DIR. The only file outside DIR is
# /tmp/slurm_local_cluster.lock, which serialises port (and subnet) choice, so clusters
# started at the same time in different DIRs never share a port.
#
# Node names are IP addresses, so the names in SLURM_STEP_NODELIST / SLURMD_NODENAME work as
# host names without /etc/hosts (Slurm compresses them: `10.213.7.[1-2]`).
#
# SLURM_LOCAL_NETNS=1 (default): SLURM_LOCAL_NODES (default 2) nodes, one slurmd each. Node 1
#   is this host's network namespace; every other node runs in its own network namespace
#   (bind-mounted on DIR/netns/nodeN), joined to the host by a veth pair on a bridge
#   slc<X>br with subnet 10.213.<X>.0/24 (X picked free). Nodes are named 10.213.<X>.1,
#   10.213.<X>.2, ...: each has its own 0.0.0.0, as on a real cluster, so one task per node
#   can listen on the same port (TensorFlow's gRPC server binds 0.0.0.0:port). Needs ip,
#   unshare and nsenter; adds network interfaces to the host, which `stop` removes.
# SLURM_LOCAL_NETNS=0: every slurmd in this host's namespace, nodes named 127.0.0.1,
#   127.0.0.2, ... (all of 127/8 is loopback). Nothing but processes and files, but tasks
#   on different "nodes" share ports: two workers both on port 8888 collide (EADDRINUSE).
#
# Resources are faked so the repository's job runs unmodified: each node declares
# SLURM_LOCAL_CPUS CPUs (default 16; SlurmdParameters=config_overrides; task/none binds
# nothing) and SLURM_LOCAL_GPUS GPUs (default 4; 0 = no GRES) whose device files are
# DIR/dev/nvidiaN -> /dev/null (CUDA_VISIBLE_DEVICES then names GPUs that do not exist).
# KillWait: SLURM_LOCAL_KILLWAIT (default 30 s). Start-up timeout: SLURM_LOCAL_TIMEOUT (60 s).
# A requeued job waits out its old credential's lifetime before it starts again: cred_expire,
# SLURM_LOCAL_CRED_EXPIRE (default 10 s here; Slurm's default, 120 s, is what clusters have).
# Forcing it to start sooner (scontrol update StartTime=now) fails it: "Job credential revoked".
set -euo pipefail

NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-16}
GPUS=${SLURM_LOCAL_GPUS:-4}
NETNS=${SLURM_LOCAL_NETNS:-1}
KILLWAIT=${SLURM_LOCAL_KILLWAIT:-30}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
SUBNET_PREFIX=10.213
LOCK=/tmp/slurm_local_cluster.lock

NODE_NAMES=()  # Slurm node names (IP addresses)
NODE_NETNS=()  # network namespace file per node, "" = this host's namespace
CTLD_ADDR=127.0.0.1

die() { echo "slurm_local_cluster: $*" >&2; exit 1; }
log() { echo "slurm_local_cluster: $*" >&2; }

usage() {
  echo "usage: $0 {start|stop|status} DIR" >&2
  exit 2
}

ensure_installed() {
  local missing=0 tool
  for tool in slurmctld slurmd sbatch sinfo munged munge unmunge; do
    command -v "$tool" >/dev/null 2>&1 || missing=1
  done
  [[ $missing == 0 ]] && return 0
  [[ ${SLURM_LOCAL_NO_INSTALL:-0} == 1 ]] && die "Slurm/MUNGE missing and SLURM_LOCAL_NO_INSTALL=1"
  log "installing slurm-wlm and munge with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >&2; } ||
    die "apt-get install slurm-wlm munge failed"
}

in_node() {  # netns-file command... -> runs command in that namespace ("" = here)
  local ns=$1
  shift
  if [[ -n $ns ]]; then nsenter --net="$ns" "$@"; else "$@"; fi
}

listening() {  # netns-file port -> 0 when something listens on the port there
  [[ -n $(in_node "$1" ss -Hltn "( sport = :$2 )" 2>/dev/null) ]]
}

pick_ports() {  # count -> that many ports nobody on this host uses, below the ephemeral range
  local count=$1 taken=" " port tries=0
  while ((count > 0)); do
    ((tries++ < 2000)) || die "no free TCP ports found"
    port=$((20000 + RANDOM % 12000))
    [[ $taken == *" $port "* ]] && continue
    [[ -n $(ss -Htan "( sport = :$port )" 2>/dev/null) ]] && continue
    taken+="$port "
    echo "$port"
    count=$((count - 1))
  done
}

pid_alive() {  # pidfile -> 0 when its process runs
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

stop_pidfiles() {  # pidfile... -> TERM those processes together, KILL what is left after 10 s
  local pidfile pid i
  local -a pids=()
  for pidfile in "$@"; do
    [[ -s $pidfile ]] || continue
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for ((i = 0; i < 100 && ${#pids[@]}; i++)); do
    for pid in "${!pids[@]}"; do
      kill -0 "${pids[$pid]}" 2>/dev/null || unset "pids[$pid]"
    done
    ((${#pids[@]})) && sleep 0.1
  done
  for pid in "${pids[@]}"; do
    log "pid $pid ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$@"
}

cluster_pids() {  # dir -> this cluster's daemons and slurmstepds, and all their descendants
  local dir=$1 proc pid stat rest ppid changed
  local -A parent=() mine=() keep=()
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    { stat=$(<"$proc/stat"); } 2>/dev/null || continue
    rest=${stat##*) }
    read -r _ ppid _ <<<"$rest"
    parent[$pid]=$ppid
    # Daemons carry a marker in their environment; slurmstepd gets a clean one from slurmd,
    # but runs in the directory of SlurmdLogFile.
    if { tr '\0' '\n' <"$proc/environ"; } 2>/dev/null | grep -qxF "SLURM_LOCAL_CLUSTER_DIR=$dir" ||
      [[ $(readlink "$proc/exe" 2>/dev/null) == */slurmstepd* && $(readlink "$proc/cwd" 2>/dev/null) == "$dir/log" ]]; then
      mine[$pid]=1
    fi
  done
  changed=1
  while ((changed)); do  # add children of what is ours until nothing changes
    changed=0
    for pid in "${!parent[@]}"; do
      [[ -z ${mine[$pid]:-} && -n ${mine[${parent[$pid]}]:-} ]] && mine[$pid]=1 && changed=1
    done
  done
  pid=$$
  while [[ -n $pid && $pid != 0 ]]; do  # never this script or its callers
    keep[$pid]=1
    pid=${parent[$pid]:-}
  done
  keep[$BASHPID]=1
  for pid in "${!mine[@]}"; do
    [[ -z ${keep[$pid]:-} ]] && echo "$pid"
  done
  return 0
}

setup_network() {  # dir -> NODE_NAMES, NODE_NETNS, CTLD_ADDR (call with the lock held)
  local dir=$1 x i tries=0 ns br host_if
  NODE_NAMES=()
  NODE_NETNS=()
  if [[ $NETNS != 1 ]]; then
    for ((i = 1; i <= NODES; i++)); do
      NODE_NAMES+=("127.0.0.$i")
      NODE_NETNS+=("")
    done
    CTLD_ADDR=127.0.0.1
    return 0
  fi
  for tool in ip unshare nsenter; do
    command -v "$tool" >/dev/null || die "SLURM_LOCAL_NETNS=1 needs $tool"
  done
  ((NODES <= 250)) || die "at most 250 nodes"
  while :; do
    ((tries++ < 500)) || die "no free subnet $SUBNET_PREFIX.X.0/24"
    x=$((1 + RANDOM % 254))
    ip link show "slc${x}br" >/dev/null 2>&1 && continue
    ip -o -4 addr show | grep -qF " $SUBNET_PREFIX.$x." && continue
    [[ -n $(ip -4 route show "$SUBNET_PREFIX.$x.0/24") ]] && continue
    break
  done
  br=slc${x}br
  echo "$x" >"$dir/netns/id"
  ip link add "$br" type bridge || die "cannot create bridge $br"
  ip addr add "$SUBNET_PREFIX.$x.1/24" dev "$br"
  ip link set "$br" up
  CTLD_ADDR=$SUBNET_PREFIX.$x.1
  NODE_NAMES+=("$SUBNET_PREFIX.$x.1")
  NODE_NETNS+=("")
  for ((i = 2; i <= NODES; i++)); do
    ns=$dir/netns/node$i
    host_if=slc${x}v$i
    touch "$ns"
    unshare --net="$ns" true || die "cannot create a network namespace on $ns"
    nsenter --net="$ns" ip link add eth0 type veth peer name "$host_if" netns 1 ||
      die "cannot create veth pair $host_if"
    ip link set "$host_if" master "$br"
    ip link set "$host_if" up
    nsenter --net="$ns" ip link set lo up
    nsenter --net="$ns" ip addr add "$SUBNET_PREFIX.$x.$i/24" dev eth0
    nsenter --net="$ns" ip link set eth0 up
    NODE_NAMES+=("$SUBNET_PREFIX.$x.$i")
    NODE_NETNS+=("$ns")
  done
}

teardown_network() {  # dir -> removes the bridge, veths and namespaces of SLURM_LOCAL_NETNS=1
  local dir=$1 x ns dev
  [[ -s $dir/netns/id ]] || return 0
  x=$(<"$dir/netns/id")
  for ns in "$dir"/netns/node*; do
    [[ -e $ns ]] || continue
    umount "$ns" 2>/dev/null || true  # the namespace and its end of the veth go with it
    rm -f "$ns"
  done
  # Unmounting a namespace nobody uses any more destroys it and its veth pair; left-over
  # host ends (a process still in the namespace) are deleted by name.
  for dev in $(ip -o link show 2>/dev/null | grep -oE "slc${x}v[0-9]+" | sort -u || true); do
    ip link del "$dev" 2>/dev/null || true
  done
  ip link del "slc${x}br" 2>/dev/null || true
  rm -f "$dir/netns/id"
}

write_config() {  # dir ctld_port node_port... -> DIR/slurm.conf (+ gres.conf)
  local dir=$1 ctld_port=$2
  shift 2
  local -a ports=("$@")
  local cluster i gres=""
  cluster=local$(printf '%s' "$dir" | cksum | cut -c1-8)
  ((GPUS > 0)) && gres="Gres=gpu:$GPUS"
  cat >"$dir/slurm.conf" <<EOF
# Written by jobs/slurm_local_cluster.sh: a throwaway cluster under $dir
ClusterName=$cluster
SlurmctldHost=localhost($CTLD_ADDR)
SlurmctldPort=$ctld_port
SlurmdPort=${ports[0]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=$CRED_EXPIRE
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=$KILLWAIT
MinJobAge=300
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
JobRequeue=1
EOF
  {
    ((GPUS > 0)) && echo "GresTypes=gpu"
    for i in "${!NODE_NAMES[@]}"; do
      echo "NodeName=${NODE_NAMES[$i]} NodeAddr=${NODE_NAMES[$i]} NodeHostname=$(hostname -s)" \
        "Port=${ports[$i]} CPUs=$CPUS $gres State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >>"$dir/slurm.conf"
  if ((GPUS > 0)); then
    # slurmd drops a GPU without a device file ("Removing file-less GPU") and rejects a
    # regular file ("not a valid character or block device"): symlinks to /dev/null pass.
    mkdir -p "$dir/dev"
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$dir/dev/nvidia$i"; done
    {
      echo "# Fake GPUs: every device file is a symlink to /dev/null."
      echo "Name=gpu File=$dir/dev/nvidia[0-$((GPUS - 1))]"
    } >"$dir/gres.conf"
  else
    rm -f "$dir/gres.conf"
  fi
}

wait_idle() {  # dir -> 0 once every node is idle; shows why not otherwise
  local dir=$1 deadline=$((SECONDS + TIMEOUT)) states f
  while ((SECONDS < deadline)); do
    states=$(SLURM_CONF=$dir/slurm.conf sinfo -h -N -o '%N %t' 2>/dev/null || true)
    if [[ -n $states ]] && (($(grep -c ' idle$' <<<"$states") == ${#NODE_NAMES[@]})); then
      return 0
    fi
    grep -qE ' (inval|drain|drng|fail)' <<<"$states" && break
    sleep 0.5
  done
  {
    echo "slurm_local_cluster: nodes not idle (timeout ${TIMEOUT}s); sinfo says:"
    SLURM_CONF=$dir/slurm.conf sinfo -N -l 2>&1 || true
    for f in "$dir/log/slurmctld.log" "$dir"/log/slurmd-*.log; do
      [[ -e $f ]] || continue
      echo "--- tail of $f"
      tail -n 20 "$f"
    done
  } >&2
  return 1
}

cmd_start() {
  local dir=$1 i name
  [[ $(id -u) == 0 ]] || die "start needs root (SlurmUser=root, SlurmdUser=root)"
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_NODES must be a positive integer"
  ensure_installed
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd -P)
  pid_alive "$dir/run/slurmctld.pid" && die "a cluster already runs under $dir (stop it first)"
  (cmd_stop "$dir") >/dev/null 2>&1 || true  # leftovers of a crashed run in this DIR
  # A failed start takes down whatever it started (the logs stay).
  STARTING_DIR=$dir
  trap '(cmd_stop "$STARTING_DIR") >/dev/null 2>&1 || true' EXIT
  mkdir -p "$dir"/{state,spool,run,log,munge,netns}
  # munged insists: key 0600, socket directory executable by all, nothing writable by others;
  # --force turns "execute permissions for all required" on a 0700 parent of DIR (e.g.
  # pytest's /tmp/pytest-of-root) into a warning: every client here runs as root.
  chmod 0755 "$dir/munge"
  chmod 0700 "$dir/state"
  [[ -s $dir/munge/munge.key ]] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 0600 "$dir/munge/munge.key"
  rm -f "$dir/munge/munge.socket" "$dir/munge/munge.socket.lock"
  SLURM_LOCAL_CLUSTER_DIR=$dir munged --force --socket="$dir/munge/munge.socket" \
    --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" ||
    die "munged did not start; see $dir/log/munged.log"
  munge -n -S "$dir/munge/munge.socket" | unmunge -S "$dir/munge/munge.socket" >/dev/null ||
    die "munge credential round trip failed on $dir/munge/munge.socket"

  # Ports and subnet are chosen under one lock, held until every daemon listens.
  exec 9>>"$LOCK"
  flock -w "$TIMEOUT" 9 || die "could not lock $LOCK"
  setup_network "$dir"
  local -a ports
  mapfile -t ports < <(pick_ports $((${#NODE_NAMES[@]} + 1)))
  write_config "$dir" "${ports[0]}" "${ports[@]:1}"
  printf '%s\n' "${ports[@]}" >"$dir/ports"
  SLURM_LOCAL_CLUSTER_DIR=$dir SLURM_CONF=$dir/slurm.conf slurmctld -f "$dir/slurm.conf" ||
    die "slurmctld did not start; see $dir/log/slurmctld.log"
  for i in "${!NODE_NAMES[@]}"; do
    name=${NODE_NAMES[$i]}
    mkdir -p "$dir/spool/$name"
    SLURM_LOCAL_CLUSTER_DIR=$dir SLURM_CONF=$dir/slurm.conf \
      in_node "${NODE_NETNS[$i]}" slurmd -f "$dir/slurm.conf" -N "$name" ||
      die "slurmd for $name did not start; see $dir/log/slurmd-$name.log"
  done
  local deadline=$((SECONDS + TIMEOUT))
  until listening "" "${ports[0]}"; do
    ((SECONDS < deadline)) || die "slurmctld does not listen on port ${ports[0]}; see $dir/log/slurmctld.log"
    sleep 0.2
  done
  for i in "${!NODE_NAMES[@]}"; do
    until listening "${NODE_NETNS[$i]}" "${ports[$((i + 1))]}"; do
      ((SECONDS < deadline)) || die "slurmd ${NODE_NAMES[$i]} does not listen on port ${ports[$((i + 1))]}"
      sleep 0.2
    done
  done
  flock -u 9
  exec 9>&-

  wait_idle "$dir" || die "cluster under $dir did not come up; logs: $dir/log"
  trap - EXIT
  echo "export SLURM_CONF=$dir/slurm.conf"
}

cmd_stop() {
  local dir=$1 i pid pids jobs
  [[ -d $dir/munge ]] || return 0  # not a cluster directory (`start` makes munge/ first)
  dir=$(cd "$dir" && pwd -P)
  export SLURM_CONF=$dir/slurm.conf
  # Jobs first, while slurmctld answers: slurmstepd and the tasks outlive slurmd.
  if pid_alive "$dir/run/slurmctld.pid"; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel --full --signal=KILL $jobs 2>/dev/null || true
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  # Every daemon at once (each takes 1-2 s to exit), then whatever is left of the cluster:
  # slurmstepds and the tasks under them.
  stop_pidfiles "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/munge/munged.pid"
  pids=$(cluster_pids "$dir")
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$dir/munge/munge.socket" "$dir/munge/munge.socket.lock"
  teardown_network "$dir"
}

cmd_status() {
  local dir
  dir=$(cd "$1" && pwd -P) || exit 1
  SLURM_CONF=$dir/slurm.conf sinfo
}

[[ $# -eq 2 ]] || usage
case $1 in
  start) cmd_start "$2" ;;
  stop) cmd_stop "$2" ;;
  status) cmd_status "$2" ;;
  *) usage ;;
esac
