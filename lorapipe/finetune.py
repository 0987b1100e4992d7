"""The finetune stage: render the MindFormers YAML from the config, launch the ranks, collect outputs.

This module never imports MindSpore: the ranks do (lorapipe.trainer, through the worker script the
finetune rule passes in).

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

from lorapipe.data import ChatTokenizer
from lorapipe.digests import copy_hashed
from lorapipe.errors import InputError, StepError
from lorapipe.launch import cancel_slurm, launch
from lorapipe.msckpt import iter_checkpoint
from lorapipe.outputs import atomic_outputs, remove_path
from lorapipe.progress import Progress
from lorapipe.provenance import find_manifest
from lorapipe.spec import LORA_A, LORA_B, llama_config, model_arch

log = logging.getLogger("lorapipe")

LORA_SUFFIX = "_lora"


def processor_config(tokenizer):
    """The recipe YAML's processor section: where MindFormers (and lorapipe's predict) find the
    tokenizer."""
    return {"return_tensors": "ms", "type": "LlamaProcessor",
            "tokenizer": {"type": "LlamaTokenizer", "vocab_file": str(tokenizer), "unk_token": "<unk>",
                          "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}}


def render_mindformers_config(hf_config, *, tokenizer, base_ckpt_dir, train_data, seq_length, name, lora,
                              train, parallel, device_target, position_embedding="auto"):
    """The MindFormers YAML (as a dict) for the recipe: what the user once edited by hand. On Ascend
    it is the official r1.0 run_baichuan2_7b_lora_910b.yaml (run_baichuan2_13b_lora_910b.yaml for an
    ALiBi base model) except for the deviations listed (with their reasons) in
    tests/test_golden_yaml.py; on CPU it is what MindFormers can run there."""
    cpu = device_target == "CPU"
    kind, arch = model_arch(hf_config, position_embedding)
    opt, lr = train["optimizer"], train["lr_schedule"]
    if cpu:  # CPU: MindFormers' wrapper uses Ascend-only overflow ops (lorapipe.trainer)
        wrapper = {"type": "CpuTrainOneStepCell", "use_clip_grad": True, "max_grad_norm": 1.0}
    else:
        scale = ({"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536, "scale_factor": 2,
                  "scale_window": 1000} if train["loss_scale"] == "dynamic" else
                 {"type": "FixedLossScaleUpdateCell", "loss_scale_value": train["loss_scale"]})
        wrapper = {"type": "MFTrainOneStepCell", "scale_sense": scale, "use_clip_grad": True}
    dataset = {"data_loader": {"type": "MindDataset", "dataset_dir": str(train_data), "shuffle": True},
               "input_columns": ["input_ids", "labels"], "num_parallel_workers": 1 if cpu else 8,
               "python_multiprocessing": False, "drop_remainder": True, "batch_size": train["batch_size"],
               "repeat": 1, "numa_enable": False, "prefetch_size": 1}
    context = {"mode": 0, "device_target": device_target, "max_call_depth": 10000, "save_graphs": False,
               "enable_graph_kernel": False}
    if parallel["max_device_memory"]:
        context["max_device_memory"] = parallel["max_device_memory"]
    tok = ChatTokenizer(tokenizer)
    model_config = llama_config(
        hf_config, seq_length, compute_dtype=train["compute_dtype"], param_init_type=train["param_init_type"],
        position_embedding_type=kind,
        # Ascend has fused RMSNorm and flash-attention kernels; CPU has neither (no RmsNorm kernel).
        fused_rms_norm=not cpu, use_flash_attention=train["use_flash_attention"],
        user_token_id=tok.user, assistant_token_id=tok.assistant, offset=0, checkpoint_name_or_path="",
        pet_config={"pet_type": "lora", "lora_rank": lora["rank"], "lora_alpha": lora["alpha"],
                    "lora_dropout": lora["dropout"], "target_modules": lora["target_modules"]})
    return {
        "seed": train["seed"],
        "run_mode": "finetune",
        "output_dir": "./output",  # set per run by lorapipe.trainer.finetune
        # The folder that directly holds the complete base checkpoint. MindFormers counts it as complete
        # (trainer/utils.py:546-558 check_path_include_total_ckpt) and loads it into every rank before
        # any parallel compile (utils.py:466-469); the compile then slices each parameter to its layout
        # (mindspore/parallel/_utils.py:249-259). A file path under rank_0/ would count as a shard,
        # loaded after the compile, and a folder holding rank_0/ with auto_trans_ckpt fails on every
        # rank but 0 when only rank_0/ exists (utils.py:146-161).
        "load_checkpoint": f"{base_ckpt_dir}/rank_0",
        "load_ckpt_format": "ckpt",
        "src_strategy_path_or_dir": "",
        "auto_trans_ckpt": False,
        "resume_training": False,
        "only_save_strategy": False,
        "use_parallel": True,
        "context": context,
        # CPU trains data parallel only; on Ascend, semi-auto parallel as the recipe (strategy files).
        # No strategy save_file: MindFormers then writes output/strategy/ckpt_strategy_rank_<r>.ckpt
        # (utils/file_utils.py:53-65), which merged_ckpt reads; the recipe's "./ckpt_strategy.ckpt"
        # would override it with one file in each rank's working directory.
        "parallel": {"parallel_mode": 0 if cpu else 1, "gradients_mean": cpu, "enable_alltoall": False,
                     "full_batch": not cpu, "enable_parallel_optimizer": not cpu,
                     "search_mode": "sharding_propagation",
                     "strategy_ckpt_config": {"only_trainable_params": False},
                     "parallel_optimizer_config": {"gradient_accumulation_shard": False,
                                                   "parallel_optimizer_threshold": 64}},
        "parallel_config": {"data_parallel": parallel["data_parallel"],
                            "model_parallel": parallel["model_parallel"],
                            "pipeline_stage": parallel["pipeline_stage"],
                            # MindFormers' minimum with pipeline stages (modules/transformer/op_parallel_config.py:306)
                            "micro_batch_num": parallel["pipeline_stage"],
                            "vocab_emb_dp": True, "gradient_aggregation_group": 4},
        "micro_batch_interleave_num": 1,
        "recompute_config": {"recompute": not cpu, "select_recompute": False,
                             "parallel_optimizer_comm_recompute": False, "mp_comm_recompute": not cpu,
                             "recompute_slice_activation": not cpu},
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": name},
        "model": {"model_config": model_config, "arch": {"type": arch}},
        "train_dataset": dataset,
        "train_dataset_task": {"type": "CausalLanguageModelDataset", "dataset_config": dataset},
        "do_eval": False,
        # Sink mode runs sink_size steps per device call; MindSpore on CPU has none (it falls back to
        # step by step, mindspore/train/model.py:1065-1069), so CPU renders what it runs.
        "runner_config": {"epochs": train["epochs"], "batch_size": train["batch_size"],
                          "sink_mode": not cpu, "sink_size": 1 if cpu else 2, "gradient_accumulation_steps": 1},
        "runner_wrapper": wrapper,
        "optimizer": {"type": opt["type"], "betas": [opt["beta1"], opt["beta2"]], "eps": opt["eps"],
                      "weight_decay": opt["weight_decay"]},
        "lr_schedule": {"type": lr["type"], "learning_rate": lr["learning_rate"], "lr_end": lr["lr_end"],
                        "warmup_ratio": lr["warmup_ratio"], "total_steps": -1},
        "callbacks": [
            {"type": "MFLossMonitor", "per_print_times": 1},
            {"type": "TsvLossMonitor"},
            {"type": "CheckpointMonitor", "prefix": name + LORA_SUFFIX,
             "save_checkpoint_steps": train["save_checkpoint_steps"], "keep_checkpoint_max": 2,
             "integrated_save": False, "async_save": False, "checkpoint_format": "ckpt"},
        ],
        "processor": processor_config(tokenizer),
        "profile": False,
    }


def render_predict_config(hf_config, *, tokenizer, name, generation, device_target, position_embedding="auto"):
    """The recipe's predict YAML (run_baichuan2_7b_910b.yaml, section "MindSpore推理"): incremental
    decoding (use_past), fp32 weights as the recipe recommends for accuracy, the generation settings
    in model_config, one device. The sequence length is the model's (prompt and answer together), not
    the training rows'. For an ALiBi model use_past means lorapipe's host decoder (lorapipe.generate
    build_decoder): MindFormers 1.9's incremental path is RoPE-only."""
    seq_length = hf_config.get("model_max_length", hf_config["max_position_embeddings"])
    kind, arch = model_arch(hf_config, position_embedding)
    model_config = llama_config(hf_config, seq_length, param_init_type="float32", compute_dtype="float32",
                                use_past=True, position_embedding_type=kind)
    model_config.update(checkpoint_name_or_path="", do_sample=generation["do_sample"],
                        top_k=generation["top_k"], top_p=generation["top_p"],
                        temperature=generation["temperature"],
                        repetition_penalty=generation["repetition_penalty"],
                        max_new_tokens=generation["max_new_tokens"])
    return {
        "seed": 0,
        "run_mode": "predict",
        "output_dir": "./output",
        "load_checkpoint": "",
        "auto_trans_ckpt": False,
        "use_parallel": False,
        "context": {"mode": 0, "device_target": device_target, "max_call_depth": 10000, "save_graphs": False},
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": name},
        "model": {"model_config": model_config, "arch": {"type": arch}},
        "processor": processor_config(tokenizer),
    }


def write_mindformers_config(path, rendered, run=None, inputs=()):
    with atomic_outputs([path], run=run, inputs=inputs) as (tmp,):
        tmp.write_text("# Rendered by lorapipe from the workflow config; not for hand editing.\n"
                       + yaml.safe_dump(rendered, sort_keys=False, allow_unicode=True))


def adapter_config(rendered, base_model):
    """PEFT-style adapter_config.json of a run, from the YAML it trained with: what a loader needs to
    apply or fold the adapter (see lorapipe.lora.read_adapter_config)."""
    model_config = rendered["model"]["model_config"]
    pet = model_config["pet_config"]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
            "r": pet["lora_rank"], "lora_alpha": pet["lora_alpha"], "lora_dropout": pet["lora_dropout"],
            "target_modules": pet["target_modules"], "scaling": pet["lora_alpha"] / pet["lora_rank"],
            "mindspore_parameter_suffixes": [LORA_A, LORA_B], "seq_length": model_config["seq_length"]}


# -- orchestration ----------------------------------------------------------------------------------

def _identity(path):
    """What identifies an input file cheaply: the sha256 its step's manifest recorded, when the file is
    still the one recorded, else its size and mtime."""
    found = find_manifest(path)
    st = os.stat(path)
    if found and found[2].get("bytes") == st.st_size and found[2].get("mtime_ns") == st.st_mtime_ns:
        return found[2]["sha256"]
    return f"{st.st_size}:{st.st_mtime_ns}"


def _state_dir(config_path, state_root, inputs=()):
    key = hashlib.sha256(Path(config_path).read_bytes())
    for path in inputs:
        key.update(_identity(path).encode())
    digest = key.hexdigest()[:16]
    state_root = Path(state_root)
    if state_root.is_dir():
        for stale in state_root.iterdir():
            if stale.name != digest and not _in_use(stale):
                log.info("removing training state of an earlier config: %s", stale)
                remove_path(stale)
    return state_root / digest


def _global_step(ckpt):
    for name, value in iter_checkpoint(ckpt, select=lambda n: n in ("global_step", "step_num")):
        return int(value.reshape(-1)[0])
    return -1


def last_checkpoint(rank_dir):
    """The newest checkpoint of one rank (by the global step stored in it), or None."""
    ckpts = sorted(Path(rank_dir).glob("*.ckpt"))
    return max(ckpts, key=_global_step) if ckpts else None


def read_rank_log(path):
    """Rows of a rank's TsvLossMonitor file as dicts, the last row of each step (re-run steps repeat)."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text().splitlines()
    rows = {}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) == 7:
            step, total, epoch, loss, lr, norm, seconds = fields
            rows[int(step)] = {"step": int(step), "total": int(total), "epoch": int(epoch), "loss": float(loss),
                               "lr": float(lr), "global_norm": float(norm), "seconds": float(seconds)}
    return [rows[s] for s in sorted(rows)]


LOSS_TSV_COLUMNS = ("step", "loss", "lr", "tokens_per_s")


def read_loss_tsv(path):
    """The rows of a finetune's loss.tsv: {"step": int, "loss": float, "lr": float, "tokens_per_s": float
    or None}."""
    lines = Path(path).read_text().splitlines()
    if not lines or tuple(lines[0].split("\t")) != LOSS_TSV_COLUMNS:
        raise InputError(f"{path}: not a loss.tsv (expected the header {' '.join(LOSS_TSV_COLUMNS)})")
    rows = []
    for line in lines[1:]:
        step, loss, lr, speed = line.split("\t")
        rows.append({"step": int(step), "loss": float(loss), "lr": float(lr),
                     "tokens_per_s": float(speed) if speed else None})
    return rows


def _finished(saved, rank0_tsv):
    """Whether every rank saved its last checkpoint (`saved`) at the run's last step (the total the rank
    log records)."""
    rows = read_rank_log(rank0_tsv)
    return bool(rows) and all(saved) and min(_global_step(ckpt) for ckpt in saved) >= rows[-1]["total"]


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


def check_devices_here(device_target, workers, visible_devices):
    """Stop before starting any rank when this host lacks the devices (every rank would fail with
    MindSpore's "Unsupported device target" dump instead)."""
    if device_target != "Ascend":
        return
    from lorapipe.preflight import ascend_devices

    needed = [int(d) for d in (visible_devices or range(workers))][:workers]
    found = ascend_devices()
    if not set(needed) <= set(found):
        have = f"Ascend devices {found}" if found else "no Ascend device (/dev/davinci*)"
        raise StepError(f"device_target Ascend needs devices {needed}, but this host ({socket.gethostname()}) has "
                        f"{have}: run finetune on an NPU node (profiles/slurm sends it to the ascend partition)")


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
                 device_target="CPU", base_model="", run=None, inputs=()):
    """Train (or resume) with the rendered YAML, each rank running `worker` (a script taking
    --config, --output_dir, --loss_tsv and --resume), and write to `out_dir`:
    checkpoint_network/rank_<r>/<name>_lora.ckpt (+ strategy/), loss.tsv, adapter_config.json and
    rank_logs/worker_<r>.log. `inputs` (the base checkpoint and the data) are part of the state key."""
    rendered = yaml.safe_load(Path(config_path).read_text())
    name = rendered["trainer"]["model_name"] + LORA_SUFFIX
    state = _state_dir(config_path, state_root, inputs)
    with state_lock(state):
        (state / "home").mkdir(parents=True, exist_ok=True)
        ranks = list(range(nodes * workers))
        ckpt_dir, tsv = state / "output" / "checkpoint", state / "train_log_rank_{rank}.tsv"
        complete = state / "complete"
        rank0_tsv = Path(str(tsv).format(rank=ranks[0]))
        saved = [last_checkpoint(ckpt_dir / f"rank_{r}") for r in ranks]
        if not complete.exists() and _finished(saved, rank0_tsv):
            # Killed after the final checkpoint was saved, before the marker: collect, never resume (MindSpore
            # refuses to train 0 more epochs, and the rerun would fail for ever).
            complete.write_text("done\n")
        if complete.exists():
            log.info("training with this config already finished in %s; collecting its outputs", state)
        else:
            resume = all(saved)
            if resume:
                log.info("resuming from the checkpoints in %s (global step %s)", ckpt_dir,
                         min(_global_step(ckpt) for ckpt in saved))
            check_devices_here(device_target, workers, visible_devices)
            progress = Progress("finetune", 1, unit="steps", every=5.0, from_first_update=True)

            def report():
                rows = read_rank_log(rank0_tsv)
                if rows:
                    progress.total = rows[-1]["total"]
                    progress.update(rows[-1]["step"], loss=rows[-1]["loss"], lr=rows[-1]["lr"])

            args = [str(Path(worker).resolve()), "--config", str(Path(config_path).resolve()),
                    "--output_dir", str((state / "output").resolve()), "--loss_tsv", str(tsv.resolve())]
            if resume:
                args += ["--resume", str(ckpt_dir.resolve())]
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


def collect_outputs(state, out_dir, ranks, name, tsv, tokens_per_step, adapter, run, inputs):
    out_dir = Path(out_dir)
    finals = [out_dir / "checkpoint_network", out_dir / "loss.tsv", out_dir / "adapter_config.json",
              out_dir / "rank_logs"]
    lasts = [last_checkpoint(state / "output" / "checkpoint" / f"rank_{rank}") for rank in ranks]
    missing = [rank for rank, last in zip(ranks, lasts) if last is None]
    if missing:
        raise StepError(f"training finished, but rank {missing[0]} saved no checkpoint in {state}")
    with atomic_outputs(finals, run=run, inputs=inputs, need_bytes=sum(os.path.getsize(p) for p in lasts)) as \
            (ckpts, loss, adapter_json, logs):
        for rank, last in zip(ranks, lasts):
            (ckpts / f"rank_{rank}").mkdir(parents=True)
            copy_hashed(last, ckpts / f"rank_{rank}" / f"{name}.ckpt")
        strategy = state / "output" / "strategy"
        if strategy.is_dir() and any(strategy.iterdir()):
            shutil.copytree(strategy, ckpts / "strategy")
        rows = read_rank_log(str(tsv).format(rank=ranks[0]))
        lines = ["\t".join(LOSS_TSV_COLUMNS)]
        for prev, row in zip([None, *rows], rows):
            # In sink mode (Ascend) a row closes sink_size steps: its step is the optimizer's global step
            # and its loss and lr are the last step's; the rate covers all the steps since the last row.
            dt = row["seconds"] - prev["seconds"] if prev and row["seconds"] > prev["seconds"] else None
            steps = row["step"] - prev["step"] if prev else row["step"]
            speed = f"{tokens_per_step * steps / dt:.0f}" if dt and tokens_per_step else ""
            lines.append(f"{row['step']}\t{row['loss']:.6f}\t{row['lr']:.6g}\t{speed}")
        loss.write_text("\n".join(lines) + "\n")
        adapter_json.write_text(json.dumps(adapter, indent=2) + "\n")
        logs.mkdir()
        for log_file in sorted((state / "logs").glob("*.log")):
            shutil.copyfile(log_file, logs / log_file.name)
    if rows:
        log.info("finetune: %d steps, loss %.4f -> %.4f (rank %d)", len(rows), rows[0]["loss"],
                 rows[-1]["loss"], ranks[0])
    return out_dir
