#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for tests and for trying the job scripts on a workstation.
#
#   bash slurm/localcluster.sh up       # install what is missing (as root), start munged, slurmctld, slurmd
#   source /tmp/mds-slurm/env.sh        # exports SLURM_CONF for sbatch, srun, squeue, scontrol ...
#   bash slurm/localcluster.sh status   # daemons, sinfo
#   bash slurm/localcluster.sh down     # stop the daemons (state is kept; `down --purge` removes it)
#
# All state (munge key and socket, slurm.conf, spool, logs, pids) lives under one folder:
# $MDS_SLURM_DIR, default /tmp/mds-slurm. `up` is idempotent: it starts only what is not running.
#
# Settings (environment):
#   MDS_SLURM_DIR    state folder                                  (/tmp/mds-slurm)
#   MDS_SLURM_CPUS   CPUs the node advertises; more than the cores is allowed, so
#                    that e.g. 8 CPU ranks can run on a 2-core machine            (8)
#   MDS_SLURM_MEM_MB memory the node advertises                   (free memory, at most 16384)
#
# Requires root (slurmd runs jobs as their users; here everything runs as root). Seen working with
# Debian 12's Slurm 22.05 and munge 0.5.15; see ../shared/FACTS.md for why each setting is there.
set -euo pipefail

DIR="${MDS_SLURM_DIR:-/tmp/mds-slurm}"
CPUS="${MDS_SLURM_CPUS:-8}"
PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin libopenmpi-dev)

log() { echo "localcluster: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
	local missing=()
	command -v slurmctld >/dev/null || missing+=(slurmctld)
	command -v slurmd >/dev/null || missing+=(slurmd)
	command -v sbatch >/dev/null || missing+=(slurm-client)
	command -v munged >/dev/null || missing+=(munge)
	command -v mpirun >/dev/null || missing+=(openmpi-bin libopenmpi-dev)
	# Slurm's pmix plugin dlopens the unversioned libpmix.so; without it `srun --mpi=pmix` hangs.
	compgen -G "/usr/lib/*/pmix2/lib/libpmix.so" >/dev/null || missing+=(libpmix-dev)
	((${#missing[@]} == 0)) && return 0
	[[ $EUID -eq 0 ]] || die "missing ${missing[*]}; install as root: apt-get install ${PACKAGES[*]}"
	command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
	log "installing ${PACKAGES[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_config() {
	mkdir -p "$DIR"/{munge,spool/ctld,spool/d,log,run}
	chmod 755 "$DIR" "$DIR/munge" # munge clients refuse a socket in a folder others cannot enter
	if [[ ! -s "$DIR/munge/munge.key" ]]; then
		dd if=/dev/urandom bs=1024 count=1 of="$DIR/munge/munge.key" status=none
		chmod 400 "$DIR/munge/munge.key"
	fi
	local mem_mb="${MDS_SLURM_MEM_MB:-}"
	if [[ -z "$mem_mb" ]]; then
		mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
		((mem_mb > 16384)) && mem_mb=16384
	fi
	cat >"$DIR/slurm.conf" <<EOF
# Written by slurm/localcluster.sh; rewritten by every 'up'.
ClusterName=mds-local
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=${MDS_SLURMCTLD_PORT:-6817}
SlurmdPort=${MDS_SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=5,sched_interval=3
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
	cat >"$DIR/env.sh" <<EOF
# Source this to use the local cluster: written by slurm/localcluster.sh.
export SLURM_CONF=$DIR/slurm.conf
EOF
}

start_munged() {
	pid_alive "$DIR/munge/munged.pid" && return 0
	rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
	munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
		--pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed" \
		--log-file="$DIR/log/munged.log" --force
	for _ in $(seq 50); do
		[[ -S "$DIR/munge/munge.socket" ]] && return 0
		sleep 0.1
	done
	die "munged did not create its socket; see $DIR/log/munged.log"
}

start_slurm() {
	export SLURM_CONF="$DIR/slurm.conf"
	pid_alive "$DIR/run/slurmctld.pid" || slurmctld -f "$DIR/slurm.conf"
	pid_alive "$DIR/run/slurmd.pid" || slurmd -f "$DIR/slurm.conf" -N localhost
	local state=""
	for _ in $(seq 100); do
		state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
		if [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]; then
			log "up: node localhost is $state; source $DIR/env.sh"
			return 0
		fi
		# A node left DOWN or DRAINED by an earlier run is given back to service.
		if [[ "$state" == down* || "$state" == drain* ]]; then
			scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
		fi
		sleep 0.2
	done
	die "node not ready (state '${state}'); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

stop_pidfile() {
	local pidfile="$1" pid
	pid_alive "$pidfile" || return 0
	pid=$(cat "$pidfile")
	kill "$pid"
	for _ in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	log "pid $pid ($pidfile) ignored SIGTERM; sending SIGKILL"
	kill -9 "$pid" 2>/dev/null || true
}

cmd_up() {
	install_packages
	write_config
	start_munged
	start_slurm
}

cmd_down() {
	if [[ -f "$DIR/slurm.conf" ]] && pid_alive "$DIR/run/slurmctld.pid"; then
		SLURM_CONF="$DIR/slurm.conf" scancel --user="$(id -un)" 2>/dev/null || true
	fi
	stop_pidfile "$DIR/run/slurmd.pid"
	stop_pidfile "$DIR/run/slurmctld.pid"
	stop_pidfile "$DIR/munge/munged.pid"
	if [[ "${1:-}" == "--purge" ]]; then
		rm -rf "$DIR"
		log "down; removed $DIR"
	else
		log "down; state kept in $DIR (down --purge removes it)"
	fi
}

cmd_status() {
	local name pidfile ok=0
	for name in munged slurmctld slurmd; do
		case $name in
		munged) pidfile="$DIR/munge/munged.pid" ;;
		*) pidfile="$DIR/run/$name.pid" ;;
		esac
		if pid_alive "$pidfile"; then
			echo "$name: running (pid $(cat "$pidfile"))"
		else
			echo "$name: stopped"
			ok=1
		fi
	done
	if ((ok == 0)); then
		SLURM_CONF="$DIR/slurm.conf" sinfo
	fi
	return $ok
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down "${2:-}" ;;
status) cmd_status ;;
*)
	echo "usage: $0 up | down [--purge] | status   (state in \$MDS_SLURM_DIR, default /tmp/mds-slurm)" >&2
	exit 2
	;;
esac
