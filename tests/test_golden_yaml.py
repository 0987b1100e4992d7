"""The YAMLs rendered for config/baichuan2_7b_910b.yaml and config/baichuan2_13b_910b.yaml against the
official MindFormers r1.0 research/baichuan2/run_baichuan2_7b_lora_910b.yaml and
run_baichuan2_13b_lora_910b.yaml (tests/data/, from mindspore-lab/mindformers at r1.0, commit
6a4076003f0c; the 13B file last changed in 71633c148814; Apache-2.0), key by key. Every difference is
deliberate and listed with its reason.
"""

import json

import pytest
import sentencepiece as spm
import yaml
from conftest import REPO, render

from lorapipe.config import load_config

OFFICIAL = REPO / "tests" / "data" / "run_baichuan2_7b_lora_910b.r1.0.yaml"
OFFICIAL_13B = REPO / "tests" / "data" / "run_baichuan2_13b_lora_910b.r1.0.yaml"

# Baichuan2-7B-Chat's config.json, as far as rendering reads it.
BAICHUAN2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
                "vocab_size": 125696, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                "model_max_length": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# Baichuan2-13B-Chat's config.json, as far as rendering reads it: hidden_size 5120 means ALiBi.
BAICHUAN2_13B = {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "intermediate_size": 13696,
                 "vocab_size": 125696, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                 "model_max_length": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# Official keys lorapipe renders differently, and why.
DEVIATIONS = {
    "run_mode": "the recipe starts run_baichuan2.py --run_mode finetune, which overrides the YAML's 'train'",
    "load_checkpoint": "the folder that directly holds the converted base: loaded before the parallel compile "
                       "(README, 'The real recipe')",
    "trainer.model_name": "base_model.name of the config",
    "optimizer.type": "FP32StateAdamWeightDecay is gone in MindFormers 1.9; its AdamW keeps fp32 state",
    "train_dataset.data_loader.dataset_dir": "the mindrecord rule's output",
    "train_dataset_task.dataset_config.data_loader.dataset_dir": "the mindrecord rule's output",
    "model.model_config.checkpoint_name_or_path": "the base loads through load_checkpoint, once",
    "model.arch.type": "Baichuan7BV2ForCausalLM is r1.0 research code; lorapipe registers Baichuan2ForCausalLM "
                       "(MindFormers 1.9 LlamaForCausalLM + NormHead)",
    "callbacks": "TsvLossMonitor for loss.tsv; CheckpointMonitor (r1.0 spells it CheckpointMointor) named after "
                 "the model, every train.save_checkpoint_steps, 2 kept; no ObsMonitor (ModelArts only)",
    "processor.tokenizer.type": "MindFormers 1.9 has no Baichuan2Tokenizer; LlamaTokenizer reads the same "
                                "sentencepiece model",
    "processor.tokenizer.vocab_file": "the base model's tokenizer.model",
}
# Official keys lorapipe does not render, and why that changes nothing.
NOT_RENDERED = {
    "optimizer.beta1": "MindFormers 1.9's AdamW takes betas: [beta1, beta2] (rendered as optimizer.betas)",
    "optimizer.beta2": "see optimizer.beta1",
    "parallel.strategy_ckpt_config.save_file": "without it MindFormers writes one strategy file per rank under "
                                               "output/strategy/, which merged_ckpt reads; the recipe's value "
                                               "sends every rank's to ./ckpt_strategy.ckpt in its own cwd",
    "context.device_id": "set per rank by msrun or the rank-table launcher",
    "context.graph_kernel_flags": "graph kernel fusion is off (enable_graph_kernel: False)",
    "context.save_graphs_path": "save_graphs is False",
    "model.model_config.multiple_of": "intermediate_size from config.json gives the FFN width directly",
    "model.model_config.compute_in_2d": "not a MindFormers 1.9 LlamaConfig key",
    "model.model_config.repetition_penalty": "generation settings live in the predict YAML (rule predict_config)",
    "model.model_config.temperature": "see repetition_penalty",
    "model.model_config.max_decode_length": "see repetition_penalty",
    "model.model_config.top_k": "see repetition_penalty",
    "model.model_config.top_p": "see repetition_penalty",
    "model.model_config.do_sample": "see repetition_penalty",
    "metric.type": "do_eval is False; evaluation is the evaluate rule",
    "eval_step_interval": "do_eval is False", "eval_epoch_interval": "do_eval is False",
    "eval_callbacks": "do_eval is False (ObsMonitor is ModelArts only)",
    "auto_tune": "MindFormers' default (False)", "filepath_prefix": "autotune is off",
    "autotune_per_step": "autotune is off",
    "profile_start_step": "profile is False", "profile_stop_step": "profile is False",
    "init_start_profile": "profile is False", "profile_communication": "profile is False",
    "profile_memory": "profile is False",
    "layer_scale": "MindFormers' default (False)", "layer_decay": "used only with layer_scale",
    "lr_scale_factor": "used only with layer_scale",
    "remote_save_url": "ModelArts (AICC) only",
}
NOT_RENDERED |= {key: "do_eval is False" for key in ("eval_dataset", "eval_dataset_task")}
# Keys lorapipe adds, and why.
ADDITIONS = {
    "load_ckpt_format": "MindFormers 1.9 reads it (default 'ckpt', said explicitly)",
    "optimizer.betas": "1.9's AdamW: [beta1, beta2] = [0.9, 0.98] as the recipe",
    "runner_config.gradient_accumulation_steps": "1.9 runner key; 1 = none, as the recipe",
    "train_dataset.batch_size": "1.9 reads the batch size from the dataset config too",
    "train_dataset_task.dataset_config.batch_size": "see train_dataset.batch_size",
    "model.model_config.intermediate_size": "the FFN width from config.json (11008), instead of multiple_of",
    "model.model_config.theta": "RoPE base 10000, as Baichuan2",
    "model.model_config.fused_rms_norm": "Ascend's fused RmsNorm kernel (1.9's default; off on CPU, which has none)",
    "model.model_config.use_rope_slice": "rotate-half by slices: the same math on every device",
    "model.model_config.tie_word_embeddings": "Baichuan2 has a separate lm_head",
    "lorapipe_checkpoint_params": "train.checkpoint_params, read by lorapipe's ranks (MindFormers ignores it): "
                                  "trainable saves no frozen weights; all would save what the recipe saves",
}


# The 13B: the same deviations, but its registered class is named as the recipe's (Baichuan13BV2ForCausalLM).
DEVIATIONS_13B = {k: v for k, v in DEVIATIONS.items() if k != "model.arch.type"}
NOT_RENDERED_13B = NOT_RENDERED | {
    "model.model_config.pretrain_seqlen": "RoPE extension setting (extend_method None): ALiBi has no rotary",
    "model.model_config.extend_method": "see pretrain_seqlen",
    "model.model_config.use_past_shard": "not a MindFormers 1.9 LlamaConfig key; training does not use_past",
    "parallel_config.use_seq_parallel": "MindFormers 1.9's default (False)",
}
ADDITIONS_13B = {k: v for k, v in ADDITIONS.items() if k not in ("model.model_config.theta",
                                                                 "model.model_config.use_rope_slice")} | {
    "model.model_config.intermediate_size": "the FFN width from config.json (13696), instead of multiple_of 128",
    "model.model_config.user_token_id": "the chat markers' ids from the tokenizer (the 7B recipe YAML has them)",
    "model.model_config.assistant_token_id": "see user_token_id",
    "model.model_config.position_embedding_type": "marks the ALiBi network for lorapipe's host forward and decoder",
}
GOLDEN = {
    "7b": (REPO / "config" / "baichuan2_7b_910b.yaml", OFFICIAL, BAICHUAN2_7B, DEVIATIONS, NOT_RENDERED, ADDITIONS),
    "13b": (REPO / "config" / "baichuan2_13b_910b.yaml", OFFICIAL_13B, BAICHUAN2_13B, DEVIATIONS_13B,
            NOT_RENDERED_13B, ADDITIONS_13B),
}


def flatten(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def baichuan2_like_tokenizer(path):
    """A sentencepiece model where <reserved_106>/<reserved_107> are ids 195/196, as in Baichuan2's."""
    from conftest import SAMPLE_DATA

    from lorapipe.data.conversations import conversation_texts
    from lorapipe.weights.tiny_base import train_tokenizer

    symbols = [f"<filler_{i}>" for i in range(192)] + ["<reserved_106>", "<reserved_107>"]
    model = train_tokenizer(conversation_texts(SAMPLE_DATA), 1000, user_defined_symbols=symbols)
    path.write_bytes(model)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (sp.piece_to_id("<reserved_106>"), sp.piece_to_id("<reserved_107>")) == (195, 196)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return baichuan2_like_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def render_recipe(config_file, hf_config, tokenizer):
    cfg = load_config(config_file)
    return render(cfg, hf_config, tokenizer, base_ckpt_dir="results/ckpt", train_data="results/data/belle_512.mindrecord",
                  name=cfg["base_model"]["name"])


@pytest.mark.parametrize("model", sorted(GOLDEN))
def test_rendered_910b_yaml_is_the_official_one_but_for_listed_deviations(model, tokenizer):
    config_file, official_file, hf_config, deviations, not_rendered, additions = GOLDEN[model]
    official = flatten(yaml.safe_load(official_file.read_text()))
    ours = flatten(json.loads(json.dumps(render_recipe(config_file, hf_config, tokenizer))))  # tuples as lists
    mismatches = []
    for key, value in official.items():
        if key in deviations:
            assert key in ours and ours[key] != value, f"{key}: listed as a deviation but rendered as official"
        elif any(key == k or key.startswith(k + ".") for k in not_rendered):
            assert key not in ours, f"{key}: listed as not rendered but present"
        elif ours.get(key, "<missing>") != value:
            mismatches.append(f"{key}: official {value!r}, rendered {ours.get(key, '<missing>')!r}")
    assert not mismatches, "\n".join(mismatches)
    unexplained = [k for k in ours if k not in official
                   and not any(k == a or k.startswith(a + ".") for a in additions)]
    assert not unexplained, unexplained
    assert ours["optimizer.betas"] == [official["optimizer.beta1"], official["optimizer.beta2"]]


def test_the_13b_recipe_renders_the_alibi_network(tokenizer):
    """hidden_size 5120 without an explicit "position_embedding" is Baichuan2-13B: ALiBi, no RoPE settings."""
    model = render_recipe(REPO / "config" / "baichuan2_13b_910b.yaml", BAICHUAN2_13B, tokenizer)["model"]
    assert model["arch"]["type"] == "Baichuan13BV2ForCausalLM"
    assert model["model_config"]["position_embedding_type"] == "alibi"
    assert not {"theta", "rotary_dtype", "use_rope_slice"} & set(model["model_config"])
