"""merged_ckpt with strategy files: 2-way model-parallel shards merged by transform_checkpoints.

Semi-auto parallel cannot compile on CPU, so the test writes what such a run leaves behind itself:
per-rank strategy files (MindSpore's ParallelStrategyMap protobuf) and per-rank shards of the tiny
model's real tensors, wq/wk/wv/w1/w3 split by rows (column parallel), wo/w2 by columns (row parallel).
"""

import subprocess
import sys

import mindspore as ms
import numpy as np
from conftest import REPO
from mindspore.train import node_strategy_pb2

from lorapipe.formats.msckpt import iter_checkpoint
from lorapipe.weights.convert import convert_hf_to_mindspore

ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def split_dim(name, array):
    if array.ndim < 2:
        return None  # replicated
    return 1 if name.endswith(ROW_PARALLEL) else 0


def write_model_parallel_run(tensors, root, mp=2):
    """strategy/ckpt_strategy_rank_<r>.ckpt and ckpt/rank_<r>/checkpoint_<r>.ckpt for mp ranks."""
    strategy = node_strategy_pb2.ParallelStrategyMap()
    strategy.current_stage = 0
    for name, array in tensors.items():
        dim = split_dim(name, array)
        item = strategy.parallel_layout_item.add()
        item.param_name = name
        layout = item.parallel_layouts
        layout.dev_matrix.add().dim.extend([1, mp])  # [dp, mp]; tensor_map counts from the right
        layout.tensor_map.add().dim.extend([0 if i == dim else -1 for i in range(array.ndim)])
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field = layout.opt_weight_shard_step = layout.opt_weight_shard_size = 0
        op = strategy.parallel_strategy_item.add()
        op.node_name = f"Default/network/{name}/MatMul-op0"
        op.parallel_strategys.stage = 0
        op.parallel_strategys.parallel_strategy.add().dim.extend([mp if i == dim else 1 for i in range(array.ndim)])
    (root / "strategy").mkdir(parents=True)
    for rank in range(mp):
        (root / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(strategy.SerializeToString())
        shard = [{"name": n, "data": ms.Tensor(a if split_dim(n, a) is None else
                                               np.split(a, mp, axis=split_dim(n, a))[rank].copy())}
                 for n, a in tensors.items()]
        (root / "ckpt" / f"rank_{rank}").mkdir(parents=True)
        ms.save_checkpoint(shard, str(root / "ckpt" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))


def test_model_parallel_shards_merge_to_the_original(tiny_base_dir, tmp_path):
    tensors = dict(iter_checkpoint(convert_hf_to_mindspore(tiny_base_dir, tmp_path / "full.ckpt")))
    write_model_parallel_run(tensors, tmp_path / "run")
    shard = dict(iter_checkpoint(tmp_path / "run/ckpt/rank_1/checkpoint_1.ckpt"))
    assert shard["model.layers.0.attention.wq.weight"].shape == (16, 32)  # really sharded
    assert shard["model.layers.0.attention.wo.weight"].shape == (32, 16)

    proc = subprocess.run([sys.executable, str(REPO / "scripts/transform_ckpt.py"),
                           "--src_ckpt_strategy", str(tmp_path / "run/strategy"),
                           "--src_ckpt_dir", str(tmp_path / "run/ckpt"), "--dst_ckpt_dir", str(tmp_path / "merged"),
                           "--prefix", "checkpoint_", "--ranks", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = dict(iter_checkpoint(tmp_path / "merged/rank_0/checkpoint_0.ckpt"))
    assert sorted(merged) == sorted(tensors)
    for name, array in tensors.items():
        assert merged[name].dtype == array.dtype and np.array_equal(merged[name], array), name

    missing = subprocess.run([sys.executable, str(REPO / "scripts/transform_ckpt.py"),
                              "--src_ckpt_strategy", str(tmp_path / "run/strategy"),
                              "--src_ckpt_dir", str(tmp_path / "run/ckpt"), "--dst_ckpt_dir", str(tmp_path / "m2"),
                              "--ranks", "4"], capture_output=True, text=True)
    assert missing.returncode == 1 and "missing rank_2, rank_3" in missing.stderr
    assert not (tmp_path / "m2").exists()
