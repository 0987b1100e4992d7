"""Nothing outlives its launcher, and one training per log folder: the processes of a launch.

  * msrun (or srun) gets PR_SET_PDEATHSIG from the launcher's preexec_fn, and every rank and msrun's
    scheduler set it on themselves at startup and watch their parent from a thread (attach_to_launcher);
    msrun starts them in sessions of their own, so no process-group kill reaches them;
  * every process of a launch records itself (host, pid, start time, Slurm job and step) in
    <log_dir>/processes/, and the ranks hold <log_dir>/ranks.lock shared. The next launch stops whatever
    of an earlier launch still lives (scancel for Slurm jobs) and refuses to start while the lock is held
    (stop_earlier_launch).
"""

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from lorapipe.errors import StepError

log = logging.getLogger("lorapipe")


STATUS_DIR_ENV = "LORAPIPE_STATUS_DIR"


# The pid a launched process must have as its parent: the launcher for msrun, srun and rank-table ranks;
# msrun for its ranks and scheduler (the shell that execs msrun exports its own pid, msrun's).
PARENT_ENV = "LORAPIPE_PARENT_PID"


PROCESSES = "processes"    # <log_dir>/processes/<host>-<pid>.json: one record per process of a launch


RANKS_LOCK = "ranks.lock"  # held shared by every rank and scheduler of a launch while it lives


PR_SET_PDEATHSIG = 1       # linux/prctl.h


WATCH_INTERVAL = 0.5       # s between a rank's checks of its parent


SCANCEL_WAIT = 120         # s to wait for a cancelled Slurm job to leave the queue


class LaunchError(StepError, RuntimeError):
    """A rank failed; the message names it and ends with its log tail."""


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork: preexec_fn only calls it


def die_with_parent(parent_pid):
    """Have the kernel SIGKILL this process when its parent dies, then close the race: a parent that
    died before the prctl sends nothing, and this process would have been handed to another parent.
    (The signal is cleared on fork, so each process sets it on itself.)"""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _watch_parent(parent_pid):
    """The second line of defence: the parent-death signal comes when the parent's *thread* that
    started this process ends, and not at all across a setuid exec."""
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL)
    print(f"lorapipe: parent process {parent_pid} is gone; stopping this rank", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


_held = []  # the ranks' lock, open for as long as this process lives


def attach_to_launcher():
    """Run first in every process a launch starts through msrun or the rank table (each rank, and
    msrun's scheduler, which runs the same script): die with the parent (die_with_parent, and a
    watchdog thread), hold the launch's ranks lock shared until exit, and record this process for the
    next launch to check. Does nothing in a process that launch() did not start."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return
    die_with_parent(int(parent))
    threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True, name="lorapipe-watch-parent").start()
    status_dir = os.environ.get(STATUS_DIR_ENV)
    if status_dir:
        lock = open(Path(status_dir, RANKS_LOCK), "a")  # noqa: SIM115 - held until the process exits
        with contextlib.suppress(OSError):  # a file system without locks: the records still tell
            fcntl.flock(lock, fcntl.LOCK_SH)
        _held.append(lock)
        role = "scheduler" if os.environ.get("MS_ROLE") == "MS_SCHED" else "rank"
        record_process(status_dir, os.getpid(), role, rank=None if role == "scheduler" else os.environ.get("RANK_ID"))


def record_process(status_dir, pid, role, rank=None):
    """Write <status_dir>/processes/<host>-<pid>.json: who the process is (pid and start time, so that
    a reused pid is not mistaken for it), where (host, Slurm node, job and step) and its rank."""
    folder = Path(status_dir, PROCESSES)
    folder.mkdir(exist_ok=True)
    host = socket.gethostname()
    record = {"role": role, "host": host, "node": int(os.environ.get("SLURM_NODEID", "0")), "pid": pid,
              "started": psutil.Process(pid).create_time(), "rank": None if rank is None else int(rank),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_step": os.environ.get("SLURM_STEP_ID")}
    tmp = folder / f".{host}-{pid}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(folder / f"{host}-{pid}.json")


def read_process_records(status_dir):
    records = []
    for path in sorted(Path(status_dir, PROCESSES).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def process_of(record):
    """The live process a record describes on this host (same pid and start time), or None."""
    if record["host"] != socket.gethostname():
        return None
    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["started"]) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def _describe(record):
    rank = f" rank {record['rank']}" if record.get("rank") is not None else ""
    return f"{record['role']}{rank} pid {record['pid']} on {record['host']}"


def _ranks_lock_holders(status_dir):
    """None if no process holds the ranks lock; else the local processes that have it open (possibly
    none found: a holder on another node)."""
    path = Path(status_dir, RANKS_LOCK)
    if not path.exists():
        return None
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        except OSError:  # no locks on this file system
            return None
        else:
            return None
    holders = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(f.path == str(path.resolve()) for f in proc.open_files()):
                holders.append(proc)
    return holders


def cancel_slurm(records):
    """scancel the Slurm jobs of an earlier launch (or, inside this job, its steps) that still run:
    killing Snakemake does not end the Slurm job it submitted, whose ranks would go on training into
    the same state. Returns once they have left the queue (at most `SCANCEL_WAIT` s each)."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    targets = set()
    for r in records:
        if r.get("slurm_job") and r["slurm_job"] != job:
            targets.add(r["slurm_job"])
        elif r.get("slurm_job") and r.get("slurm_step") not in (None, step):
            targets.add(f"{job}.{r['slurm_step']}")
    for target in sorted(targets):
        try:
            if not _queued(target):
                continue
            log.warning("cancelling Slurm %s, an earlier launch of this training state", target)
            subprocess.run(["scancel", target], capture_output=True, timeout=60)
            deadline = time.time() + SCANCEL_WAIT
            while _queued(target) and time.time() < deadline:
                time.sleep(1)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("cannot check or cancel Slurm %s of an earlier launch (%s): cancel it if it still runs",
                        target, e)


def _queued(target):
    """Whether Slurm job `target` ("<job>") or step ("<job>.<step>") is still in the queue."""
    option = "--steps" if "." in target else "--jobs"
    out = subprocess.run(["squeue", "-h", option, target, "-o", "%i"], capture_output=True, text=True, timeout=60)
    return target in out.stdout.split()


def stop_earlier_launch(status_dir, grace=10.0):
    """Before a launch into `status_dir`: stop every process an earlier launch into it left running
    (recorded, or holding the ranks lock here), scancel its Slurm jobs, and raise LaunchError naming
    what still runs, so that two sets of ranks never train into one state. The caller holds the
    training state's own lock, so the launcher of those processes is gone."""
    records = read_process_records(status_dir)
    cancel_slurm(records)
    # (this process and its parents may be in the records: a second launch from the same process)
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    live = {proc.pid: (proc, _describe(r)) for r in records if (proc := process_of(r)) and proc.pid not in ours}
    for proc in _ranks_lock_holders(status_dir) or []:
        live.setdefault(proc.pid, (proc, f"pid {proc.pid} ({' '.join(proc.cmdline()[:3])})"))
    if live:
        log.warning("stopping %d processes of an earlier launch of this training state: %s", len(live),
                    ", ".join(name for _, name in live.values()))
        terminate([proc for proc, _ in live.values()], grace)
    holders = _ranks_lock_holders(status_dir)
    if holders is not None:
        names = ", ".join(f"pid {p.pid}" for p in holders) or "a process on another node"
        raise LaunchError(f"processes of an earlier launch still hold {Path(status_dir, RANKS_LOCK)} ({names}); "
                          f"stop them before training again")


def terminate(procs, grace):
    """SIGTERM, then SIGKILL what is left after `grace` s; return once all are gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=grace)
        if not procs:
            return
