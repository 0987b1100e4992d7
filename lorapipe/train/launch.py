"""Launch N training ranks and supervise them until every one has finished.

Two launchers, as in the recipe: MindSpore's `msrun --join=True` (default), or a rank table (one
process per device with RANK_TABLE_FILE, DEVICE_ID, RANK_ID, RANK_SIZE set). Either way:
  * every rank's output goes to <log_dir>/worker_<rank>.log;
  * if one rank fails (non-zero exit, or a crash that leaves no "done" marker), the others are
    stopped at once and LaunchError carries that rank's log tail — msrun alone would wait for the
    survivors, which can hang until a collective times out;
  * launch() never returns while a rank still runs, also when interrupted (Snakemake's SIGTERM);
  * nothing outlives the launcher, SIGKILL included, and one training runs per log folder
    (lorapipe.train.processes).
Workers report through marker files in <log_dir>: done_rank_<r> or failed_rank_<r> (see worker_status).
"""

import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import psutil

from lorapipe.train.processes import (
    PARENT_ENV,
    PROCESSES,
    STATUS_DIR_ENV,
    LaunchError,
    die_with_parent,
    read_process_records,
    record_process,
    stop_earlier_launch,
    terminate,
)

log = logging.getLogger("lorapipe")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, lines=30):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


@contextlib.contextmanager
def worker_status(rank):
    """Wrap a worker's main: leave done_rank_<rank> or failed_rank_<rank> (with the traceback) for the
    supervising launch(), if it set LORAPIPE_STATUS_DIR."""
    # msrun also runs the script as its scheduler (MS_ROLE=MS_SCHED); only workers report.
    status_dir = os.environ.get(STATUS_DIR_ENV) if os.environ.get("MS_ROLE") != "MS_SCHED" else None
    try:
        yield
    except BaseException:
        if status_dir:
            Path(status_dir, f"failed_rank_{rank}").write_text(traceback.format_exc())
        raise
    if status_dir:
        Path(status_dir, f"done_rank_{rank}").write_text("ok\n")


def msrun_command(script_args, workers, nodes, node_rank, master_addr, master_port, log_dir):
    """msrun's argv. --tail_worker_log names no rank: with --join msrun would otherwise start a
    `tail -f` per worker log (output we already have in worker_<r>.log) that outlives a killed msrun."""
    return ["msrun", f"--worker_num={workers * nodes}", f"--local_worker_num={workers}",
            f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
            f"--log_dir={log_dir}", "--join=True", "--tail_worker_log=-2",
            *script_args]


def exec_exporting_pid(line):
    """bash -c that exports its own pid as PARENT_ENV, then execs the shell `line`: the pid stays the
    same across exec, so the processes that msrun starts learn msrun's pid, the parent they watch."""
    return ["bash", "-c", f"export {PARENT_ENV}=$$; exec {line}"]


def srun_msrun_command(script_args, workers, nodes, master_addr, master_port, log_dir):
    """Several nodes: one msrun per node of the Slurm allocation, each with --node_rank=$SLURM_NODEID.
    --kill-on-bad-exit makes Slurm stop every node when one fails; the log folder must be shared.
    --label prefixes each line of srun.log with the node rank, so a failure can be traced to its node.
    This runs inside the job step the executor plugin starts (`srun -n1`): --ntasks overrides the
    SLURM_NTASKS=1 that step leaves behind (srun would shrink to one node), and --overlap lets the new
    step share that step's CPUs (without it srun waits forever: "Requested nodes are busy")."""
    msrun = msrun_command(script_args, workers, nodes, "NODE_RANK", master_addr, master_port, log_dir)
    line = shlex.join(msrun).replace("--node_rank=NODE_RANK", '--node_rank="$SLURM_NODEID"')
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--overlap",
            "--kill-on-bad-exit=1", "--label", *exec_exporting_pid(line)]


def local_addresses():
    """Every IP address of this host's interfaces."""
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def check_master_here(master_addr):
    """With one node msrun starts its scheduler only where master_addr is a local address
    (mindspore/parallel/cluster/process_entity/_api.py, _is_local_ip); elsewhere the ranks wait for a
    scheduler that never comes, until the cluster timeout."""
    try:
        address = socket.gethostbyname(master_addr)
    except OSError:
        raise LaunchError(f"parallel.master_addr {master_addr!r} does not resolve to an address") from None
    if address not in local_addresses():
        raise LaunchError(f"parallel.master_addr {master_addr} ({address}) is not an address of this host "
                          f"({socket.gethostname()}): with one node msrun's scheduler runs here, so its ranks would "
                          f"wait for one that never starts; leave parallel.master_addr null")


def slurm_first_host():
    """The first host of this Slurm allocation: where msrun's scheduler (node rank 0) runs."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("parallel.nodes > 1 runs inside a Slurm allocation (profiles/slurm), or set "
                          "parallel.master_addr")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    return hosts[0]


def launch(script_args, workers, log_dir, launcher="msrun", nodes=1, master_addr=None, master_port=None,
           rank_table=None, visible_devices=None, env=None, on_poll=None, poll=1.0):
    """Run `script_args` (a python script and its arguments) on `workers` ranks per node, on `nodes`
    nodes (msrun only; through srun); raise LaunchError naming the first rank that failed.
    `on_poll()` is called about every `poll` s."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stop_earlier_launch(log_dir)
    for marker in [*log_dir.glob("done_rank_*"), *log_dir.glob("failed_rank_*"), *log_dir.glob(f"{PROCESSES}/*")]:
        marker.unlink()
    record_process(log_dir, os.getpid(), "launcher")
    env = dict(os.environ, **(env or {}), **{STATUS_DIR_ENV: str(log_dir), PARENT_ENV: str(os.getpid())})
    ranks = list(range(nodes * workers))
    job = _Job(ranks, log_dir, workers)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # so that `finally` stops the ranks
    try:
        if launcher == "msrun" and nodes > 1:
            cmd = srun_msrun_command(script_args, workers, nodes, master_addr or slurm_first_host(),
                                     master_port or free_port(), log_dir)
            log.info("launch: %s", " ".join(cmd))
            job.start(cmd, env, log_dir / "srun.log", "srun")
        elif launcher == "msrun":
            if master_addr:
                check_master_here(master_addr)
            cmd = msrun_command(script_args, workers, 1, 0, master_addr or "127.0.0.1", master_port or free_port(),
                                log_dir)
            log.info("launch: %s", " ".join(cmd))
            job.start(exec_exporting_pid(shlex.join(cmd)), env, log_dir / "msrun.log", "msrun")
        else:
            log.info("launch: %d ranks with rank table %s: %s", workers, rank_table, " ".join(script_args))
            if nodes > 1:
                raise LaunchError("the rank-table launcher starts one node; use msrun for several nodes")
            for local, rank in enumerate(ranks):
                device = (visible_devices or [str(i) for i in range(workers)])[local]
                job.start([sys.executable, *script_args], dict(
                    env, RANK_TABLE_FILE=str(rank_table), DEVICE_ID=str(device), RANK_ID=str(rank),
                    RANK_SIZE=str(workers * nodes)), log_dir / f"worker_{rank}.log", "rank", rank)
        job.supervise(on_poll, poll)
    finally:
        job.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class _Job:
    """The launched processes, every descendant seen so far, and how to tell and stop a failure."""

    def __init__(self, ranks, log_dir, workers):
        self.ranks, self.log_dir, self.workers = ranks, log_dir, workers
        self.processes = []      # what we started (msrun, or one process per rank)
        self.descendants = {}    # pid -> psutil.Process, everything they started
        self.worker_rank = {}    # pid -> RANK_ID of msrun workers seen running

    def start(self, cmd, env, log_path, role, rank=None):
        """Start `cmd` in a session of its own (a Ctrl-C reaches the launcher, which stops it in order),
        dying with this process, and record it."""
        launcher = os.getpid()
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lambda: die_with_parent(launcher))
        self.processes.append(proc)
        with contextlib.suppress(psutil.Error):  # (already gone: its exit status tells)
            record_process(self.log_dir, proc.pid, role, rank)

    def _scan(self):
        """Record descendants (msrun starts its workers in sessions of their own) and live workers."""
        live = set()
        for p in self.processes:
            try:
                children = psutil.Process(p.pid).children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                self.descendants.setdefault(child.pid, child)
                try:
                    env = child.environ()
                    if env.get("MS_ROLE") == "MS_WORKER" and child.status() != psutil.STATUS_ZOMBIE:
                        self.worker_rank[child.pid] = int(env["RANK_ID"])
                        live.add(int(env["RANK_ID"]))
                except (psutil.Error, KeyError, ValueError):
                    continue
        return live

    def failed_rank(self):
        """The first rank known to have failed, or None."""
        for rank in self.ranks:
            if (self.log_dir / f"failed_rank_{rank}").exists():
                return rank
        if len(self.processes) == len(self.ranks):  # one process per rank
            return next((r for r, p in zip(self.ranks, self.processes)
                         if p.poll() not in (None, 0) and not self.done(r)), None)
        live = self._scan()
        gone = [r for r in set(self.worker_rank.values()) - live if not self.done(r)]
        if not gone:
            return None
        # msrun kills the other workers once it sees one die; its log says which died first.
        first = re.search(r"Worker process (\d+) exit with exception",
                          log_tail(self.log_dir / "msrun.log", 200))
        return self.worker_rank.get(int(first.group(1)), min(gone)) if first else min(gone)

    def done(self, rank):
        return (self.log_dir / f"done_rank_{rank}").exists()

    def srun_failed_rank(self):
        """Several nodes (srun.log): the rank whose death made its node's msrun fail first. The other
        nodes' ranks were then stopped by srun (--kill-on-bad-exit) and did not finish either."""
        text = log_tail(self.log_dir / "srun.log", 2000)
        pids = {(r["node"], r["pid"]): r["rank"] for r in read_process_records(self.log_dir) if r["role"] == "rank"}
        # msrun on node k (srun --label: "k: ...") names the worker that died first by its pid
        died = re.search(r"^\s*(\d+): .*Worker process (\d+) exit with exception", text, re.M)
        if died and (int(died[1]), int(died[2])) in pids:
            return pids[(int(died[1]), int(died[2]))]
        # else srun's own word: the first task (one per node) that exited with an error, not one it stopped
        task = re.search(r"srun: error: \S+: tasks? (\d+)[-\d,]*: Exited with exit code", text)
        if task:
            node_ranks = self.ranks[int(task[1]) * self.workers:(int(task[1]) + 1) * self.workers]
            return next((r for r in node_ranks if not self.done(r)), None)
        return None

    def supervise(self, on_poll, poll):
        while True:
            failed = self.failed_rank()
            if failed is not None:
                self.stop()
                raise LaunchError(f"rank {failed} failed; stopped the other ranks. Last lines of "
                                  f"{self.log_dir}/worker_{failed}.log:\n"
                                  f"{log_tail(self.log_dir / f'worker_{failed}.log')}")
            codes = [p.poll() for p in self.processes]
            if all(c is not None for c in codes):
                if any(codes) and all(self.done(r) for r in self.ranks):
                    # Each rank's main returned (worker_status), its checkpoints saved; what failed came after,
                    # in the interpreter's teardown (seen on CI: a rank's SIGSEGV in MindSpore's, msrun exit 1).
                    log.warning("the launcher exited with status %d after every rank had reported done: the "
                                "training finished; %s", max(codes), self._exit_note())
                    return
                if any(codes):
                    rank = self.srun_failed_rank() if len(self.ranks) > self.workers else None
                    if rank is not None:
                        raise LaunchError(f"rank {rank} failed; srun stopped the ranks of the other nodes. Last "
                                          f"lines of {self.log_dir}/worker_{rank}.log:\n"
                                          f"{log_tail(self.log_dir / f'worker_{rank}.log')}")
                    rank = next((r for r in self.ranks if not self.done(r)), self.ranks[0])
                    raise LaunchError(f"the launcher exited with status {max(codes)}; rank {rank} did not "
                                      f"finish. Last lines of {self.log_dir}/worker_{rank}.log:\n"
                                      f"{log_tail(self.log_dir / f'worker_{rank}.log')}")
                return
            if on_poll:
                on_poll()
            time.sleep(poll)

    def _exit_note(self):
        """msrun's word on how a worker ended, if it said."""
        died = re.search(r"Worker process \d+ exit with exception\. Error code: -?\d+",
                         log_tail(self.log_dir / "msrun.log", 200))
        return f"msrun.log: {died[0]}" if died else f"see {self.log_dir}"

    def stop(self, grace=10.0):
        """SIGTERM everything started, SIGKILL what is left after `grace` s; return once all are gone."""
        self._scan()
        procs = [psutil.Process(p.pid) for p in self.processes if p.poll() is None]
        terminate(procs + [d for d in self.descendants.values() if d.is_running()], grace)
        for p in self.processes:
            p.poll()
