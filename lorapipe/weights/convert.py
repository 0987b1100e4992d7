"""The two conversions of Baichuan2 weights, streamed a tensor at a time: HF <-> MindSpore.

The two conversions of Baichuan2 weights, streamed one tensor at a time: HF -> MindSpore (the
recipe's convert_weight.py) and MindSpore -> HF (export). Names and shapes come from
lorapipe.model.baichuan2, file formats from lorapipe.formats.hf_io and lorapipe.formats.msckpt.
"""

import json
from pathlib import Path

import numpy as np

from lorapipe.formats.hf_io import (
    SafetensorsWriter,
    TorchZipWriter,
    find_config,
    read_in_file_order,
    tensor_refs,
    weight_files,
)
from lorapipe.formats.msckpt import CheckpointWriter, bfloat16, checkpoint_index, iter_checkpoint, numpy_dtype
from lorapipe.model.baichuan2 import check_tensors, fused_record, hf_to_mindspore, mindspore_to_hf
from lorapipe.outputs import atomic_outputs
from lorapipe.progress import Progress

DTYPES = {"keep": None, "fp32": np.float32, "fp16": np.float16, "bf16": "bfloat16"}


def convert_hf_to_mindspore(source, output, dtype="keep", run=None):
    """Convert an HF Baichuan2 checkpoint to one MindSpore .ckpt, one tensor in memory at a time.

    `source` is a pytorch_model.bin, a model.safetensors, an *.index.json or an HF directory (whose
    config.json gives the expected shapes). Written atomically to `output`.
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
            CheckpointWriter(tmp) as writer:
        for ref, array in read_in_file_order(refs, buffer):
            if target is not None and array.dtype != target:
                array = array.astype(target)
            for name, part in hf_to_mindspore(ref.name, array):
                writer.add(name, part)
            done += ref.nbytes
            progress.update(done)
    return output



HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model")


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
    side = [f for f in HF_SIDE_FILES if (Path(base_dir) / f).is_file()]
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
