#!/usr/bin/env bash
# A one-node SLURM cluster with accounting on this machine, from Debian's packages, for trying
# (and testing) resexp's cluster path:
#
#   sudo scripts/slurm-cluster.sh start    # install if needed, then start munge, mariadb, slurmdbd, slurmctld, slurmd
#   sudo scripts/slurm-cluster.sh stop     # stop exactly the daemons that start started
#   scripts/slurm-cluster.sh status        # sinfo, or why not
#
# Partitions: `cpu` (the default) and `gpu`. A node without GPUs gets one stand-in GPU, so
# that a GPU partition's commands (launcher.gpus_per_node=1) can be tried; the job then trains
# on the CPU. Needs root, Debian 12 (SLURM 22.05), and no other SLURM or MariaDB on the machine:
# the configuration goes to /etc/slurm, the daemons' state and logs to $RESEXP_SLURM_DIR.
set -euo pipefail

STATE=${RESEXP_SLURM_DIR:-/var/tmp/resexp-slurm}
MARKER="# written by resexp scripts/slurm-cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DB_PASSWORD=resexp

die() { echo "slurm-cluster: $*" >&2; exit 1; }

install_packages() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return
    # Without an init system the packages' scripts cannot start their services, and this
    # recipe starts them itself: a policy-rc.d that answers 101 ("not allowed") stops them trying.
    local policy=/usr/sbin/policy-rc.d saved=""
    if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    local status=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null; } || status=$?
    if [ -n "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
    [ $status -eq 0 ] || die "apt-get install ${missing[*]} failed"
}

write_config() {
    local host node_line memory gres="" gres_types=""
    host=$(hostname -s)
    if [ -e /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
        die "/etc/slurm/slurm.conf exists and is not this recipe's; not touching another cluster's configuration"
    fi
    # slurmd -C: this machine's sockets, cores and memory; leave 1 GB for everything else.
    node_line=$(slurmd -C | head -1)
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node_line")
    node_line="${node_line/RealMemory=$memory/RealMemory=$((memory - 1024))}"
    if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
        # A stand-in GPU (/dev/null): jobs that ask for a GPU are scheduled, and see none.
        printf '%s\nName=gpu File=/dev/null\n' "$MARKER" > /etc/slurm/gres.conf
    else
        printf '%s\nAutoDetect=off\n' "$MARKER" > /etc/slurm/gres.conf
        for device in /dev/nvidia[0-9]*; do echo "Name=gpu File=$device" >> /etc/slurm/gres.conf; done
    fi
    gres="Gres=gpu:$(grep -c '^Name=gpu' /etc/slurm/gres.conf)"
    gres_types="GresTypes=gpu"
    mkdir -p "$STATE"/{ctld,spool,log,run}
    cat > /etc/slurm/slurm.conf <<EOF
$MARKER
ClusterName=resexp
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job runs again within seconds instead of after about 165 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No systemd and no cgroups here: track processes through /proc, bind each job to its cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A request no node can meet is refused at submission instead of pending for ever.
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
ReturnToService=2
MpiDefault=none
$gres_types
NodeName=$host NodeAddr=127.0.0.1 ${node_line#NodeName=* } $gres State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
    cat > /etc/slurm/slurmdbd.conf <<EOF
$MARKER
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
}

# start_daemon NAME COMMAND...: run a daemon in the foreground of a background job, keep its PID.
start_daemon() {
    local name=$1; shift
    setsid "$@" >"$STATE/log/$name.out" 2>&1 < /dev/null &
    echo $! > "$STATE/run/$name.started"
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up in ${seconds}s; logs in $STATE/log"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and starts daemons)"
    if [ -e "$STATE/run/slurmd.started" ]; then die "already started (stop it first: $0 stop)"; fi
    install_packages
    write_config
    trap stop EXIT  # a daemon that does not come up: stop the ones already started
    mkdir -p /run/munge /run/mysqld
    chown munge:munge /run/munge
    chown mysql:mysql /run/mysqld
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_until 10 munged munge -n
    start_daemon mariadbd /usr/sbin/mariadbd --user=mysql --skip-networking
    wait_until 30 mariadb mariadb -e "select 1"
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    start_daemon slurmdbd /usr/sbin/slurmdbd -D
    wait_until 30 slurmdbd sacctmgr -n list cluster
    start_daemon slurmctld /usr/sbin/slurmctld -D -i
    wait_until 30 slurmctld scontrol ping
    start_daemon slurmd /usr/sbin/slurmd -D
    wait_until 30 "the node" sh -c "sinfo -h -o %t | grep -qx idle"
    trap - EXIT
    sinfo
}

stop() {
    # Only the processes this recipe started, by the PIDs it kept; the last ones first.
    local name pid
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        [ -e "$STATE/run/$name.started" ] || continue
        pid=$(cat "$STATE/run/$name.started")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
        rm -f "$STATE/run/$name.started"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    install) install_packages ;;
    status) sinfo ;;
    *) die "usage: $0 start|stop|install|status" ;;
esac
