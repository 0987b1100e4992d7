"""The two conversions of Baichuan2 weights, streamed a tensor at a time: HF <-> MindSpore.

HF -> MindSpore (the recipe's convert_weight.py) and MindSpore -> HF (export). Names and shapes come
from lorapipe.model.baichuan2, file formats from lorapipe.formats.hf_io and lorapipe.formats.msckpt."""

import json
import re
from pathlib import Path

import numpy as np

from lorapipe.errors import InputError
from lorapipe.formats.checkpoint_file import (
    checkpoint_index,
    checkpoint_writer,
    iter_checkpoint,
)
from lorapipe.formats.hf_io import (
    SafetensorsWriter,
    TorchZipWriter,
    find_config,
    read_in_file_order,
    read_json,
    tensor_refs,
    weight_files,
)
from lorapipe.formats.msckpt import bfloat16, numpy_dtype
from lorapipe.model.baichuan2 import (
    check_tensors,
    fused_record,
    hf_to_mindspore,
    mindspore_to_hf,
)
from lorapipe.outputs import atomic_outputs
from lorapipe.progress import Progress

DTYPES = {"keep": None, "fp32": np.float32, "fp16": np.float16, "bf16": "bfloat16"}


def convert_hf_to_mindspore(source, output, dtype="keep", run=None):
    """Convert an HF Baichuan2 checkpoint to one MindSpore checkpoint, one tensor in memory at a time.

    `source` is a pytorch_model.bin, a model.safetensors, an *.index.json or an HF directory (whose
    config.json gives the expected shapes). Written atomically to `output`: a .ckpt, or a .safetensors with the
    same names, dtypes and values (checkpoint.format).
    """
    refs = tensor_refs(source)
    check_tensors({r.name: (r.shape, r.path) for r in refs}, find_config(source), source)
    target = DTYPES[dtype]
    target = bfloat16() if target == "bfloat16" else target
    progress = Progress("convert", sum(r.nbytes for r in refs), unit="MB", scale=1e6)
    buffer, done = bytearray(max(r.nbytes for r in refs)), 0
    files = weight_files(source)
    # One sequential pass over each file converts it and hashes it for the manifest: the output's tensor
    # order follows the files, which MindSpore's loader does not mind.
    need = sum(int(np.prod(ref.shape)) * (np.dtype(target) if target is not None else ref.dtype).itemsize
               for ref in refs)
    with atomic_outputs([output], run=run, inputs=files, hashed_inline=files, need_bytes=need) as (tmp,), \
            checkpoint_writer(tmp, _plan(refs, files, target)) as writer:
        for ref, array in read_in_file_order(refs, buffer):
            if target is not None and array.dtype != target:
                array = array.astype(target)
            for name, part in hf_to_mindspore(ref.name, array):
                writer.add(name, part)
            done += ref.nbytes
            progress.update(done)
    return output


def _plan(refs, files, target):
    """[(MindSpore name, dtype, shape)] of what the conversion writes, in its order (read_in_file_order's:
    file by file, by offset), from the headers alone: each tensor stands in as a zero-stride view."""
    plan = []
    for path in files:
        for ref in sorted((r for r in refs if r.path == path), key=lambda r: r.offset):
            dtype = np.dtype(target) if target is not None else ref.dtype
            plan += [(name, dtype, part.shape)
                     for name, part in hf_to_mindspore(ref.name, np.broadcast_to(np.zeros((), dtype), ref.shape))]
    return plan


HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model")
# A module's relative imports (Baichuan2's modeling_baichuan.py: `from .configuration_baichuan import ...`,
# `from .generation_utils import ...`, and `from .quantizer import ...` inside functions).
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.M)


def hf_side_files(base_dir):
    """The files beside the weights that an HF directory of `base_dir`'s model needs: its config and
    tokenizer files (HF_SIDE_FILES that exist), and the remote code its config.json's and
    tokenizer_config.json's "auto_map" name (Baichuan2 loads with trust_remote_code=True) with every module
    those import relatively, as transformers copies them (dynamic_module_utils.get_relative_imports)."""
    base = Path(base_dir)
    files = [f for f in HF_SIDE_FILES if (base / f).is_file()]
    pending = []
    for name in ("config.json", "tokenizer_config.json"):
        if (base / name).is_file():
            for value in (read_json(base / name).get("auto_map") or {}).values():
                pending += [ref.split("--")[-1].rsplit(".", 1)[0] for ref in (value if isinstance(value, list)
                                                                                else [value]) if ref]
    seen = []
    while pending:
        module = pending.pop(0)
        if module in seen:
            continue
        path = base / f"{module}.py"
        if not path.is_file():
            raise InputError(f"{base}: the model's auto_map (or its code) imports {module}, and {path.name} is not "
                             f"there: copy the model directory whole")
        seen.append(module)
        pending += _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8"))
    return files + [f"{module}.py" for module in seen]


def export_hf(ckpt, base_dir, out_dir, run=None):
    """A complete MindSpore Baichuan2 checkpoint -> an HF model directory: model.safetensors and
    pytorch_model.bin (W_pack re-fused, HF names), plus config and tokenizer files from `base_dir`.
    Streams: one tensor (or one layer's q, k, v) in memory at a time."""
    records = [(name, (numpy_dtype(t), shape)) for name, t, shape in checkpoint_index(ckpt)]
    plan = [(name, dtype, shape) for name, (dtype, shape) in mindspore_to_hf(
        records, fused_record, ckpt)]
    check_tensors({n: (s, ckpt) for n, _, s in plan}, json.loads((Path(base_dir) / "config.json").read_text()),
                  ckpt)
    out_dir = Path(out_dir)
    side = hf_side_files(base_dir)
    outputs = [out_dir / "model.safetensors", out_dir / "pytorch_model.bin", *(out_dir / f for f in side)]
    progress = Progress("export", len(plan), unit="tensors")
    with atomic_outputs(outputs, run=run, inputs=[ckpt, *(Path(base_dir) / f for f in side)], hashed_inline=[ckpt],
                        need_bytes=2 * Path(ckpt).stat().st_size) as temps:
        safetensors, torch_zip = SafetensorsWriter(temps[0], plan), TorchZipWriter(temps[1], plan)
        try:
            for i, (name, array) in enumerate(mindspore_to_hf(iter_checkpoint(ckpt, hashed=True), np.concatenate,
                                                              ckpt)):
                safetensors.add(name, array)
                torch_zip.add(name, array)
                progress.update(i + 1)
        finally:
            safetensors.close()
            torch_zip.close()
        for f, temp in zip(side, temps[2:]):
            temp.write_bytes((Path(base_dir) / f).read_bytes())
    return out_dir
