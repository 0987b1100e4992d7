"""The GGUF export, read back with the gguf package's own reader (no llama.cpp here: tests/deploy runs the
files in llama.cpp): the metadata llama.cpp reads, and every tensor equal to the Llama export's after the
documented q/k permutation and, for q8_0, dequantisation."""

import hashlib
import json
import shutil
import subprocess
import sys
from importlib import metadata
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, write_base_with_random_lora

from lorapipe.errors import InputError
from lorapipe.exports import gguf as gguf_export
from lorapipe.exports import llama
from lorapipe.model.baichuan2 import ROPE_THETA
from lorapipe.model.chat_template import CHAT_TEMPLATE
from lorapipe.weights.checkpoints import fold_lora

gguf = pytest.importorskip("gguf")

RANK = 4
TYPES = ("f32", "f16", "q8_0")


@pytest.fixture(scope="module")
def run(tiny_base_dir, tmp_path_factory):
    """A LoRA-folded checkpoint (random adapters on wq, wk, wv), its Llama export and its GGUF files."""
    d = tmp_path_factory.mktemp("gguf")
    base, lora = write_base_with_random_lora(tiny_base_dir, d, RANK, seed=1)
    adapter_config = d / "adapter_config.json"
    adapter_config.write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ".*wq|.*wk|.*wv"}))
    folded = d / "merged_lora.ckpt"
    fold_lora(lora, folded, adapter_config)
    llama.export_llama(folded, tiny_base_dir, d / "hf_llama", "rope")
    paths = gguf_export.export_gguf(folded, tiny_base_dir, d / "gguf", "tiny", "rope", TYPES)
    return SimpleNamespace(dir=d, base=base, lora=lora, folded=folded, paths=paths,
                           config=json.loads((tiny_base_dir / "config.json").read_text()))


def fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def llama_tensors(run):
    """{GGUF name: the Llama export's tensor as llama.cpp holds it (q/k permuted)}."""
    from safetensors.numpy import load_file

    heads, layers = run.config["num_attention_heads"], run.config["num_hidden_layers"]
    out = {}
    for hf, array in load_file(run.dir / "hf_llama" / "model.safetensors").items():
        name = gguf_export.gguf_name(hf, layers)
        out[name] = gguf_export.permute_qk(array, heads) if hf.endswith(("q_proj.weight", "k_proj.weight")) else array
    return out


def sentencepiece_types(sp):
    """The token type of every piece, by sentencepiece's own API (its protobuf module is not imported in
    this process: see gguf_export._sentencepiece_model). The tiny tokenizer's only user-defined pieces
    are the turn markers, which the export makes CONTROL; everything else is NORMAL unless the API says."""
    t = gguf.TokenType
    return [t.UNKNOWN if sp.IsUnknown(i) else t.CONTROL if sp.IsControl(i) else t.UNUSED if sp.IsUnused(i)
            else t.BYTE if sp.IsByte(i) else t.CONTROL if sp.id_to_piece(i) in ("<reserved_106>", "<reserved_107>")
            else t.NORMAL for i in range(sp.get_piece_size())]


def test_metadata_is_what_llama_cpp_reads(run, tiny_base_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_base_dir / "tokenizer.model"))
    c = run.config
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    for t, path in run.paths.items():
        assert path.name == f"tiny-{t}.gguf"
        m = fields(gguf.GGUFReader(path))
        assert {k: m[k] for k in (
            "general.architecture", "general.name", "general.file_type", "general.quantization_version",
            "llama.vocab_size", "llama.context_length", "llama.embedding_length", "llama.block_count",
            "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
            "llama.rope.dimension_count", "llama.rope.freq_base")} == {
            "general.architecture": "llama", "general.name": "tiny", "general.file_type": file_types[t],
            "general.quantization_version": 2, "llama.vocab_size": c["vocab_size"],
            "llama.context_length": c["max_position_embeddings"], "llama.embedding_length": c["hidden_size"],
            "llama.block_count": c["num_hidden_layers"], "llama.feed_forward_length": c["intermediate_size"],
            "llama.attention.head_count": c["num_attention_heads"],
            "llama.attention.head_count_kv": c["num_attention_heads"],
            "llama.rope.dimension_count": c["hidden_size"] // c["num_attention_heads"],
            "llama.rope.freq_base": ROPE_THETA}
        assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c["rms_norm_eps"])
        # The SentencePiece vocabulary, piece for piece, and how llama.cpp is to use it.
        assert m["tokenizer.ggml.model"] == "llama" and m["tokenizer.ggml.pre"] == "default"
        n = sp.get_piece_size()
        assert m["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
        assert m["tokenizer.ggml.scores"] == [np.float32(sp.get_score(i)) for i in range(n)]
        types = m["tokenizer.ggml.token_type"]
        assert types == sentencepiece_types(sp)
        user, assistant = sp.piece_to_id("<reserved_106>"), sp.piece_to_id("<reserved_107>")
        assert types[user] == types[assistant] == gguf.TokenType.CONTROL  # the turn markers
        assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.eos_id()] == gguf.TokenType.CONTROL
        assert types.count(gguf.TokenType.BYTE) == 256 and types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
        assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"], m["tokenizer.ggml.unknown_token_id"],
                m["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 0)
        # lorapipe's prompts carry no BOS (llama.cpp adds one to SPM vocabularies unless told), nor a
        # dummy prefix space (Baichuan2's tokenizer has add_dummy_prefix off).
        assert (m["tokenizer.ggml.add_bos_token"], m["tokenizer.ggml.add_eos_token"],
                m["tokenizer.ggml.add_space_prefix"]) == (False, False, False)
        assert m["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_every_tensor_is_the_llama_exports(run):
    want = llama_tensors(run)
    q = gguf.GGMLQuantizationType
    readers = {t: {x.name: x for x in gguf.GGUFReader(p).tensors} for t, p in run.paths.items()}
    assert all(sorted(r) == sorted(want) for r in readers.values())
    for name, array in want.items():
        f32, f16, q8 = (readers[t][name] for t in TYPES)
        assert tuple(reversed(f32.shape.tolist())) == array.shape  # ggml lists dimensions fastest first
        assert f32.tensor_type == q.F32 and f32.data.tobytes() == array.astype(np.float32).tobytes(), name
        if array.ndim == 1:  # the RMSNorm weights stay f32 in every file, as llama.cpp's converter keeps them
            assert f16.tensor_type == q8.tensor_type == q.F32
            assert f16.data.tobytes() == q8.data.tobytes() == array.tobytes()
            continue
        assert f16.tensor_type == q.F16 and f16.data.tobytes() == array.astype(np.float16).tobytes(), name
        if array.shape[1] % 32:  # q8_0 blocks 32 values of a row: ffn_down (rows of intermediate_size 88)
            assert q8.tensor_type == q.F16 and q8.data.tobytes() == array.astype(np.float16).tobytes(), name
            continue
        assert q8.tensor_type == q.Q8_0, name
        assert q8.data.tobytes() == gguf.quants.quantize(array, q.Q8_0).tobytes(), name
        got = gguf.quants.dequantize(q8.data, q.Q8_0).reshape(array.shape)
        # round to nearest at scale d = max|block| / 127 (stored as f16): off by at most d/2 plus f16's rounding of d
        scale = np.abs(array.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got.reshape(-1, 32) - array.reshape(-1, 32)) <= scale * (0.5 + 127 * 2 ** -11)), name
    kept = sorted(n for n, x in readers["q8_0"].items() if x.tensor_type == q.F16)
    assert kept == [f"blk.{i}.ffn_down.weight" for i in range(run.config["num_hidden_layers"])]
    # The NormHead is applied: output.weight rows have unit norm.
    assert np.allclose(np.linalg.norm(want["output.weight"], axis=1), 1.0, atol=1e-6)


def rope_rotate_half(x, pos, theta=ROPE_THETA):
    """HF Llama's (and lorapipe's) rotary embedding of one head's vector: halves (x[i], x[i + d/2])."""
    d = x.shape[-1]
    freq = pos * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[: d // 2], x[d // 2:]
    return np.concatenate([a * np.cos(freq) - b * np.sin(freq), b * np.cos(freq) + a * np.sin(freq)])


def rope_adjacent_pairs(x, pos, theta=ROPE_THETA):
    """ggml's LLAMA_ROPE_TYPE_NORM (llama.cpp's llama architecture): pairs (x[2i], x[2i + 1])."""
    d = x.shape[-1]
    freq = pos * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * np.cos(freq) - b * np.sin(freq), b * np.cos(freq) + a * np.sin(freq)
    return out


def test_the_qk_permutation_turns_rotate_half_into_ggmls_rotary():
    """Attention scores with HF's rotary on the original q, k equal those with ggml's on the permuted
    rows; without the permutation they do not (so a file that skipped it would load and talk nonsense)."""
    rng = np.random.default_rng(0)
    heads, d, hidden = 4, 16, 64
    wq, wk = rng.normal(size=(heads * d, hidden)), rng.normal(size=(heads * d, hidden))
    x, y = rng.normal(size=hidden), rng.normal(size=hidden)
    pq, pk = gguf_export.permute_qk(wq, heads), gguf_export.permute_qk(wk, heads)
    for pos_q, pos_k in ((5, 2), (37, 37), (300, 11)):
        for h in range(heads):
            rows = slice(h * d, (h + 1) * d)
            want = rope_rotate_half(wq[rows] @ x, pos_q) @ rope_rotate_half(wk[rows] @ y, pos_k)
            got = rope_adjacent_pairs(pq[rows] @ x, pos_q) @ rope_adjacent_pairs(pk[rows] @ y, pos_k)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
            unpermuted = rope_adjacent_pairs(wq[rows] @ x, pos_q) @ rope_adjacent_pairs(wk[rows] @ y, pos_k)
            if pos_q != pos_k:  # at equal positions any rotation cancels
                assert abs(unpermuted - want) > 1e-3
    with pytest.raises(InputError, match="do not split into 4 heads"):
        gguf_export.permute_qk(np.zeros((6, 2)), 4)


def test_streams_through_add_tensor_info_and_write_tensor_data(run, tiny_base_dir, tmp_path, monkeypatch):
    """add_tensor keeps every array until the file is closed; the export must not use it."""
    def refuse(*args, **kwargs):
        raise AssertionError("GGUFWriter.add_tensor holds every tensor in memory")

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", refuse)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", refuse)
    calls = []
    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", lambda self, t, *a: calls.append(t.nbytes) or original(self, t, *a))
    paths = gguf_export.export_gguf(run.folded, tiny_base_dir, tmp_path, "tiny", "rope", ("f16",))
    assert len(calls) == len(gguf.GGUFReader(paths["f16"]).tensors)
    assert paths["f16"].read_bytes() == run.paths["f16"].read_bytes()  # deterministic


def test_alibi_models_are_refused_clearly(run, tiny_base_dir, tmp_path):
    """export_gguf takes the architecture the workflow decided: ALiBi is refused with llama.cpp's reason, and
    RoPE is taken as decided, even for a 5120-wide base (it gets as far as its tensors, which are not that
    wide)."""
    from lorapipe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"export_gguf: the base model uses ALiBi \(Baichuan2-13B\); llama.cpp's "
                                          r"llama architecture .* picks RoPE or ALiBi from the layer count alone"):
        gguf_export.export_gguf(run.folded, tiny_base_dir, tmp_path / "out", "tiny", "alibi")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="5120"):
        gguf_export.export_gguf(run.folded, wide(tiny_base_dir, tmp_path, run.config), tmp_path / "out", "tiny", "rope")
    assert not (tmp_path / "out").exists()


def wide(tiny_base_dir, tmp_path, config):
    """The tiny base with a config.json that says hidden_size 5120 and no "position_embedding"."""
    base = tmp_path / "wide"
    if not base.exists():
        shutil.copytree(tiny_base_dir, base)
        (base / "config.json").write_text(json.dumps(dict(config, hidden_size=5120)))
    return base


def test_bad_inputs_are_named_and_leave_no_output(run, tiny_base_dir, tmp_path):
    out = tmp_path / "out"

    def refused(ckpt, base, match, types=("f16", "q8_0")):
        with pytest.raises(InputError, match=match):
            gguf_export.export_gguf(ckpt, base, out, "tiny", "rope", types)
        assert not list(out.glob("*.gguf"))

    refused(run.lora, tiny_base_dir, "'model.layers.0.attention.wq.mindpet_delta_lora_a' is not a Baichuan2 model weight")
    refused(tmp_path / "missing.ckpt", tiny_base_dir, "missing.ckpt: checkpoint not found")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(run.folded.read_bytes()[:-1000])
    refused(truncated, tiny_base_dir, "truncated.ckpt: truncated")
    refused(run.folded, tiny_base_dir, r"GGUF file types \['q4_0'\]: expected some of f32, f16, q8_0", ("q4_0",))
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    (base / "config.json").write_text(json.dumps(dict(run.config, hidden_size=48)))
    refused(run.folded, base, r"tensor 'model.embed_tokens.weight' has shape \(\d+, 32\), config.json implies \(\d+, 48\)")
    (base / "config.json").write_text(json.dumps(run.config))
    (base / "tokenizer.model").write_bytes(b"not a model")
    refused(run.folded, base, "base/tokenizer.model: not a sentencepiece model")
    (base / "tokenizer.model").unlink()
    refused(run.folded, base, "base/tokenizer.model: tokenizer model not found")
    (base / "config.json").unlink()
    refused(run.folded, base, "base/config.json: file not found")


def test_cli_writes_the_files_and_a_manifest_with_their_digests(run, tiny_base_dir, tmp_path):
    script = [sys.executable, str(REPO / "scripts/export_gguf.py"), "--mindspore_ckpt_path", str(run.folded),
              "--base_model_dir", str(tiny_base_dir), "--name", "tiny", "--position_embedding", "rope"]
    proc = subprocess.run(script + ["--out_dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "q8_0: 2 tensors stay f16 (row length not a multiple of 32): blk.0.ffn_down.weight, blk.1.ffn_down.weight" \
        in proc.stderr
    for t in ("f16", "q8_0"):
        assert (tmp_path / f"tiny-{t}.gguf").read_bytes() == run.paths[t].read_bytes()
    manifest = json.loads((tmp_path / "tiny-f16.gguf.manifest.json").read_text())
    assert manifest["rule"] == "manual" and manifest["params"] == {"name": "tiny", "types": ["f16", "q8_0"],
                                                                      "position_embedding": "rope"}
    assert manifest["packages"]["gguf"] == metadata.version("gguf")
    for rel, entry in manifest["outputs"].items():  # hashed as written: the digests are the files'
        assert entry["sha256"] == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest(), rel
    assert sorted(manifest["outputs"]) == ["Modelfile", "tiny-f16.gguf", "tiny-q8_0.gguf"]
    proc = subprocess.run(script[:2] + ["--mindspore_ckpt_path", str(run.lora)] + script[4:] +
                          ["--out_dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is not a Baichuan2 model weight" in proc.stderr.strip().splitlines()[-1]


def test_mindspore_still_imports_after_an_export(tiny_base_dir):
    """The export reads tokenizer.model without protobuf's generated modules: MindSpore's own (old)
    checkpoint_pb2 must still import in the same process afterwards."""
    code = ("import sys; from lorapipe.exports.gguf import vocabulary; vocabulary(sys.argv[1], 600); "
            "import mindspore.train.serialization")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_base_dir / "tokenizer.model")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_rule_plans_both_files_and_refuses_an_alibi_model(tmp_path):
    import yaml
    from conftest import SAMPLE_DATA, default_config, snakemake, write_config

    plan = snakemake(tmp_path, "-n", "export_gguf", configfile=write_config(tmp_path / "c.yaml", default_config()))
    assert "rule export_gguf:" in plan.stdout
    for t in ("f16", "q8_0"):
        assert f"results/tiny/gguf/baichuan2_tiny-{t}.gguf" in plan.stdout
    cfg = yaml.safe_load((REPO / "config" / "tiny_13b.yaml").read_text())
    cfg["data"]["train"] = str(SAMPLE_DATA)
    refused = snakemake(tmp_path, "-n", "export_gguf", configfile=write_config(tmp_path / "13b.yaml", cfg), check=False)
    assert refused.returncode != 0
    assert "export_gguf: the base model uses ALiBi (Baichuan2-13B)" in refused.stdout + refused.stderr


def test_the_ollama_modelfile_names_the_f16_file_and_the_chat_template(run):
    """Written beside the f16 GGUF. The Go template is the chat template in Ollama's syntax: not run here
    (no Ollama, no Go), but built from the same pieces as the Jinja one (lorapipe.model.chat_template)."""
    from lorapipe.model.chat_template import OLLAMA_TEMPLATE

    text = (run.paths["f16"].parent / "Modelfile").read_text()
    assert f"\nFROM ./{run.paths['f16'].name}\n" in text
    assert f'\nTEMPLATE """{OLLAMA_TEMPLATE}"""\n' in text and "\nPARAMETER stop <reserved_106>\n" in text
    assert OLLAMA_TEMPLATE.count("<reserved_106>") == 1 and OLLAMA_TEMPLATE.endswith("<reserved_107>")
