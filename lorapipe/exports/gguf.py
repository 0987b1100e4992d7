"""The finetuned model as GGUF files for llama.cpp (llama-cli, llama-server, Ollama, LM Studio).

A complete MindSpore checkpoint (LoRA folded: merged_lora.ckpt) plus the base model's config.json and
tokenizer.model -> `<name>-f16.gguf`, `<name>-q8_0.gguf` (and `-f32.gguf` on request).

Architecture `llama`, not llama.cpp's own `baichuan`. Baichuan2-7B is a Llama with a fused W_pack and
a NormHead (exports.llama.export_llama), and llama.cpp's `baichuan` architecture decides RoPE or ALiBi from the
layer count alone (src/models/baichuan.cpp: 32 layers RoPE, 40 ALiBi, any other count neither), and its
converter (conversion/baichuan.py) writes lm_head as it is, without the NormHead. As `llama` the file
computes what lorapipe's network computes at any depth, and the tiny default can prove it in llama.cpp.

What llama.cpp's own converter (convert_hf_to_gguf.py, LlamaModel) would write for exports.llama's Llama
directory, tensor by tensor:
* names from gguf's tensor map for MODEL_ARCH.LLAMA (token_embd, blk.N.attn_q, ..., output);
* q and k rows permuted for llama.cpp's rotary layout: HF rotates the two halves of a head
  (rotate-half), ggml's LLAMA_ROPE_TYPE_NORM rotates adjacent pairs, so each head's rows
  [x0..x(d/2-1), y0..y(d/2-1)] become [x0, y0, x1, y1, ...] (LlamaModel.permute: reshape
  (heads, 2, d/2, in), swap axes 1 and 2);
* lm_head rows L2-normalised once (NormHead; exact for inference, see llama.norm_head);
* 1-D tensors (the RMSNorm weights) stay f32 in every file, as the converter keeps them;
* q8_0 quantises every 2-D weight in blocks of 32 along a row; a tensor whose row length is not a
  multiple of 32 stays f16, as the converter falls back (gguf.QuantError). The tiny default's
  ffn_down (rows of intermediate_size 176) is such a tensor; Baichuan2-7B's widths (4096, 11008) have none.

The tokenizer is Baichuan2's SentencePiece model as llama.cpp's SPM tokenizer reads it: every piece with
its score and type (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE, as the model file says),
bos/eos/unk/pad ids, add_space_prefix as the model's add_dummy_prefix (Baichuan2: off), no BOS or EOS
added (`tokenizer.ggml.add_bos_token` false: lorapipe's prompts and training rows carry none, while
llama.cpp adds a BOS to SPM vocabularies by default). The turn markers `<reserved_106>`/`<reserved_107>`
are CONTROL tokens: llama.cpp matches them in text only when asked to parse special tokens, which chat
formatting does (the rendered template is tokenised with parse_special), while plain text tokenised
without it keeps a typed marker as characters, as lorapipe.data.turns does. `tokenizer.chat_template` is
lorapipe.model.chat_template's, the layout of its chat_ids.

Streaming: the plan (every tensor's name, shape and type) comes from the checkpoint's index, then each
tensor is read once, converted in row chunks and appended to every output file through
GGUFWriter.add_tensor_info / write_tensor_data, one tensor in memory at a time (add_tensor would keep
every array until the end). The outputs are hashed as they are written (lorapipe.digests).
"""

import logging
from pathlib import Path

import numpy as np

from lorapipe.errors import InputError
from lorapipe.exports.llama import llama_tensors
from lorapipe.formats.checkpoint_file import checkpoint_index, iter_checkpoint
from lorapipe.formats.gguf import (
    TYPES,
    Stored,
    encode,
    gguf_package,
    storage_type,
    stored_nbytes,
    writer_class,
)
from lorapipe.formats.hf_io import read_json
from lorapipe.formats.msckpt import numpy_dtype
from lorapipe.model.architecture import require_rope
from lorapipe.model.baichuan2 import (
    ROPE_THETA,
    check_tensors,
    fused_record,
    mindspore_to_hf,
    norm_head,
)
from lorapipe.model.chat_template import CHAT_TEMPLATE, OLLAMA_TEMPLATE
from lorapipe.model.tokenizer import ASSISTANT_PIECE, USER_PIECE
from lorapipe.outputs import atomic_outputs
from lorapipe.progress import Progress

log = logging.getLogger("lorapipe")


GGUF_ARCHITECTURE = "llama"  # llama.cpp's architecture name (the module docstring says why)


def gguf_name(hf_name, n_layers):
    """llama.cpp's name for an HF Llama tensor name (gguf's tensor map for MODEL_ARCH.LLAMA)."""
    gguf = gguf_package()
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(hf_name, try_suffixes=(".weight",))
    if name is None:
        raise InputError(f"tensor {hf_name!r}: llama.cpp's llama architecture has no tensor for it")
    return name


def permute_qk(weight, n_head):
    """q or k rows from HF's rotate-half layout to llama.cpp's adjacent pairs, per head: convert_hf_to_gguf's
    LlamaModel.permute (Baichuan2-7B has as many kv heads as heads)."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise InputError(f"{rows} rows do not split into {n_head} heads of two rotary halves")
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _fields(data, where):
    """(field number, wire type, value) of a protobuf message's bytes: varints as ints, 32-bit values as
    raw bytes, length-delimited ones as bytes (the few fields read here need no more)."""
    pos, n = 0, len(data)

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= n or shift > 63:
                raise InputError(f"{where}: not a sentencepiece model (corrupt protobuf)")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    while pos < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size = varint()
            value, pos = data[pos:pos + size], pos + size
        else:
            raise InputError(f"{where}: not a sentencepiece model (protobuf wire type {wire})")
        if pos > n:
            raise InputError(f"{where}: not a sentencepiece model (truncated)")
        yield number, wire, value


def _sentencepiece_model(path):
    """[(piece, score, type)] and the normalizer settings of a sentencepiece model file.

    The ModelProto is read by hand (pieces = field 1: piece 1, score 2, type 3; normalizer_spec = field
    3: name 1, add_dummy_prefix 3, remove_extra_whitespaces 4; proto2 defaults NORMAL, true, true):
    importing protobuf's generated sentencepiece_model_pb2 here would pick protobuf's C implementation
    before MindSpore, whose old generated checkpoint_pb2 then fails to import in the same process
    (MindSpore sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python on import, which only works first).
    sentencepiece itself loads the file too, as the check that it is a model."""
    import struct

    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tokenizer model not found")
    data = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        raise InputError(f"{path}: not a sentencepiece model ({e})") from None
    pieces, normalizer = [], {"name": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for number, wire, value in _fields(data, path):
        if number == 1 and wire == 2:
            piece = {"piece": b"", "score": 0.0, "type": 1}
            for f, w, v in _fields(value, path):
                if f == 1 and w == 2:
                    piece["piece"] = bytes(v)
                elif f == 2 and w == 5:
                    piece["score"] = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    piece["type"] = v
            pieces.append((piece["piece"].decode("utf-8"), piece["score"], piece["type"]))
        elif number == 3 and wire == 2:
            for f, w, v in _fields(value, path):
                if f == 1 and w == 2:
                    normalizer["name"] = bytes(v).decode("utf-8")
                elif f in (3, 4) and w == 0:
                    normalizer["add_dummy_prefix" if f == 3 else "remove_extra_whitespaces"] = bool(v)
    if [p for p, _, _ in pieces] != [sp.id_to_piece(i) for i in range(sp.get_piece_size())]:
        raise InputError(f"{path}: its pieces could not be read")  # a parser bug, never a silent mismatch
    return sp, pieces, normalizer


def vocabulary(tokenizer_model, vocab_size):
    """(tokens, scores, token types, special ids, add_space_prefix) of a sentencepiece model for a model
    of `vocab_size` rows: its pieces with their scores and types, padded with UNUSED `[PADi]` up to the
    model's vocab_size (convert_hf_to_gguf does the same); the turn markers become CONTROL."""
    gguf = gguf_package()
    sp, pieces, normalizer = _sentencepiece_model(tokenizer_model)
    n = len(pieces)
    if n > vocab_size:
        raise InputError(f"{tokenizer_model}: {n} pieces, config.json's vocab_size is {vocab_size}")
    tokens = [p.encode("utf-8") for p, _, _ in pieces] + [f"[PAD{i}]".encode() for i in range(n, vocab_size)]
    scores = [float(s) for _, s, _ in pieces] + [-1000.0] * (vocab_size - n)
    types = [int(t) for _, _, t in pieces] + [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
    for piece in (USER_PIECE, ASSISTANT_PIECE):
        i = sp.piece_to_id(piece)
        if i == sp.unk_id() or sp.id_to_piece(i) != piece:
            raise InputError(f"{tokenizer_model}: the tokenizer has no piece {piece!r} (Baichuan2's turn marker)")
        types[i] = int(gguf.TokenType.CONTROL)
    if sp.eos_id() < 0:
        raise InputError(f"{tokenizer_model}: the tokenizer has no eos piece")
    if normalizer["name"] not in ("identity", "") or normalizer["remove_extra_whitespaces"]:
        log.warning("%s: normalizer %r%s: llama.cpp's SPM tokenizer does not normalise, so texts that this "
                    "normalisation changes tokenise differently in llama.cpp", tokenizer_model, normalizer["name"],
                    ", remove_extra_whitespaces" if normalizer["remove_extra_whitespaces"] else "")
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return tokens, scores, types, ids, normalizer["add_dummy_prefix"]


def add_metadata(writer, config, tokenizer_model, file_type, name):
    """Every key/value of the file: the model's hyperparameters for llama.cpp's llama architecture and
    the tokenizer."""
    gguf = gguf_package()
    h, heads = config["hidden_size"], config["num_attention_heads"]
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(h)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(h // heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])

    tokens, scores, types, ids, add_space_prefix = vocabulary(tokenizer_model, config["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    if ids["unk"] >= 0:
        writer.add_unk_token_id(ids["unk"])
    writer.add_pad_token_id(config.get("pad_token_id", 0))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template(CHAT_TEMPLATE)


def tensor_plan(ckpt, config):
    """[(GGUF name, HF Llama name, shape)] of a checkpoint in file order, checked as export_hf checks it:
    every tensor config.json implies, the right shapes, no LoRA tensors left."""
    records = [(name, (numpy_dtype(t), shape)) for name, t, shape in checkpoint_index(ckpt)]
    check_tensors({n: (s, ckpt) for n, (_, s) in mindspore_to_hf(records, fused_record, ckpt)}, config, ckpt)
    n_layers = config["num_hidden_layers"]
    return [(gguf_name(name, n_layers), name, tuple(shape)) for name, (_, shape) in llama_tensors(records, ckpt)]


def output_paths(out_dir, name, file_types):
    return {t: Path(out_dir) / f"{name}-{t}.gguf" for t in file_types}


def modelfile(gguf_file):
    """An Ollama Modelfile for `gguf_file` beside it: the chat template in Ollama's Go syntax
    (chat_template.OLLAMA_TEMPLATE), and a stop at the user marker, should the model start a turn."""
    return (f"# Ollama: ollama create <model name> -f {Path(gguf_file).parent}/Modelfile (written by lorapipe's "
            f"export_gguf)\nFROM ./{Path(gguf_file).name}\nTEMPLATE \"\"\"{OLLAMA_TEMPLATE}\"\"\"\n"
            f"PARAMETER stop {USER_PIECE}\n")


def export_gguf(ckpt, base_dir, out_dir, name, position_embedding, file_types=("f16", "q8_0"), run=None):
    """A complete (LoRA-folded) MindSpore Baichuan2-7B checkpoint -> `<out_dir>/<name>-<type>.gguf` for each
    of `file_types`, in one pass over the checkpoint, and an Ollama `Modelfile` for the f16 file (if
    written). Returns {type: path} and logs, for q8_0, the tensors that stay f16. `position_embedding` is the
    run's architecture, as the workflow decided it: RoPE only (require_rope)."""
    require_rope(position_embedding, "export_gguf")
    base_dir = Path(base_dir)
    unknown = [t for t in file_types if t not in TYPES]
    if unknown or not file_types:
        raise InputError(f"GGUF file types {list(file_types)}: expected some of {', '.join(TYPES)}")
    config = read_json(base_dir / "config.json")
    tokenizer = base_dir / "tokenizer.model"
    plan = tensor_plan(ckpt, config)
    n_head = config["num_attention_heads"]
    paths = output_paths(out_dir, name, file_types)
    types = {t: [storage_type(g, shape, t) for g, _, shape in plan] for t in file_types}
    sizes = {t: sum(stored_nbytes(shape, q) for (_, _, shape), q in zip(plan, types[t])) for t in file_types}
    if "q8_0" in file_types:
        kept = [g for (g, _, _), q in zip(plan, types["q8_0"]) if q.name == "F16"]
        log.info("q8_0: %d tensors stay f16 (row length not a multiple of 32): %s", len(kept), ", ".join(kept) or "none")
    progress = Progress("export gguf", len(plan), unit="tensors")
    outputs = list(paths.values()) + ([Path(out_dir) / "Modelfile"] if "f16" in paths else [])
    with atomic_outputs(outputs, run=run, inputs=[ckpt, base_dir / "config.json", tokenizer],
                        hashed_inline=[ckpt], need_bytes=sum(sizes.values())) as temps:
        if "f16" in paths:
            temps[-1].write_text(modelfile(paths["f16"]), encoding="utf-8")
        Writer = writer_class()
        writers, done = {}, 0
        try:
            for t, temp in zip(file_types, temps):
                writer = writers[t] = Writer(temp, GGUF_ARCHITECTURE)
                add_metadata(writer, config, tokenizer, t, name)
                for (g, _, shape), q in zip(plan, types[t]):
                    writer.add_tensor_info(g, shape, np.dtype(np.float32), stored_nbytes(shape, q), raw_dtype=q)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
            # Read to the end (not zip with the plan): the reader hashes the file once it has passed it all.
            for i, (got, array) in enumerate(llama_tensors(iter_checkpoint(ckpt, hashed=True), ckpt)):
                g, hf, shape = plan[i] if i < len(plan) else (None, None, None)
                if got != hf or array.shape != shape:  # the data disagrees with its index: the file changed
                    raise InputError(f"{ckpt}: tensor {got!r} {array.shape} where its index said {hf!r} {shape}")
                if g.endswith(("attn_q.weight", "attn_k.weight")):
                    array = permute_qk(array, n_head)
                transform = norm_head if hf == "lm_head.weight" else None
                for t in file_types:
                    writers[t].write_tensor_data(encode(array, types[t][i], transform).view(Stored))
                progress.update(i + 1)
                done = i + 1
            if done != len(plan):
                raise InputError(f"{ckpt}: {done} tensors where its index lists {len(plan)}")
        finally:
            for writer in writers.values():
                writer.close()
    for t, path in paths.items():
        log.info("wrote %s (%s, %.1f MB)", path, t, path.stat().st_size / 1e6)
    return paths
