#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for profiles/slurm-local and `make test-slurm`.
#
#   bash tests/slurm/cluster.sh up       # install what is missing, configure, start (idempotent)
#   bash tests/slurm/cluster.sh status   # daemons, nodes and the queue
#   bash tests/slurm/cluster.sh down     # stop every daemon this script started, remove the network
#                                        # and the /etc/hosts block (packages and configs stay)
#
# Debian's own packages (Slurm 22.05 on Debian 12): munge, MariaDB, slurmdbd (accounting: the
# executor plugin polls sacct), slurmctld, and two slurmd, `slurmd -N n1` and `slurmd -N n2`, with
# their own ports, %n spool directories, pid and log files.
#
# Each slurmd runs in a network namespace of its own (veth into the bridge lpbr0) with its own host
# name, so n1 and n2 have their own addresses: n1 = 10.213.7.1, n2 = 10.213.7.2 in /etc/hosts, the
# controller on the bridge at 10.213.7.254. With both names on 127.0.0.1 msrun, which picks its scheduler
# node by "is master_addr one of my addresses", would start a scheduler on both nodes and the second
# would fail; with an address each, the two-node srun x msrun finetune runs for real.
#
# It writes /etc/slurm/{slurm,slurmdbd,cgroup}.conf and a block in /etc/hosts, and needs root: run it on a
# machine (or CI runner) you can spend on it. Logs: /var/log/slurm/.
set -Eeuo pipefail   # -E: the ERR trap below also reports failures inside functions

NET_PREFIX=10.213.7
BRIDGE=lpbr0
NODES=(n1 n2)
NODE_PORTS=(6821 6822)
CLUSTER=lorapipe
DB_PASS=lorapipe-slurmdbd           # MariaDB password of slurmdbd; the database listens on localhost only
CONF=/etc/slurm
LOGS=/var/log/slurm
SPOOL=/var/spool/slurm
HOSTS_TAG="# lorapipe test cluster (tests/slurm/cluster.sh)"
PACKAGES=(munge mariadb-server slurmctld slurmd slurmdbd slurm-client iproute2 util-linux procps)

say() { echo "cluster: $*" >&2; }
die() { echo "cluster: ERROR: $*" >&2; exit 1; }
trap 'die "failed (line $LINENO): $BASH_COMMAND"' ERR
[ "$(id -u)" = 0 ] || die "run as root (it installs packages, writes /etc/slurm and starts daemons)"

running() {  # running PIDFILE: the process in PIDFILE is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: retry COMMAND until it succeeds
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$((limit * 2))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "$what did not come up within ${limit}s (logs in $LOGS)"
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return
    say "installing ${missing[*]}"
    apt-get update -qq
    # --no-install-recommends: no systemd units are used, every daemon is started below.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_network() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$NET_PREFIX.254/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    local i
    for i in "${!NODES[@]}"; do
        local node=${NODES[$i]} ns=lp-${NODES[$i]} veth=lpv-${NODES[$i]}
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            ip -n "$ns" addr add "$NET_PREFIX.$((i + 1))/24" dev eth0
        fi
        ip link set "$veth" master "$BRIDGE"
        ip link set "$veth" up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
    # /etc/hosts may be a bind mount: rewrite it in place (sed -i would replace the file).
    local hosts
    hosts=$(grep -v -F "$HOSTS_TAG" /etc/hosts || true)
    {
        printf '%s\n' "$hosts"
        for i in "${!NODES[@]}"; do
            printf '%s %s %s\n' "$NET_PREFIX.$((i + 1))" "${NODES[$i]}" "$HOSTS_TAG"
        done
    } > /etc/hosts
}

write_if_changed() {  # write_if_changed FILE MODE < content; returns 0 if FILE changed
    local new
    new=$(cat)
    if [ -f "$1" ] && [ "$(cat "$1")" = "$new" ]; then return 1; fi
    printf '%s\n' "$new" > "$1"
    chmod "$2" "$1"
    return 0
}

write_configs() {
    local changed=1 host
    host=$(hostname -s)
    mkdir -p "$CONF" "$LOGS" "$SPOOL/ctld"
    write_if_changed "$CONF/slurm.conf" 644 <<EOF && changed=0
# Written by lorapipe tests/slurm/cluster.sh: two nodes, n1 and n2, with 2 CPUs and 10 GB each.
ClusterName=$CLUSTER
SlurmctldHost=$host($NET_PREFIX.254)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=$LOGS/slurmctld.log
StateSaveLocation=$SPOOL/ctld
# %n: one spool directory, pid file and log per slurmd (several slurmd on one machine).
SlurmdSpoolDir=$SPOOL/d-%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=$LOGS/slurmd-%n.log
# No cgroups: both "nodes" share this machine's cgroup tree. Processes are tracked by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
# Accounting through slurmdbd: the executor plugin reads job states with sacct.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# The plugin puts the rule name in the job comment; keep it in accounting (the tests read it back).
AccountingStoreFlags=job_comment
# Count-only NPU GRES (no device files: there are no NPUs here), so that an Ascend config's
# --gres=npu:<workers> is scheduled and accounted (AllocTRES) as on an Ascend partition.
GresTypes=npu
AccountingStorageTRES=gres/npu
JobCompType=jobcomp/none
# A test cluster: schedule and clean up quickly.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=60
NodeName=${NODES[0]} NodeAddr=$NET_PREFIX.1 Port=${NODE_PORTS[0]} CPUs=2 RealMemory=10000 Gres=npu:2 State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=$NET_PREFIX.2 Port=${NODE_PORTS[1]} CPUs=2 RealMemory=10000 Gres=npu:2 State=UNKNOWN
PartitionName=cpu Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
PartitionName=ascend Nodes=${NODES[0]},${NODES[1]} MaxTime=INFINITE State=UP
EOF
    write_if_changed "$CONF/gres.conf" 644 <<EOF && changed=0
# Written by lorapipe tests/slurm/cluster.sh: two NPUs per node, counted only.
NodeName=${NODES[0]},${NODES[1]} Name=npu Count=2
EOF
    # slurmdbd refuses a config file that others can read (it holds the database password).
    write_if_changed "$CONF/slurmdbd.conf" 600 <<EOF && changed=0
# Written by lorapipe tests/slurm/cluster.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    return $changed
}

start_munge() {
    [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create --force; chown munge: /etc/munge/munge.key; }
    install -d -o munge -g munge -m 0755 /run/munge
    running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged --force
    wait_for 20 munge bash -c "munge -n | unmunge"
}

start_mariadb() {
    install -d -o mysql -g mysql /run/mysqld
    if ! running /run/mysqld/mysqld.pid; then
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
            >>"$LOGS/mariadb.log" 2>&1 < /dev/null &
    fi
    wait_for 60 MariaDB mariadb-admin ping
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
    running /run/slurmdbd.pid || slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    # The cluster, an account and this user: sacct then answers for jobs, and the plugin finds an account.
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n list account format=account | grep -qw lorapipe ||
        sacctmgr -i add account lorapipe cluster="$CLUSTER" description="lorapipe tests" >/dev/null
    local user=${SUDO_USER:-root}
    sacctmgr -n list user format=user | grep -qw "$user" ||
        sacctmgr -i add user "$user" account=lorapipe cluster="$CLUSTER" >/dev/null
}

start_slurmctld() {
    running /run/slurmctld.pid || slurmctld
    wait_for 60 slurmctld scontrol ping
}

start_slurmd() {
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$SPOOL/d-$node"
        running "/run/slurmd-$node.pid" && continue
        # Its own network namespace and host name: to the jobs on it, this is host $node. nsenter, not
        # `ip netns exec`, which would mount a fresh /sys without the cgroup tree slurmd needs.
        nsenter --net="/run/netns/lp-$node" unshare --uts sh -c "hostname $node && exec slurmd -N $node"
    done
    wait_for 60 "nodes ${NODES[*]}" bash -c \
        "[ \"\$(sinfo -h -N -p cpu -o '%N %t' | grep -cE ' (idle|mix|alloc)\$')\" = ${#NODES[@]} ]"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM the process, wait up to 20 s
    running "$2" || return 0
    local pid
    pid=$(cat "$2")
    say "stopping $1 ($pid)"
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    local node
    for node in "${NODES[@]}"; do stop_pidfile "slurmd $node" "/run/slurmd-$node.pid"; done
    stop_pidfile slurmctld /run/slurmctld.pid
    stop_pidfile slurmdbd /run/slurmdbd.pid
    stop_pidfile mariadb /run/mysqld/mysqld.pid
    stop_pidfile munged /run/munge/munged.pid
    for node in "${NODES[@]}"; do
        ip link del "lpv-$node" 2>/dev/null || true
        ip netns del "lp-$node" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    local hosts
    hosts=$(grep -v -F "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n' "$hosts" > /etc/hosts
}

up() {
    install_packages
    mkdir -p "$LOGS"
    setup_network
    if write_configs; then
        say "configuration changed: restarting the Slurm daemons"
        for node in "${NODES[@]}"; do stop_pidfile "slurmd $node" "/run/slurmd-$node.pid"; done
        stop_pidfile slurmctld /run/slurmctld.pid
        stop_pidfile slurmdbd /run/slurmdbd.pid
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    # Nodes that a previous run left down or drained (e.g. after a slurmd restart) are usable again.
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    say "up: $(sinfo -h -N -o '%N/%P/%t' | tr '\n' ' ')"
}

status() {
    local node
    for f in /run/munge/munged.pid /run/mysqld/mysqld.pid /run/slurmdbd.pid /run/slurmctld.pid; do
        running "$f" && echo "running  $f" || echo "stopped  $f"
    done
    for node in "${NODES[@]}"; do
        running "/run/slurmd-$node.pid" && echo "running  slurmd $node" || echo "stopped  slurmd $node"
    done
    sinfo 2>&1 || true
    squeue 2>&1 || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
