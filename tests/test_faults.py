"""Faults users meet: a full disk, a second launcher, inputs that are wrong in the ways people get
them wrong. Each ends in one clear error and leaves no partial output. (Kill-anywhere reruns and
corruption are in tests/test_workflow.py, on the end-to-end run.)"""

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from lorapipe.errors import InputError, StepError
from lorapipe.weights.convert import convert_hf_to_mindspore

CONVERT = REPO / "scripts" / "convert_weight.py"


def convert_cli(source, output, preexec_fn=None):
    return subprocess.run([sys.executable, str(CONVERT), "--torch_ckpt_path", str(source), "--mindspore_ckpt_path",
                           str(output)], capture_output=True, text=True, preexec_fn=preexec_fn)


def test_a_write_that_outgrows_the_file_size_limit(tiny_base_dir, tmp_path):
    """`ulimit -f` (RLIMIT_FSIZE): the write fails part way with EFBIG, like a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = convert_cli(tiny_base_dir, tmp_path / "out" / "x.ckpt", preexec_fn=limit)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "x.ckpt: the disk filled up while writing it (File too large)" in proc.stderr
    assert not list((tmp_path / "out").iterdir())  # no output, no manifest, no temporaries


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MB tmpfs (needs mount rights: root, as on the CI machines)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_checkpoint_bigger_than_the_free_space_is_refused_before_writing(tmp_path, small_filesystem):
    from lorapipe.formats.hf_io import SafetensorsWriter
    from lorapipe.model.baichuan2 import hf_shapes

    config = {"hidden_size": 256, "intermediate_size": 688, "vocab_size": 4000, "num_hidden_layers": 1,
              "num_attention_heads": 4, "rms_norm_eps": 1e-6}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    plan = [(name, np.dtype(np.float32), shape) for name, shape in hf_shapes(config).items()]
    writer = SafetensorsWriter(tmp_path / "hf" / "model.safetensors", plan)
    for name, _, shape in plan:
        writer.add(name, np.ones(shape, np.float32))
    writer.close()  # 11 MB of tensors for a 4 MB file system
    proc = convert_cli(tmp_path / "hf", small_filesystem / "x.ckpt")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"x.ckpt: not enough free space: it needs about 10.8 MB, {small_filesystem} has 4." in proc.stderr
    assert not list(small_filesystem.iterdir())


def test_a_second_launcher_for_the_same_training_state_is_refused(tmp_path):
    from lorapipe.train.finetune import state_lock

    state = tmp_path / "state"
    with state_lock(state):
        with pytest.raises(StepError, match=rf"another finetune \(pid {os.getpid()} on .*\) is using the training"):
            with state_lock(state):
                pass
    with state_lock(state):  # free again once the first is done
        pass


def test_a_pickled_model_object_is_not_a_state_dict(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4, "intermediate_size": 8, "vocab_size": 8,
                                                      "num_hidden_layers": 1}))
    torch.save(torch.nn.Linear(4, 4), tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model.bin: cannot read its tensor index: torch.nn.modules.linear."
                                         r"Linear is not part of a state dict \(was a whole model object saved"):
        convert_hf_to_mindspore(tmp_path, tmp_path / "out.ckpt")


def test_a_sharded_index_naming_a_missing_shard(tiny_base_dir, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_base_dir / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(InputError, match=r"index.json: names 1 shards, and pytorch_model-00002-of-00002.bin is not in"):
        convert_hf_to_mindspore(tmp_path, tmp_path / "out.ckpt")


def test_a_safetensors_header_that_lies_about_offsets(tmp_path):
    import struct

    from safetensors.numpy import save_file

    save_file({"a": np.zeros((4, 4), np.float32), "b": np.ones((4,), np.float32)}, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    for lie, message in ((lambda h: h["b"].update(data_offsets=[0, 16]), r"data_offsets of 'b' and 'a' overlap"),
                         (lambda h: h["a"].update(data_offsets=[0, 60]), r"'a': the header's data_offsets \[0, 60\] "
                                                                         r"do not hold its shape \[4, 4\]")):
        lied = json.loads(json.dumps(header))
        lie(lied)
        text = json.dumps(lied, separators=(",", ":")).encode().ljust(header_len)
        (tmp_path / "lie.safetensors").write_bytes(raw[:8] + text + raw[8 + header_len:])
        from lorapipe.formats.hf_io import tensor_refs

        with pytest.raises(InputError, match=message):
            tensor_refs(tmp_path / "lie.safetensors")


def test_a_config_json_that_does_not_match_the_weights(tiny_base_dir, tmp_path):
    for name in ("pytorch_model.bin", "tokenizer.model"):
        (tmp_path / name).write_bytes((tiny_base_dir / name).read_bytes())
    config = json.loads((tiny_base_dir / "config.json").read_text())
    config["intermediate_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(88, 32\), "
                                         r"config.json implies \(89, 32\)"):
        convert_hf_to_mindspore(tmp_path, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()
