"""HF -> MindSpore conversion: exact tensors, logit parity with an independent forward, bad inputs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

from lorapipe.errors import InputError
from lorapipe.formats.msckpt import iter_checkpoint
from lorapipe.weights.convert import convert_hf_to_mindspore


def hf_state(base):
    return torch.load(base / "pytorch_model.bin", weights_only=True)


def expected_ms(state, h):
    """The mapping written out by hand, independently of lorapipe.weights.convert."""
    out = {"model.tok_embeddings.embedding_weight": state["model.embed_tokens.weight"],
           "model.norm_out.weight": state["model.norm.weight"], "lm_head.weight": state["lm_head.weight"]}
    layers = {k.split(".")[2] for k in state if k.startswith("model.layers.")}
    for i in layers:
        hf, ms = f"model.layers.{i}.", f"model.layers.{i}."
        w_pack = state[hf + "self_attn.W_pack.weight"]
        out[ms + "attention.wq.weight"] = w_pack[:h]
        out[ms + "attention.wk.weight"] = w_pack[h:2 * h]
        out[ms + "attention.wv.weight"] = w_pack[2 * h:]
        out[ms + "attention.wo.weight"] = state[hf + "self_attn.o_proj.weight"]
        out[ms + "feed_forward.w1.weight"] = state[hf + "mlp.gate_proj.weight"]
        out[ms + "feed_forward.w2.weight"] = state[hf + "mlp.down_proj.weight"]
        out[ms + "feed_forward.w3.weight"] = state[hf + "mlp.up_proj.weight"]
        out[ms + "attention_norm.weight"] = state[hf + "input_layernorm.weight"]
        out[ms + "ffn_norm.weight"] = state[hf + "post_attention_layernorm.weight"]
    return out


def assert_converted(ckpt, state, h, dtype=None):
    got = dict(iter_checkpoint(ckpt))
    want = expected_ms(state, h)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        tensor = tensor.to(dtype) if dtype else tensor
        ref = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert got[name].shape == tuple(tensor.shape), name
        assert got[name].tobytes() == ref.tobytes(), name


@pytest.fixture(scope="module")
def converted(tiny_base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "rank_0" / "tiny.ckpt"
    return convert_hf_to_mindspore(tiny_base_dir, out)


def test_every_tensor_equals_its_hf_source(tiny_base_dir, converted):
    assert_converted(converted, hf_state(tiny_base_dir), h=32)


def test_safetensors_sharded_and_bf16_sources(tiny_base_dir, tmp_path):
    state = hf_state(tiny_base_dir)
    shutil.copy(tiny_base_dir / "config.json", tmp_path / "config.json")
    # One bf16 safetensors file: dtype kept bit-exactly, or widened to fp32 on request.
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file(bf16, tmp_path / "model.safetensors")
    assert_converted(convert_hf_to_mindspore(tmp_path, tmp_path / "bf16.ckpt"), bf16, h=32)
    assert_converted(convert_hf_to_mindspore(tmp_path, tmp_path / "fp32.ckpt", dtype="fp32"), bf16, h=32,
                     dtype=torch.float32)
    # Two torch .bin shards behind an index.json, converted to fp16.
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = convert_hf_to_mindspore(tmp_path / "pytorch_model.bin.index.json", tmp_path / "fp16.ckpt", "fp16")
    assert_converted(out, state, h=32, dtype=torch.float16)


def test_logits_match_an_independent_reference_forward(tiny_base_dir, converted):
    import mindspore as ms
    import transformers

    from lorapipe.model.architecture import mindformers_model_config
    from lorapipe.model.network import build_model, logits

    hf_config = json.loads((tiny_base_dir / "config.json").read_text())
    net = build_model(mindformers_model_config(hf_config, seq_length=32))
    params = {n: ms.Parameter(ms.Tensor(a), name=n) for n, a in iter_checkpoint(converted)}
    not_loaded, unused = ms.load_param_into_net(net, params)
    assert not not_loaded and not unused
    ids = np.random.default_rng(0).integers(1, hf_config["vocab_size"], size=(2, 24)).astype(np.int32)

    # Reference: transformers' LLaMA fed the W_pack-split weights and the row-normalized lm_head.
    h = hf_config["hidden_size"]
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=hf_config["vocab_size"], hidden_size=h, intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"], num_attention_heads=hf_config["num_attention_heads"],
        max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    state = hf_state(tiny_base_dir)
    for i in range(hf_config["num_hidden_layers"]):
        q, k, v = state.pop(f"model.layers.{i}.self_attn.W_pack.weight").split(h)
        state.update({f"model.layers.{i}.self_attn.q_proj.weight": q,
                      f"model.layers.{i}.self_attn.k_proj.weight": k,
                      f"model.layers.{i}.self_attn.v_proj.weight": v})
    state["lm_head.weight"] = torch.nn.functional.normalize(state["lm_head.weight"], dim=-1)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long()).logits.numpy()

    got = logits(net, ids)
    assert got.shape == want.shape == (2, 24, hf_config["vocab_size"])
    assert np.abs(got - want).max() < 1e-4
    # The head really is normalized: the raw lm_head would give different logits.
    assert np.abs(want).max() > 0 and net.lm_head.weight.asnumpy().tobytes() == \
        hf_state(tiny_base_dir)["lm_head.weight"].numpy().tobytes()


def broken_copy(tiny_base_dir, tmp_path, edit):
    shutil.copy(tiny_base_dir / "config.json", tmp_path / "config.json")
    state = hf_state(tiny_base_dir)
    edit(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda s: s.update(extra=torch.zeros(2)), "unexpected tensor 'extra'"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(31)}),
     r"pytorch_model.bin: tensor 'model.norm.weight' has shape \(31,\), config.json implies \(32,\)"),
])
def test_bad_tensors_are_named_and_leave_no_output(tiny_base_dir, tmp_path, edit, message):
    source = broken_copy(tiny_base_dir, tmp_path, edit)
    with pytest.raises(InputError, match=message):
        convert_hf_to_mindspore(source, tmp_path / "out" / "x.ckpt")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_truncated_and_unknown_files(tiny_base_dir, tmp_path):
    source = broken_copy(tiny_base_dir, tmp_path, lambda s: None)
    data = (source / "pytorch_model.bin").read_bytes()
    (source / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="pytorch_model.bin: truncated, or not a torch zip checkpoint"):
        convert_hf_to_mindspore(source, tmp_path / "x.ckpt")
    save_file(hf_state(tiny_base_dir), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(InputError, match=r"m.safetensors: truncated: tensor '.*' ends at byte"):
        convert_hf_to_mindspore(tmp_path / "m.safetensors", tmp_path / "x.ckpt")
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(InputError, match=r"weights.h5: unknown weights format"):
        convert_hf_to_mindspore(tmp_path / "weights.h5", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_cli_reports_one_clear_error(tiny_base_dir, tmp_path):
    source = broken_copy(tiny_base_dir, tmp_path, lambda s: s.pop("lm_head.weight"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts/convert_weight.py"), "--torch_ckpt_path",
                           str(source), "--mindspore_ckpt_path", str(tmp_path / "o.ckpt")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("missing tensor 'lm_head.weight'")
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.ckpt").exists()


def test_hf_to_ckpt_to_hf_is_bit_exact(tiny_base_dir, converted, tmp_path):
    from safetensors.torch import load_file

    from lorapipe.weights.convert import export_hf

    out = export_hf(converted, tiny_base_dir, tmp_path / "hf")
    source = hf_state(tiny_base_dir)
    for exported in (torch.load(out / "pytorch_model.bin", weights_only=True),
                     torch.load(out / "pytorch_model.bin", weights_only=True, mmap=True),
                     load_file(out / "model.safetensors")):
        assert list(exported) == list(source)
        for name, tensor in source.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    for f in ("config.json", "tokenizer.model"):
        assert (out / f).read_bytes() == (tiny_base_dir / f).read_bytes()


def test_export_refuses_unfolded_lora(tiny_base_dir, converted, tmp_path):
    from lorapipe.formats.msckpt import write_checkpoint
    from lorapipe.weights.convert import export_hf

    lora = tmp_path / "lora.ckpt"
    extra = [("model.layers.0.attention.wq.mindpet_delta_lora_a", np.zeros((8, 32), np.float32))]
    write_checkpoint(lora, [*iter_checkpoint(converted), *extra])
    with pytest.raises(InputError, match="'model.layers.0.attention.wq.mindpet_delta_lora_a' is not a "
                                         "Baichuan2 model weight"):
        export_hf(lora, tiny_base_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_the_hf_export_takes_the_remote_code_the_model_names(tmp_path):
    """Baichuan2-7B-Chat's own layout: config.json and tokenizer_config.json name modeling_baichuan.py and
    tokenization_baichuan.py in auto_map, and modeling_baichuan.py imports configuration_baichuan,
    generation_utils and, inside a function, quantizer. All of them go with the export, with
    special_tokens_map.json; a module they name that is not there is one error naming it."""
    import json

    import pytest

    from lorapipe.errors import InputError
    from lorapipe.weights.convert import hf_side_files

    base = tmp_path / "Baichuan2-7B-Chat"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"auto_map": {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "baichuan-inc/Baichuan2-7B-Chat--modeling_baichuan.BaichuanForCausalLM"}}))
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [
        "tokenization_baichuan.BaichuanTokenizer", None]}}))
    for name, text in {"special_tokens_map.json": "{}", "tokenizer.model": "", "configuration_baichuan.py": "",
                       "generation_utils.py": "", "quantizer.py": "", "tokenization_baichuan.py": "import os\n",
                       "modeling_baichuan.py": "from .configuration_baichuan import BaichuanConfig\n"
                                               "from .generation_utils import build_chat_input\n"
                                               "def quantize(self):\n    from .quantizer import QLinear\n",
                       "README.md": ""}.items():
        (base / name).write_text(text)
    assert hf_side_files(base) == ["config.json", "tokenizer_config.json", "special_tokens_map.json",
                                   "tokenizer.model", "configuration_baichuan.py", "modeling_baichuan.py",
                                   "tokenization_baichuan.py", "generation_utils.py", "quantizer.py"]
    (base / "quantizer.py").unlink()
    with pytest.raises(InputError, match=r"imports quantizer, and quantizer.py is not there"):
        hf_side_files(base)
