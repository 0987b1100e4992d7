"""The finetune stage: resume (or start) a training, launch the ranks, collect the outputs.

This module never imports MindSpore: the ranks do (lorapipe.train.trainer, through the worker script the
finetune rule passes in). The YAML comes from lorapipe.train.mindformers_yaml, the loss logs' formats from
lorapipe.train.losslog.

Resume: Snakemake deletes a rule's directory outputs before the job runs, so training state lives in
`<state_root>/<key>/`, which Snakemake does not know about. The key is a hash of the rendered YAML
(every setting that alters training) and of the identity of the base checkpoint and the training data
it names. A rerun with the same key continues from the last checkpoint saved there; anything else gets
a fresh state folder, and stale ones are deleted.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

import yaml

from lorapipe.digests import copy_bytes, link_or_copy
from lorapipe.errors import StepError
from lorapipe.formats.checkpoint_file import checkpoint_files, the_checkpoint
from lorapipe.formats.msckpt import PARAMETER_ORDER
from lorapipe.outputs import atomic_outputs, remove_path
from lorapipe.progress import Progress
from lorapipe.provenance import find_manifest
from lorapipe.train.checks import check_devices_here
from lorapipe.train.launch import launch
from lorapipe.train.losslog import read_rank_log, write_loss_tsv
from lorapipe.train.mindformers_yaml import (
    LORA_SUFFIX,
    adapter_config,
    read_mindformers_yaml,
)
from lorapipe.train.processes import cancel_slurm
from lorapipe.train.resume import global_step, resume_point

log = logging.getLogger("lorapipe")


# -- orchestration ----------------------------------------------------------------------------------

def _identity(path):
    """What identifies an input file cheaply: the sha256 its step's manifest recorded, when the file is
    still the one recorded, else its size and mtime."""
    found = find_manifest(path)
    st = os.stat(path)
    if found and found[2].get("bytes") == st.st_size and found[2].get("mtime_ns") == st.st_mtime_ns:
        return found[2]["sha256"]
    return f"{st.st_size}:{st.st_mtime_ns}"


STATE_KEY = "key.json"  # what a training state was keyed on: the rendered YAML and its inputs' identities


def _state_dir(config_path, state_root, inputs=()):
    key = hashlib.sha256(Path(config_path).read_bytes())
    identities = {str(path): _identity(path) for path in inputs}
    for identity in identities.values():
        key.update(identity.encode())
    digest = key.hexdigest()[:16]
    state_root = Path(state_root)
    state = state_root / digest
    settings = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    if state_root.is_dir():
        for stale in state_root.iterdir():
            if stale.name != digest and not _in_use(stale):
                log.info("removing the training state of an earlier run, %s: %s", stale,
                         _what_changed(stale / STATE_KEY, settings, identities))
                remove_path(stale)
    state.mkdir(parents=True, exist_ok=True)
    (state / STATE_KEY).write_text(json.dumps({"yaml": settings, "inputs": identities}, default=str) + "\n")
    return state


def _what_changed(key_file, rendered, identities):
    """Why a state no longer applies: the YAML settings and inputs that differ from the ones it was made for."""
    try:
        old = json.loads(key_file.read_text())
    except (OSError, ValueError):
        return "it was made by an earlier lorapipe, which did not record its settings"
    changes = [f"{path} changed" for path, identity in identities.items() if old["inputs"].get(path) != identity]
    changes += [f"{path} {a!r} -> {b!r}" for path, a, b in _differences(old["yaml"], rendered)]
    changes += [f"input {path} no longer used" for path in old["inputs"] if path not in identities]
    return "; ".join(changes) or "the rendered YAML differs"


def _differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    elif a != b:
        yield path, a, b


def last_checkpoint(rank_dir):
    """The newest checkpoint of one rank (by the global step stored in it), or None."""
    ckpts = checkpoint_files(rank_dir)
    return max(ckpts, key=global_step) if ckpts else None


def _finished(point, rank0_tsv):
    """Whether the resume point is the run's last step (the total the rank log records): every rank saved
    its final checkpoint."""
    rows = read_rank_log(rank0_tsv)
    return point is not None and bool(rows) and point.step >= rows[-1]["total"]


def reproducibility(device_target, ranks):
    """What a finetune's manifest says of its reproducibility: measured on CPU with up to 2 ranks (two
    clean runs, and a run killed by SIGKILL after step 21 and resumed, tests/test_workflow.py), claimed
    nowhere else."""
    timed = "loss.tsv's tokens_per_s and rank_logs/ hold wall-clock times"
    if device_target == "CPU" and ranks <= 2:
        return (f"checkpoint_network/ is byte-identical across runs; a run killed and resumed has every tensor bit "
                f"for bit (epoch_num and step_num stored in the other order) and the same loss at every step; {timed}")
    return f"not measured on {device_target} with {ranks} ranks; {timed}"


def tokens_per_step(rendered):
    """Tokens of one optimizer step: global batch x sequence length."""
    return (rendered["runner_config"]["batch_size"] * rendered["parallel_config"]["data_parallel"]
            * rendered["model"]["model_config"]["seq_length"])


def _in_use(state):
    """Whether a running finetune holds this training state (see state_lock)."""
    if not (state / "lock").is_file():
        return False
    with open(state / "lock") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


@contextlib.contextmanager
def state_lock(state, wait=120.0):
    """Hold the training state for this process: a second launcher for the same run (a second
    Snakemake started with --nolock, or by hand) is refused instead of training into the same folder.
    Under Slurm, a holder in another Slurm job is an earlier launch whose Snakemake was killed (that
    does not end the job): it is cancelled, and the lock taken once it is free."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            job = re.search(r"Slurm job (\S+)", holder)
            if not (job and os.environ.get("SLURM_JOB_ID") and job[1] != os.environ["SLURM_JOB_ID"]):
                raise StepError(f"another finetune ({holder or 'unknown process'}) is using the training state "
                                f"{state}; wait for it, or stop it") from None
            cancel_slurm([{"slurm_job": job[1]}])
            _flock_within(lock, wait, f"the training state {state} is still held by {holder} after scancel")
        lock.seek(0)
        lock.truncate()
        slurm = f", Slurm job {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else ""
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}{slurm}\n")
        lock.flush()
        yield  # the lock goes with the file when it is closed, also when the process is killed


def _flock_within(lock, seconds, message):
    deadline = time.time() + seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.time() > deadline:
                raise StepError(message) from None
            time.sleep(1)


def run_finetune(config_path, worker, state_root, out_dir, *, workers, launcher="msrun", nodes=1,
                 master_addr=None, master_port=None, rank_table=None, visible_devices=None,
                 device_target="CPU", base_model="", run=None, inputs=(), restart_if_damaged=False):
    """Train (or resume) with the rendered YAML, each rank running `worker` (a script taking
    --config, --output_dir, --loss_tsv and --resume), and write to `out_dir`:
    checkpoint_network/rank_<r>/<name>_lora.ckpt (+ strategy/), loss.tsv, adapter_config.json and
    rank_logs/worker_<r>.log. `inputs` (the base checkpoint and the data) are part of the state key. A resume
    starts from the newest step complete on every rank (lorapipe.train.resume); `restart_if_damaged` trains
    from step 0 when there is none."""
    rendered = read_mindformers_yaml(config_path)
    name = rendered["trainer"]["model_name"] + LORA_SUFFIX
    state = _state_dir(config_path, state_root, inputs)
    with state_lock(state):
        (state / "home").mkdir(parents=True, exist_ok=True)
        ranks = list(range(nodes * workers))
        ckpt_dir, tsv = state / "output" / "checkpoint", state / "train_log_rank_{rank}.tsv"
        complete = state / "complete"
        rank0_tsv = Path(str(tsv).format(rank=ranks[0]))
        point = None if complete.exists() else resume_point(ckpt_dir, ranks, restart_if_damaged)
        if not complete.exists() and _finished(point, rank0_tsv):
            # Killed after the final checkpoint was saved, before the marker: collect, never resume (MindSpore
            # refuses to train 0 more epochs, and the rerun would fail for ever).
            complete.write_text("done\n")
        if complete.exists():
            log.info("training with this config already finished in %s; collecting its outputs", state)
        else:
            if point:
                log.info("resuming from %s", point.describe())
            check_devices_here(device_target, workers, visible_devices)
            progress = Progress("finetune", 1, unit="steps", every=5.0, from_first_update=True)

            def report():
                rows = read_rank_log(rank0_tsv)
                if rows:
                    progress.total = rows[-1]["total"]
                    progress.update(rows[-1]["step"], loss=rows[-1]["loss"], lr=rows[-1]["lr"])

            args = [str(Path(worker).resolve()), "--config", str(Path(config_path).resolve()),
                    "--output_dir", str((state / "output").resolve()), "--loss_tsv", str(tsv.resolve())]
            if point:
                args += ["--resume", str(ckpt_dir.resolve()), "--resume_checkpoint", point.file_name]
            elif rendered["load_ckpt_format"] == "safetensors":
                folder = _base_per_rank(rendered["load_checkpoint"], ".safetensors", state, ranks)
                args += ["--load_checkpoint", str(folder.resolve())]
            # MindFormers and its LoRA library log under LOCAL_DEFAULT_PATH and $HOME: keep both in the state.
            env = {"LOCAL_DEFAULT_PATH": str((state / "output").resolve()), "HOME": str((state / "home").resolve())}
            if device_target == "Ascend" and launcher == "msrun":
                # msrun numbers its workers' devices 0..N-1 (DEVICE_ID = local rank); the Ascend runtime maps
                # those to the physical devices listed here (mindspore/parallel/cluster/process_entity/_api.py)
                env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, visible_devices or range(workers)))
            launch(args, workers, state / "logs", launcher=launcher, nodes=nodes, master_addr=master_addr,
                   master_port=master_port, rank_table=rank_table, visible_devices=visible_devices, env=env,
                   on_poll=report)
            report()
            complete.write_text("done\n")
        return collect_outputs(state, out_dir, ranks, name, tsv, tokens_per_step(rendered),
                               adapter_config(rendered, base_model), run, [config_path, *inputs])


def _base_per_rank(base_dir, suffix, state, ranks):
    """<state>/base/rank_<r>/<the base's file> for every rank, links to the one file: MindFormers 1.9 loads a
    safetensors checkpoint into a data-parallel run from a folder per rank (utils/load_checkpoint_utils.py:
    379-403, 228-262) unless auto_trans_ckpt reslices it, which needs strategy files."""
    base = the_checkpoint(base_dir, (suffix,))
    folder = state / "base"
    remove_path(folder)
    for rank in ranks:
        (folder / f"rank_{rank}").mkdir(parents=True)
        link_or_copy(base, folder / f"rank_{rank}" / base.name)
    return folder


def collect_outputs(state, out_dir, ranks, name, tsv, tokens_per_step, adapter, run, inputs):
    out_dir = Path(out_dir)
    finals = [out_dir / "checkpoint_network", out_dir / "loss.tsv", out_dir / "adapter_config.json",
              out_dir / "rank_logs"]
    lasts = [last_checkpoint(state / "output" / "checkpoint" / f"rank_{rank}") for rank in ranks]
    missing = [rank for rank, last in zip(ranks, lasts) if last is None]
    if missing:
        raise StepError(f"training finished, but rank {missing[0]} saved no checkpoint in {state}")
    with atomic_outputs(finals, run=run, inputs=inputs, need_bytes=sum(copy_bytes(p, out_dir) for p in lasts)) as \
            (ckpts, loss, adapter_json, logs):
        for rank, last in zip(ranks, lasts):
            (ckpts / f"rank_{rank}").mkdir(parents=True)
            link_or_copy(last, ckpts / f"rank_{rank}" / f"{name}{last.suffix}")
            if (last.parent / PARAMETER_ORDER).is_file():  # trainable-only checkpoints (lorapipe.train.trainer)
                shutil.copyfile(last.parent / PARAMETER_ORDER, ckpts / f"rank_{rank}" / PARAMETER_ORDER)
        strategy = state / "output" / "strategy"
        if strategy.is_dir() and any(strategy.iterdir()):
            shutil.copytree(strategy, ckpts / "strategy")
        rows = read_rank_log(str(tsv).format(rank=ranks[0]))
        write_loss_tsv(loss, rows, tokens_per_step)
        adapter_json.write_text(json.dumps(adapter, indent=2) + "\n")
        logs.mkdir()
        for log_file in sorted((state / "logs").glob("*.log")):
            shutil.copyfile(log_file, logs / log_file.name)
    if rows:
        log.info("finetune: %d steps, loss %.4f -> %.4f (rank %d)", len(rows), rows[0]["loss"],
                 rows[-1]["loss"], ranks[0])
    return out_dir
