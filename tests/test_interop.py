"""The Llama export and the PEFT adapters, proven with the libraries people load them with: transformers
(no remote code) and peft, against lorapipe's own MindSpore model."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, write_base_with_random_lora

from lorapipe.errors import InputError
from lorapipe.exports import llama, peft
from lorapipe.formats.msckpt import iter_checkpoint
from lorapipe.weights.checkpoints import fold_lora

RANK, ALPHA = 4, 16
QUESTIONS = ["Hello!", "What is the capital of France?", "写一首关于秋天的诗", "Tell me about </s> and <s>."]
HISTORY = [("Hi", "Hello, how can I help?")]


@pytest.fixture(scope="module")
def run(tiny_base_dir, tmp_path_factory):
    """The workflow's artifacts for a run with a known adapter on wq, wk, wv (ckpt, merged_ckpt and its
    adapter_config.json, merged_lora) and the three exports made from them."""
    d = tmp_path_factory.mktemp("interop")
    base, lora = write_base_with_random_lora(tiny_base_dir, d, RANK, seed=0)
    adapter_config = d / "adapter_config.json"
    adapter_config.write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.1,
                                          "target_modules": ".*wq|.*wk|.*wv"}))
    folded = d / "merged_lora.ckpt"
    fold_lora(lora, folded, adapter_config)
    llama.export_llama(folded, tiny_base_dir, d / "hf_llama", "rope")
    llama.export_llama(base, tiny_base_dir, d / "hf_llama_base", "rope")
    peft.export_peft(lora, adapter_config, d / "peft_adapter", d / "hf_llama_base", "rope", w_pack_dir=d / "peft_w_pack",
                        w_pack_base_model=tiny_base_dir)
    return SimpleNamespace(dir=d, base=base, lora=lora, adapter_config=adapter_config, folded=folded,
                           hf_config=json.loads((tiny_base_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from lorapipe.model.tokenizer import ChatTokenizer

    return ChatTokenizer(tiny_base_dir / "tokenizer.model")


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def ms_model(run, ckpt, adapter=None):
    from lorapipe.infer.loader import load_model
    from lorapipe.model.architecture import mindformers_model_config

    return load_model(mindformers_model_config(run.hf_config, 64), ckpt, adapter)


def prompts(tok):
    from lorapipe.model.chat_template import chat_ids

    return [chat_ids(tok, q) for q in QUESTIONS] + [chat_ids(tok, QUESTIONS[1], HISTORY)]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_llama_export_gives_lorapipes_logits(run, tok):
    from lorapipe.model.network import logits

    for hf_dir, ckpt in (("hf_llama", run.folded), ("hf_llama_base", run.base)):
        config = json.loads((run.dir / hf_dir / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
        hf, net = hf_model(run.dir / hf_dir), ms_model(run, ckpt)
        assert type(hf).__name__ == "LlamaForCausalLM"
        for ids in prompts(tok):
            assert max_diff(hf_logits(hf, ids), logits(net, np.array([ids], np.int32))[0]) < 1e-4, (hf_dir, ids)
    # The finetune is in the export: the two exports differ clearly.
    ids = prompts(tok)[0]
    assert max_diff(hf_logits(hf_model(run.dir / "hf_llama"), ids), hf_logits(hf, ids)) > 1e-2


def test_llama_greedy_generate_equals_lorapipes_predict_tokens(run, tok):
    from lorapipe.infer.generate import generate

    hf, net = hf_model(run.dir / "hf_llama"), ms_model(run, run.folded)
    total = 0
    for ids in prompts(tok)[1::2]:  # three prompts, one of them multi-turn
        want = generate(net, ids, tok.eos, max_new_tokens=10)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, eos_token_id=tok.eos, pad_token_id=0)
        got = out[0, len(ids):].tolist()
        assert got[:len(want)] == want and got[len(want):] in ([], [tok.eos]), (ids, got, want)
        total += len(want)
    assert total > 10  # not all stopped at once


def test_tokenizer_loads_offline_and_its_chat_template_gives_chat_ids(run, tok):
    from transformers import AutoTokenizer

    from lorapipe.model.chat_template import chat_ids

    for use_fast in (True, False):
        hf_tok = AutoTokenizer.from_pretrained(run.dir / "hf_llama", use_fast=use_fast, local_files_only=True)
        for question in QUESTIONS:
            for history in ((), HISTORY):
                messages = [{"role": role, "content": text} for q, a in history
                            for role, text in (("user", q), ("assistant", a))]
                messages.append({"role": "user", "content": question})
                got = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                assert list(got) == chat_ids(tok, question, history), (use_fast, question, history)
        # A system prompt goes in front of the first user turn, as lorapipe.data.turns puts a record's.
        system = [{"role": "system", "content": "Be brief."}]
        got = hf_tok.apply_chat_template(system + [{"role": "user", "content": QUESTIONS[1]}], add_generation_prompt=True)
        assert list(got) == chat_ids(tok, "Be brief.\n" + QUESTIONS[1])
        assert hf_tok.eos_token_id == tok.eos
        assert hf_tok.decode(tok.encode(["Hello, world"])[0]) == "Hello, world"


def test_peft_adapter_on_the_llama_base_equals_the_folded_export(run, tok):
    from peft import AutoPeftModelForCausalLM

    config = json.loads((run.dir / "peft_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (RANK, ALPHA, ["k_proj", "q_proj", "v_proj"])
    assert config["base_model_name_or_path"] == str(run.dir / "hf_llama_base")
    # AutoPeftModel finds the base through base_model_name_or_path.
    adapted = AutoPeftModelForCausalLM.from_pretrained(run.dir / "peft_adapter", local_files_only=True).eval()
    folded = hf_model(run.dir / "hf_llama")
    for ids in prompts(tok):
        assert max_diff(hf_logits(adapted, ids), hf_logits(folded, ids)) < 1e-5
    merged, want = adapted.merge_and_unload().state_dict(), folded.state_dict()
    assert sorted(merged) == sorted(want)
    assert max(max_diff(merged[k], want[k]) for k in want) < 1e-6


def test_w_pack_adapter_is_the_qkv_adapter_at_rank_3r(run):
    from peft import LoraConfig, LoraModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    qkv, w_pack = (load_file(run.dir / d / "adapter_model.safetensors") for d in ("peft_adapter", "peft_w_pack"))
    config = json.loads((run.dir / "peft_w_pack" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (3 * RANK, 3 * ALPHA, ["W_pack"])
    h, prefix = run.hf_config["hidden_size"], "base_model.model.model.layers"
    layers = run.hf_config["num_hidden_layers"]
    for i in range(layers):
        a = w_pack[f"{prefix}.{i}.self_attn.W_pack.lora_A.weight"]
        b = w_pack[f"{prefix}.{i}.self_attn.W_pack.lora_B.weight"]
        parts = [(qkv[f"{prefix}.{i}.self_attn.{p}.lora_A.weight"], qkv[f"{prefix}.{i}.self_attn.{p}.lora_B.weight"])
                 for p in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(a, torch.cat([pa for pa, _ in parts]))  # A stacked
        assert torch.equal(b, torch.block_diag(*(pb for _, pb in parts)))  # B block diagonal
        delta = b @ a * (config["lora_alpha"] / config["r"])
        assert max_diff(delta, torch.cat([pb @ pa * (ALPHA / RANK) for pa, pb in parts])) < 1e-6

    # PEFT applies it to modules named as Baichuan2's (Baichuan's own model code is not available
    # offline): merged, W_pack equals the Llama export's merged q, k, v.
    llama_base, llama_folded = (load_file(run.dir / d / "model.safetensors") for d in ("hf_llama_base", "hf_llama"))
    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.layers = torch.nn.ModuleList()
    for i in range(layers):
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.W_pack = torch.nn.Linear(h, 3 * h, bias=False)
        layer.self_attn.W_pack.weight.data = torch.cat(
            [llama_base[f"model.layers.{i}.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        net.model.layers.append(layer)
    config = LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "task_type",
                                                                        "base_model_name_or_path")})
    lora = LoraModel(net, config, "default")
    result = set_peft_model_state_dict(lora, {k[len("base_model."):]: v for k, v in w_pack.items()})
    assert not [k for k in result.missing_keys if "lora_" in k]
    merged = lora.merge_and_unload()
    for i in range(layers):
        want = torch.cat([llama_folded[f"model.layers.{i}.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        assert max_diff(merged.model.layers[i].self_attn.W_pack.weight.detach(), want) < 1e-6


def assert_same_tensors(path, want_path):
    got, want = dict(iter_checkpoint(path)), dict(iter_checkpoint(want_path))
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize("adapter", ["peft_adapter", "peft_w_pack"])
def test_export_import_round_trip_gives_the_same_tensors(run, tmp_path, adapter):
    out = peft.import_peft(run.dir / adapter, run.base, tmp_path / "lora.ckpt", tmp_path / "adapter_config.json")
    assert_same_tensors(out, run.lora)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (RANK, ALPHA, ".*wq|.*wk|.*wv")
    # fold_lora takes the pair, and folds it to merged_lora's tensors.
    fold_lora(out, tmp_path / "folded.ckpt", tmp_path / "adapter_config.json")
    assert_same_tensors(tmp_path / "folded.ckpt", run.folded)
    # Folded straight in.
    peft.import_peft(run.dir / adapter, run.base, tmp_path / "folded_in.ckpt", fold_in=True)
    assert_same_tensors(tmp_path / "folded_in.ckpt", run.folded)


def test_import_a_peft_trained_adapter_on_every_linear(run, tok, tmp_path):
    """An adapter PEFT itself wrote (q, k, v, o and MLP): imported as LoRA tensors, lorapipe's model (which
    predict and evaluate load) computes what PEFT computes."""
    from peft import LoraConfig, get_peft_model

    from lorapipe.model.lora import read_adapter_config
    from lorapipe.model.network import logits

    torch.manual_seed(0)
    model = get_peft_model(hf_model(run.dir / "hf_llama_base"), LoraConfig(
        r=2, lora_alpha=6, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    model.save_pretrained(tmp_path / "trained")
    peft.import_peft(tmp_path / "trained", run.base, tmp_path / "lora.ckpt", tmp_path / "adapter_config.json")
    net = ms_model(run, tmp_path / "lora.ckpt", read_adapter_config(tmp_path / "adapter_config.json"))
    for ids in prompts(tok)[:3]:
        assert max_diff(logits(net, np.array([ids], np.int32))[0], hf_logits(model, ids)) < 1e-4
    names = {n for n, _ in iter_checkpoint(tmp_path / "lora.ckpt") if n.endswith("mindpet_delta_lora_a")}
    assert len(names) == 7 * run.hf_config["num_hidden_layers"]


def test_alibi_models_are_refused_clearly(run, tiny_base_dir, tmp_path):
    """The RoPE-only exports take the architecture the workflow decided, and refuse ALiBi with the reason of
    the one guard (require_rope), before they write anything."""
    from lorapipe.errors import ConfigError
    from lorapipe.model.architecture import ROPE_ONLY_EXPORTS, require_rope

    with pytest.raises(ConfigError, match=r"export_llama: the base model uses ALiBi \(Baichuan2-13B\); a plain "
                                          r"LlamaForCausalLM has rotary position embeddings only"):
        llama.export_llama(run.base, tiny_base_dir, tmp_path / "out", "alibi")
    with pytest.raises(ConfigError, match=r"export_peft: the base model uses ALiBi"):
        peft.export_peft(run.lora, run.adapter_config, tmp_path / "out", "base", "alibi")
    assert not (tmp_path / "out").exists()
    assert all(require_rope("rope", export) == "rope" for export in ROPE_ONLY_EXPORTS)
    with pytest.raises(ValueError, match="expected rope or alibi"):
        require_rope("auto", "export_llama")


def test_bad_inputs_are_named_and_leave_no_output(run, tiny_base_dir, tmp_path):
    with pytest.raises(InputError, match="'model.layers.0.attention.wq.mindpet_delta_lora_a' is not a Baichuan2 "
                                         "model weight"):
        llama.export_llama(run.lora, tiny_base_dir, tmp_path / "llama", "rope")
    with pytest.raises(InputError, match="no LoRA tensors .* needs the unfolded checkpoint"):
        peft.export_peft(run.folded, run.adapter_config, tmp_path / "peft", "base", "rope")
    # PEFT adapters lorapipe's model cannot take: lm_head, DoRA, a rank its config does not say.
    adapter = tmp_path / "adapter"
    shutil.copytree(run.dir / "peft_adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    from safetensors.numpy import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    for edit, message in [
        ({"use_dora": True}, "use_dora: True is not plain LoRA"),
        ({"r": 8}, r"model.layers.0.self_attn.[qkv]_proj.lora_A is \(4, 32\) and lora_B is \(32, 4\); .* says rank 8"),
    ]:
        (adapter / "adapter_config.json").write_text(json.dumps(dict(config, **edit)))
        with pytest.raises(InputError, match=message):
            peft.import_peft(adapter, run.base, tmp_path / "x.ckpt", tmp_path / "x.json")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32),
               "base_model.model.lm_head.lora_B.weight": np.zeros((600, 4), np.float32)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match="LoRA on 'lm_head': lorapipe's model has no such cell"):
        peft.import_peft(adapter, run.base, tmp_path / "x.ckpt", tmp_path / "x.json")
    # A base that is not the adapter's: shapes named.
    with pytest.raises(InputError, match="already holds LoRA tensors"):
        peft.import_peft(run.dir / "peft_adapter", run.lora, tmp_path / "x.ckpt", tmp_path / "x.json")
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "x.json").exists()
    assert not (tmp_path / "llama").exists() and not (tmp_path / "peft").exists()


def test_import_cli(run, tmp_path):
    script = [sys.executable, str(REPO / "scripts/import_peft.py"), "--adapter_dir", str(run.dir / "peft_adapter"),
              "--base_ckpt", str(run.base)]
    proc = subprocess.run(script + ["--dst_ckpt", str(tmp_path / "lora.ckpt"), "--dst_adapter_config",
                                    str(tmp_path / "adapter_config.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(tmp_path / "lora.ckpt", run.lora)
    assert json.loads((tmp_path / "lora.ckpt.manifest.json").read_text())["rule"] == "manual"
    proc = subprocess.run(script[:-2] + ["--base_ckpt", str(run.folded), "--dst_ckpt", str(tmp_path / "f.ckpt"),
                                         "--fold"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(script[:4] + ["--base_ckpt", str(tmp_path / "missing.ckpt"), "--dst_ckpt",
                                        str(tmp_path / "m.ckpt"), "--fold"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("missing.ckpt: checkpoint not found")


def test_rope_set_in_the_config_holds_for_a_5120_wide_base_in_every_job(tiny_base_dir, tmp_path):
    """Issue 24: base_model.position_embedding rope on a base whose config.json has hidden_size 5120 and
    no "position_embedding" key: `all` planned the Llama exports, and export_llama then refused them, as
    it decided the architecture again from config.json alone (5120 wide: ALiBi). The plan's decision now
    reaches every job. (One layer at Baichuan2-13B's width, 235 MB in fp16.)"""
    from conftest import SAMPLE_DATA, default_config, snakemake, write_config
    from test_preflight import BAICHUAN2_7B_2_LAYERS, write_7b_shaped_base

    wide = dict(BAICHUAN2_7B_2_LAYERS, hidden_size=5120, num_attention_heads=40, intermediate_size=128,
                num_hidden_layers=1, vocab_size=1000)
    write_7b_shaped_base(tmp_path / "base", tiny_base_dir / "tokenizer.model", wide)
    cfg = default_config()
    cfg["base_model"].update(path=str(tmp_path / "base"), position_embedding="rope")
    cfg["data"]["train"] = str(SAMPLE_DATA)
    configfile = write_config(tmp_path / "c.yaml", cfg)
    assert "export_llama " in snakemake(tmp_path, "-n", configfile=configfile).stdout
    snakemake(tmp_path, "--cores", "2", "export_llama_base", "predict_config", configfile=configfile)
    exported = json.loads((tmp_path / "results/tiny/hf_llama_base/config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["hidden_size"] == 5120
    predict_yaml = (tmp_path / "results/tiny/predict/run_baichuan2.yaml").read_text()
    assert "Baichuan2ForCausalLM" in predict_yaml and "position_embedding_type" not in predict_yaml


def test_the_hf_export_loads_with_its_remote_code_and_computes_the_folded_model(run, tiny_base_dir, tmp_path, tok):
    """Issue 36: hf/ kept config.json's auto_map but not the files it names, so transformers could not load
    the real Baichuan2's export. The tiny base now ships small remote-code files of lorapipe's own, named in
    auto_map as the real model's are; hf/ carries them, loads with trust_remote_code=True, and gives the
    logits of the Llama export (checked against lorapipe's network above) and the tokenizer's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from lorapipe.weights.convert import export_hf

    out = tmp_path / "hf_remote"
    export_hf(run.folded, tiny_base_dir, out)
    assert {"configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, torch_dtype=torch.float32).eval()
    reference = LlamaForCausalLM.from_pretrained(run.dir / "hf_llama", torch_dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(["法国的首都是哪里？ The capital of France is Paris."])[0][:40]])
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = "hello world, 你好"
    assert hf_tok(text)["input_ids"] == tok.encode([text])[0]
