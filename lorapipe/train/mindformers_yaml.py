"""The MindFormers YAMLs lorapipe renders (finetune, predict), their one reader, adapter_config.json.

Rendered from the workflow config: the finetune YAML the recipe had users hand-edit
(run_baichuan2_7b_lora_910b.yaml), the predict YAML (run_baichuan2_7b_910b.yaml), the processor section
both share, and the PEFT-style adapter_config.json of a run. Never imports MindSpore."""

import yaml

from lorapipe.errors import InputError
from lorapipe.model.architecture import mindformers_model_config, model_class
from lorapipe.model.baichuan2 import LORA_A, LORA_B
from lorapipe.model.lora import lora_scale
from lorapipe.model.tokenizer import ChatTokenizer
from lorapipe.outputs import atomic_outputs

# The finetune's checkpoints are <model name>_lora*.ckpt (CheckpointMonitor's prefix).
LORA_SUFFIX = "_lora"
# What the training checkpoints hold (train.checkpoint_params), read by lorapipe.train.trainer in each rank:
# MindFormers has no key for it, and ignores top-level keys it does not know.
CHECKPOINT_PARAMS = "lorapipe_checkpoint_params"


def processor_config(tokenizer):
    """The recipe YAML's processor section: where MindFormers (and lorapipe's predict) find the
    tokenizer."""
    return {"return_tensors": "ms", "type": "LlamaProcessor",
            "tokenizer": {"type": "LlamaTokenizer", "vocab_file": str(tokenizer), "unk_token": "<unk>",
                          "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}}


def render_mindformers_config(hf_config, *, tokenizer, base_ckpt_dir, train_data, seq_length, name, lora,
                              train, parallel, device_target, position_embedding, packing=False,
                              checkpoint_format="ckpt"):
    """The MindFormers YAML (as a dict) for the recipe: what the user once edited by hand. On Ascend
    it is the official r1.0 run_baichuan2_7b_lora_910b.yaml (run_baichuan2_13b_lora_910b.yaml for an
    ALiBi base model) except for the deviations listed (with their reasons) in
    tests/test_golden_yaml.py; on CPU it is what MindFormers can run there. `position_embedding` is the run's
    architecture as the workflow decided it ("rope" | "alibi"). With `packing` the data has a segment_ids
    column, which the network reads (model_config.packing) to keep conversations apart."""
    cpu = device_target == "CPU"
    opt, lr = train["optimizer"], train["lr_schedule"]
    if cpu:  # CPU: MindFormers' wrapper uses Ascend-only overflow ops (lorapipe.train.trainer)
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
    model_config = mindformers_model_config(
        hf_config, seq_length, compute_dtype=train["compute_dtype"], param_init_type=train["param_init_type"],
        position_embedding_type=position_embedding,
        # Ascend has fused RMSNorm and flash-attention kernels; CPU has neither (no RmsNorm kernel).
        fused_rms_norm=not cpu, use_flash_attention=train["use_flash_attention"],
        user_token_id=tok.user, assistant_token_id=tok.assistant, offset=0, checkpoint_name_or_path="",
        pet_config={"pet_type": "lora", "lora_rank": lora["rank"], "lora_alpha": lora["alpha"],
                    "lora_dropout": lora["dropout"], "target_modules": lora["target_modules"]})
    if packing:
        # MindFormers hands the listed columns to the network by name (DataOrderWrapperCell,
        # trainer/base_trainer.py:926, 1305-1306): segment_ids reaches Baichuan2ForCausalLM.construct.
        dataset["input_columns"] = ["input_ids", "labels", "segment_ids"]
        model_config["packing"] = True
    return {
        "seed": train["seed"],
        "run_mode": "finetune",
        "output_dir": "./output",  # set per run by lorapipe.train.trainer.finetune
        # The folder that directly holds the complete base checkpoint. MindFormers counts it as complete
        # (trainer/utils.py:546-558 check_path_include_total_ckpt) and loads it into every rank before
        # any parallel compile (utils.py:466-469); the compile then slices each parameter to its layout
        # (mindspore/parallel/_utils.py:249-259). A file path under rank_0/ would count as a shard,
        # loaded after the compile, and a folder holding rank_0/ with auto_trans_ckpt fails on every
        # rank but 0 when only rank_0/ exists (utils.py:146-161).
        "load_checkpoint": f"{base_ckpt_dir}/rank_0",
        # checkpoint.format. With safetensors, lorapipe.train.finetune hands the ranks a folder of rank_<r>/
        # links to the base instead, the layout MindFormers 1.9 loads safetensors from without auto_trans_ckpt.
        "load_ckpt_format": checkpoint_format,
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
        "model": {"model_config": model_config, "arch": {"type": model_class(position_embedding)}},
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
             "integrated_save": False, "async_save": False, "checkpoint_format": checkpoint_format},
        ],
        "processor": processor_config(tokenizer),
        "profile": False,
        CHECKPOINT_PARAMS: train["checkpoint_params"],
    }


def render_predict_config(hf_config, *, tokenizer, name, generation, device_target, position_embedding, dtypes=None):
    """The recipe's predict YAML (run_baichuan2_7b_910b.yaml, section "MindSpore推理"): incremental
    decoding (use_past), the generation settings in model_config, one device. On the host it computes in
    fp32; on a device in `dtypes` ({compute_dtype, param_init_type}: the training's, so that a 7B model is
    14 GB of fp16 on one NPU, not 28 GB of fp32). The sequence length is the model's (prompt and answer
    together), not the training rows'. For an ALiBi model use_past means lorapipe's host decoder
    (lorapipe.infer.loader build_decoder): MindFormers 1.9's incremental path is RoPE-only."""
    seq_length = hf_config.get("model_max_length", hf_config["max_position_embeddings"])
    dtypes = {"compute_dtype": "float32", "param_init_type": "float32"} if device_target == "CPU" or not dtypes \
        else dtypes
    model_config = mindformers_model_config(hf_config, seq_length, use_past=True,
                                            position_embedding_type=position_embedding, **dtypes)
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
        "model": {"model_config": model_config, "arch": {"type": model_class(position_embedding)}},
        "processor": processor_config(tokenizer),
    }


def write_mindformers_config(path, rendered, run=None, inputs=()):
    with atomic_outputs([path], run=run, inputs=inputs) as (tmp,):
        tmp.write_text("# Rendered by lorapipe from the workflow config; not for hand editing.\n"
                       + yaml.safe_dump(rendered, sort_keys=False, allow_unicode=True))


def read_mindformers_yaml(path):
    """A rendered MindFormers YAML as a dict, with a clear error for a missing or unreadable file."""
    try:
        with open(path, encoding="utf-8") as f:
            rendered = yaml.safe_load(f)
        rendered["model"]["model_config"]
    except FileNotFoundError:
        raise InputError(f"{path}: MindFormers YAML not found") from None
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a MindFormers YAML with model.model_config ({e})") from None
    return rendered


def adapter_config(rendered, base_model):
    """PEFT-style adapter_config.json of a run, from the YAML it trained with: what a loader needs to
    apply or fold the adapter (see lorapipe.model.lora.read_adapter_config)."""
    model_config = rendered["model"]["model_config"]
    pet = model_config["pet_config"]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
            "r": pet["lora_rank"], "lora_alpha": pet["lora_alpha"], "lora_dropout": pet["lora_dropout"],
            "target_modules": pet["target_modules"], "scaling": lora_scale(pet["lora_alpha"], pet["lora_rank"]),
            "mindspore_parameter_suffixes": [LORA_A, LORA_B], "seq_length": model_config["seq_length"]}
