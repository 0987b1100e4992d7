"""The checks before any rank starts that need no network.

Devices, launcher, rank table, heads, parallel layout, sequence length, tokenizer, data and schedule.
Each returns a Check (ok, warn, fail, or skipped with the reason)."""

import glob
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from lorapipe.errors import StepError
from lorapipe.model.architecture import ALIBI, ROPE, head_problem, is_alibi
from lorapipe.model.tokenizer import ChatTokenizer
from lorapipe.train.launch import check_master_here
from lorapipe.train.ranktable import load_rank_table, read_hccn_conf


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skipped
    detail: str


def ascend_devices():
    """Device ids of the Ascend NPUs on this host (/dev/davinci<N>)."""
    return sorted(int(m.group(1)) for p in glob.glob("/dev/davinci*") if (m := re.fullmatch(r".*davinci(\d+)", p)))


def check_devices(device_target, parallel):
    wanted = parallel["workers"]
    if device_target == "CPU" and parallel["launcher"] == "rank_table":
        return Check("devices", "fail", "parallel.launcher rank_table: on CPU, MindSpore's collectives are set up by "
                                        "msrun's scheduler (MS_SCHED_HOST/PORT, MS_ROLE), which ranks started from a "
                                        "rank table do not have; use msrun")
    if device_target == "CPU":
        return Check("devices", "ok", f"CPU: {wanted} ranks per node as processes on {os.cpu_count()} cores")
    if device_target != "Ascend":
        return Check("devices", "skipped", f"no device count check for {device_target}")
    found = ascend_devices()
    if not found:
        return Check("devices", "skipped", "no Ascend device on this host (/dev/davinci*); the ranks run elsewhere")
    visible = [int(d) for d in parallel["visible_devices"].split(",")][:wanted]
    absent = [d for d in visible if d not in found]
    if len(visible) < wanted or absent:
        return Check("devices", "fail", f"parallel.workers {wanted} on devices {visible}, but this host has "
                                        f"{found}" + (f" (no device {absent})" if absent else ""))
    return Check("devices", "ok", f"{wanted} of {len(found)} Ascend devices: {visible}")


def check_launcher(parallel):
    """The launcher's network settings on this host: with one node, msrun's scheduler runs here, so
    parallel.master_addr must be one of its addresses (train.launch.check_master_here) and a fixed
    parallel.master_port must be free. Several nodes: the scheduler runs on node 0, checked there."""
    if parallel["launcher"] != "msrun" or parallel["nodes"] > 1:
        return Check("launcher", "skipped", f"{parallel['launcher']} on {parallel['nodes']} node(s): no scheduler "
                                            f"on this host to check")
    addr, port = parallel.get("master_addr"), parallel.get("master_port")
    if addr:
        try:
            check_master_here(addr)
        except StepError as e:
            return Check("launcher", "fail", str(e))
    if port:
        with socket.socket() as s:
            try:
                s.bind((addr or "", port))
            except OSError as e:
                return Check("launcher", "fail", f"parallel.master_port {port} cannot be bound on this host "
                                                 f"({e.strerror}): another msrun or service holds it; choose "
                                                 f"another, or null for a free one")
    return Check("launcher", "ok", f"msrun's scheduler at {addr or 'this host'}:{port or 'a free port'}")


def check_rank_table(rank_table, parallel, hccn_conf):
    if not rank_table:
        return Check("rank table", "skipped", f"launcher {parallel['launcher']} needs none")
    table = load_rank_table(rank_table)
    devices = [d for server in table["server_list"] for d in server["device"]]
    want = parallel["workers"] * parallel["nodes"]
    if len(devices) != want:
        return Check("rank table", "fail", f"{rank_table} lists {len(devices)} devices, parallel.workers x nodes "
                                           f"is {want}")
    if not Path(hccn_conf).is_file():
        return Check("rank table", "ok", f"{want} devices ({hccn_conf} not on this host to compare)")
    ips = read_hccn_conf(hccn_conf)
    wrong = [f"device {d['device_id']}: {d['device_ip']} (hccn.conf {ips.get(d['device_id'], 'none')})"
             for d in table["server_list"][0]["device"] if ips.get(d["device_id"]) != d["device_ip"]]
    if wrong:
        return Check("rank table", "fail", f"{rank_table} disagrees with {hccn_conf}: {'; '.join(wrong)}")
    return Check("rank table", "ok", f"{want} devices, IPs as in {hccn_conf}")


def check_layout(model_config, rendered):
    """The parallel layout against the network's widths, before the network is built: what MindFormers
    refuses with a traceback on every rank (or, for the vocabulary, accepts with a slower layout)."""
    par, cpu = rendered["parallel_config"], rendered["parallel"]["parallel_mode"] == 0
    mp, pp = par["model_parallel"], par["pipeline_stage"]
    problems = []
    if cpu and (mp > 1 or pp > 1):
        problems.append(f"parallel.model_parallel {mp} and pipeline_stage {pp}: lorapipe trains data parallel "
                        f"only on {rendered['context']['device_target']} (parallel_mode 0, no shard strategies); "
                        f"set both to 1")
    for what, size in (("hidden_size", model_config["hidden_size"]), ("num_heads", model_config["num_heads"]),
                       ("intermediate_size", model_config["intermediate_size"])):
        if size % mp:  # MindFormers: llama_layer.py:439-446 (FeedForward), modules/layers.py:681 (heads)
            problems.append(f"parallel.model_parallel {mp} does not divide the network's {what} {size}")
    if pp > model_config["num_layers"]:
        problems.append(f"parallel.pipeline_stage {pp} is more than the network's {model_config['num_layers']} "
                        f"layers: a stage would hold none")
    if problems:
        return Check("parallel layout", "fail", "; ".join(problems))
    if model_config["vocab_size"] % mp:  # models/llama/llama.py:527,544: then lm_head and the loss stay whole
        return Check("parallel layout", "warn", f"parallel.model_parallel {mp} does not divide vocab_size "
                                                f"{model_config['vocab_size']}: lm_head and the loss are not split "
                                                f"(every device computes all logits)")
    return Check("parallel layout", "ok", f"data {par['data_parallel']} x model {mp} x pipeline {pp}; widths and "
                                          f"{model_config['num_layers']} layers divide")


def check_heads(model_config):
    """The heads against the width, and under RoPE an even head dimension (model.architecture.head_problem)."""
    kind = ALIBI if is_alibi(model_config) else ROPE
    problem = head_problem(model_config["hidden_size"], model_config["num_heads"], kind)
    if problem:
        return Check("heads", "fail", f"{problem} (the base model's config.json hidden_size and num_attention_heads; "
                                      f"tiny_base.* for the tiny default)")
    return Check("heads", "ok", f"{model_config['num_heads']} heads of {model_config['hidden_size'] // model_config['num_heads']} "
                                f"dimensions ({kind})")


def check_positions(model_config, hf_config, allow_longer):
    """Rows longer than the positions the base model was trained on: RoPE angles (or ALiBi distances)
    it never saw. Refused unless data.allow_seq_length_over_max_positions says so."""
    limit = hf_config.get("model_max_length", hf_config.get("max_position_embeddings"))
    seq = model_config["seq_length"]
    if limit is None or seq <= limit:
        return Check("sequence length", "ok", f"data.seq_length {seq}" + (f" of the model's {limit} positions"
                                                                          if limit else " (the model names no limit)"))
    detail = (f"data.seq_length {seq} is more than the base model's {limit} positions (config.json "
              f"{'model_max_length' if 'model_max_length' in hf_config else 'max_position_embeddings'})")
    if allow_longer:
        return Check("sequence length", "warn", detail + "; allowed by data.allow_seq_length_over_max_positions")
    return Check("sequence length", "fail", detail + ": positions it never saw in training; set "
                                                     "data.allow_seq_length_over_max_positions: true to train anyway")


def check_tokenizer(tokenizer, model_config):
    tok = ChatTokenizer(tokenizer)
    size, vocab = tok.sp.get_piece_size(), model_config["vocab_size"]
    if size > vocab:
        return Check("tokenizer", "fail", f"{tokenizer} has {size} pieces, the model's vocab_size is {vocab}: "
                                          f"ids >= {vocab} would index past the embedding")
    ids = (model_config.get("user_token_id"), model_config.get("assistant_token_id"))
    if ids != (None, None) and ids != (tok.user, tok.assistant):
        return Check("tokenizer", "fail", f"user/assistant token ids {ids} in the YAML, {tok.user, tok.assistant} in "
                                          f"{tokenizer}")
    note = "" if size == vocab else f" (the model's vocabulary has {vocab - size} unused rows)"
    return Check("tokenizer", "ok", f"{size} pieces, user/assistant ids {tok.user}/{tok.assistant}{note}")


def check_data(train_data, rendered):
    import mindspore.dataset as ds

    data = ds.MindDataset(str(train_data), shuffle=False)
    rows = data.get_dataset_size()
    # Packed rows need the network that reads their segment ids, and that network needs them: a MindRecord
    # from before a data.packing edit must not train with the other setting's YAML.
    columns, wanted = set(data.get_col_names()), set(rendered["train_dataset"]["input_columns"])
    packed = bool(rendered["model"]["model_config"].get("packing"))
    if columns != wanted or packed != ("segment_ids" in columns):
        return [Check("data", "fail", f"{train_data}: columns {sorted(columns)}, the YAML reads {sorted(wanted)} with "
                                      f"model_config.packing {packed}: data and YAML come from different "
                                      f"data.packing settings")]
    width = rendered["model"]["model_config"].get("seq_length")
    row = next(data.create_tuple_iterator(output_numpy=True), [None])[0] if rows else None
    if width is not None and row is not None and len(row) != width + 1:
        return [Check("data", "fail", f"{train_data}: rows of {len(row)} tokens, but the YAML's seq_length {width} "
                                      f"trains rows of {width + 1}: data and YAML come from different "
                                      f"data.seq_length settings")]
    runner, par = rendered["runner_config"], rendered["parallel_config"]
    global_batch, steps, total = training_steps(rows, rendered)
    if steps == 0:
        micro = global_batch // runner["batch_size"] // par["data_parallel"]
        return [Check("data", "fail", f"{train_data}: {rows} rows give no full batch of train.batch_size "
                                      f"{runner['batch_size']} x data_parallel {par['data_parallel']}"
                                      + (f" x micro_batch_num {micro}" if micro > 1 else "") + f" = {global_batch}")]
    if runner["sink_mode"] and total < runner["sink_size"]:
        return [Check("data", "fail", f"{total} steps, fewer than sink_size {runner['sink_size']}")]
    return [Check("data", "ok", f"{rows} {'packed ' if packed else ''}rows, global batch {global_batch}: "
                                f"{steps} steps per epoch, {total} in all"),
            check_schedule(rendered, total)]


def training_steps(rows, rendered):
    """(global batch, steps per epoch, steps in all) as MindFormers 1.9 trains `rows` rows with a rendered YAML
    (the count the learning-rate schedule and the sink check need; a real run's loss.tsv has `all` lines).

    Semi-auto parallel with full_batch (Ascend): every rank reads every row (no shard:
    mindformers/dataset/base_dataset.py:73-75) in global batches of batch_size x data_parallel (x
    micro_batch_num with pipeline stages: trainer/base_trainer.py:226-243), drop_remainder. Data parallel
    (CPU): MindDataset gives each of the data_parallel shards ceil(rows / data_parallel) rows (MindSpore's
    shard sampler rounds up and wraps the last shard to the start) and each rank batches its own with
    drop_remainder (dataset/causal_language_model_dataset.py:147-149): 287 rows on 2 ranks of batch 4 are
    36 steps, not 287 // 8 = 35. Sink mode trains int(steps / sink_size * epochs) sinks of sink_size steps
    (trainer/utils.py:212, trainer/base_trainer.py:701-703)."""
    runner, par, parallel = rendered["runner_config"], rendered["parallel_config"], rendered["parallel"]
    micro = par["micro_batch_num"] if par["pipeline_stage"] > 1 else 1
    global_batch = runner["batch_size"] * par["data_parallel"] * micro
    if parallel["parallel_mode"] == 1 and parallel["full_batch"]:
        per_epoch = rows // global_batch
    else:
        per_epoch = -(-rows // par["data_parallel"]) // runner["batch_size"]
    if runner["sink_mode"]:
        return global_batch, per_epoch, runner["sink_size"] * int(per_epoch / runner["sink_size"] * runner["epochs"])
    return global_batch, per_epoch, per_epoch * runner["epochs"]


def check_schedule(rendered, total):
    """Legal values that are unlikely to be what was meant: warnings, not failures."""
    lr, save = rendered["lr_schedule"], rendered["callbacks"][-1]["save_checkpoint_steps"]
    odd = []
    warmup = int(lr["warmup_ratio"] * total)
    if lr["warmup_ratio"] > 0 and warmup == 0:
        odd.append(f"train.lr_schedule.warmup_ratio {lr['warmup_ratio']} of {total} steps is no warmup step")
    if lr["warmup_ratio"] >= 0.5:
        odd.append(f"train.lr_schedule.warmup_ratio {lr['warmup_ratio']}: the rate rises for {warmup} of {total} "
                   f"steps and decays for {total - warmup}")
    if lr["learning_rate"] > 0.1:
        odd.append(f"train.lr_schedule.learning_rate {lr['learning_rate']} (LoRA usually trains at 1e-5 to 1e-2)")
    if save > total:
        odd.append(f"train.save_checkpoint_steps {save} > {total} steps: only the final checkpoint is saved, so a "
                   f"killed run restarts from step 0")
    if odd:
        return Check("schedule", "warn", "; ".join(odd))
    return Check("schedule", "ok", f"{total} steps, {warmup} of warmup, a checkpoint every {save}")


def check_devices_here(device_target, workers, visible_devices):
    """Stop before starting any rank when this host lacks the devices (every rank would fail with
    MindSpore's "Unsupported device target" dump instead)."""
    if device_target != "Ascend":
        return
    needed = [int(d) for d in (visible_devices or range(workers))][:workers]
    found = ascend_devices()
    if not set(needed) <= set(found):
        have = f"Ascend devices {found}" if found else "no Ascend device (/dev/davinci*)"
        raise StepError(f"device_target Ascend needs devices {needed}, but this host ({socket.gethostname()}) has "
                        f"{have}: run finetune on an NPU node (profiles/slurm sends it to the ascend partition)")
