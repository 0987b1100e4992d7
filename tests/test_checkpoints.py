"""filter_out, merged_ckpt, fold_lora on real MindSpore checkpoints."""

import json

import mindspore as ms
import numpy as np
import pytest

from lorapipe.errors import InputError
from lorapipe.formats.msckpt import iter_checkpoint, write_checkpoint
from lorapipe.weights.checkpoints import (
    complete_with_base,
    filter_checkpoint,
    filter_checkpoint_dir,
    fold_lora,
    is_model_parameter,
    merge_data_parallel,
    rank_checkpoints,
)
from lorapipe.weights.convert import convert_hf_to_mindspore

LORA_RANK, LORA_ALPHA = 4, 16.0


@pytest.fixture(scope="module")
def base_ckpt(tiny_base_dir, tmp_path_factory):
    return convert_hf_to_mindspore(tiny_base_dir, tmp_path_factory.mktemp("base") / "base.ckpt")


def lora_tensors(base, seed=0):
    """Random LoRA adapters (B non-zero, unlike a fresh init) for every wq/wk/wv of `base`."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, array in base.items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")):
            cell = name[: -len(".weight")]
            out[f"{cell}.mindpet_delta_lora_a"] = rng.standard_normal((LORA_RANK, array.shape[1])).astype(np.float32) * 0.1
            out[f"{cell}.mindpet_delta_lora_b"] = rng.standard_normal((array.shape[0], LORA_RANK)).astype(np.float32) * 0.1
    return out


def training_checkpoint(path, base, lora):
    """What a finetune rank saves: parameters, Adam state and bookkeeping, interleaved."""
    entries = [*base.items(), *lora.items()]
    entries += [(f"adam_m.{n}", np.zeros_like(a)) for n, a in lora.items()]
    entries += [(f"adam_v.{n}", np.ones_like(a)) for n, a in lora.items()]
    entries += [("global_step", np.array([10], np.int32)), ("epoch_num", np.array([1], np.int32)),
                ("step_num", np.array([10], np.int32)), ("loss_scale", np.array([1.0], np.float32)),
                ("global_batch_size", np.array([8], np.int32)), ("accu_grads.x.weight", np.zeros(2, np.float32)),
                ("scale_sense", np.array(1.0, np.float32)), ("learning_rate", np.array(1e-3, np.float32))]
    write_checkpoint(path, entries)
    return path


@pytest.mark.parametrize("name, keep", [
    ("model.layers.0.attention.wq.weight", True), ("model.layers.0.attention.wq.mindpet_delta_lora_a", True),
    ("lm_head.weight", True), ("model.adam_gate.weight", True),  # merely contains "adam": kept
    ("adam_m.model.layers.0.attention.wq.mindpet_delta_lora_a", False), ("adam_v.lm_head.weight", False),
    ("accu_grads.model.norm_out.weight", False), ("global_step", False), ("epoch_num", False),
    ("step_num", False), ("loss_scale", False), ("scale_sense", False), ("current_iterator_step", False),
    ("last_overflow_iterator_step", False), ("global_batch_size", False), ("learning_rate", False),
])
def test_filter_rules_are_exact(name, keep):
    assert is_model_parameter(name) is keep


def test_filter_keeps_exactly_the_parameters(base_ckpt, tmp_path):
    base = dict(iter_checkpoint(base_ckpt))
    lora = lora_tensors(base)
    src = training_checkpoint(tmp_path / "train.ckpt", base, lora)
    dropped = filter_checkpoint(src, tmp_path / "filtered.ckpt")
    assert len(dropped) == 2 * len(lora) + 8
    got = ms.load_checkpoint(str(tmp_path / "filtered.ckpt"))
    assert list(got) == [*base, *lora]
    assert all(np.array_equal(got[n].asnumpy(), a) for n, a in {**base, **lora}.items())


def make_ranks(folder, base, lora, ranks=2):
    for r in range(ranks):
        (folder / f"rank_{r}").mkdir(parents=True)
        training_checkpoint(folder / f"rank_{r}" / "x_lora.ckpt", base, lora)
    return folder


def test_filter_dir_merge_and_bad_ranks(base_ckpt, tmp_path):
    base = dict(iter_checkpoint(base_ckpt))
    lora = lora_tensors(base)
    filtered = filter_checkpoint_dir(make_ranks(tmp_path / "net", base, lora), tmp_path / "filter_out")
    ckpts = rank_checkpoints(filtered, 2)
    merge_data_parallel(ckpts, tmp_path / "merged" / "checkpoint_0.ckpt")
    assert (tmp_path / "merged" / "checkpoint_0.ckpt").read_bytes() == ckpts[0].read_bytes()

    with pytest.raises(InputError, match="missing rank_2"):
        rank_checkpoints(filtered, 3)
    other = filter_checkpoint_dir(make_ranks(tmp_path / "disagree", base, lora_tensors(base, seed=1), ranks=1),
                                  tmp_path / "disagree_filtered")
    with pytest.raises(InputError, match=r"differs from rank 0's"):
        merge_data_parallel([ckpts[0], rank_checkpoints(other)[0]], tmp_path / "bad" / "c.ckpt")
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(ckpts[1].read_bytes()[:-100])
    with pytest.raises(InputError, match=r"trunc\.ckpt: truncated"):
        merge_data_parallel([ckpts[0], truncated], tmp_path / "bad" / "c.ckpt")
    with pytest.raises(InputError, match=r"trunc\.ckpt: truncated"):
        filter_checkpoint(truncated, tmp_path / "bad" / "f.ckpt")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_folded_model_equals_base_plus_adapter(tiny_base_dir, base_ckpt, tmp_path):
    from mindformers.pet import LoraConfig, LoraModel

    from lorapipe.model.architecture import mindformers_model_config
    from lorapipe.model.network import build_model, logits

    base = dict(iter_checkpoint(base_ckpt))
    lora = lora_tensors(base)
    write_checkpoint(tmp_path / "merged.ckpt", [*base.items(), *lora.items()])
    folded_names = fold_lora(tmp_path / "merged.ckpt", tmp_path / "folded.ckpt",
                             adapter_json(tmp_path, LORA_RANK, LORA_ALPHA))
    assert len(folded_names) == 6
    folded = dict(iter_checkpoint(tmp_path / "folded.ckpt"))
    assert sorted(folded) == sorted(base)  # no LoRA keys left

    hf_config = json.loads((tiny_base_dir / "config.json").read_text())
    ids = np.random.default_rng(0).integers(1, hf_config["vocab_size"], size=(2, 16)).astype(np.int32)

    def load(net, tensors):
        params = {p.name: p for p in net.get_parameters()}
        missing = [n for n in params if n not in tensors]
        assert not missing, missing
        for name, p in params.items():
            p.set_data(ms.Tensor(tensors[name]))

    # base + adapter, computed by MindFormers' own LoRA layers (dropout off)
    adapted = LoraModel(LoraConfig(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                   target_modules=".*wq|.*wk|.*wv"), build_model(mindformers_model_config(hf_config, 32)))
    adapted.set_train(False)
    load(adapted, {**base, **lora})
    plain = build_model(mindformers_model_config(hf_config, 32))
    load(plain, folded)
    want, got = adapted(ms.Tensor(ids))[0].asnumpy(), logits(plain, ids)
    assert np.abs(got - want).max() < 1e-5
    load(plain, base)  # the adapter matters: without it the logits are clearly different
    assert np.abs(logits(plain, ids) - want).max() > 1e-3


def adapter_json(folder, rank, alpha):
    path = folder / f"adapter_r{rank}.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha}))
    return path


def test_fold_takes_rank_and_alpha_from_the_adapter_config(base_ckpt, tmp_path):
    base = dict(iter_checkpoint(base_ckpt))
    lora = lora_tensors(base)
    write_checkpoint(tmp_path / "m.ckpt", [*base.items(), *lora.items()])
    fold_lora(tmp_path / "m.ckpt", tmp_path / "f.ckpt", adapter_json(tmp_path, LORA_RANK, 2 * LORA_ALPHA))
    folded = dict(iter_checkpoint(tmp_path / "f.ckpt"))
    name = next(n for n in lora if n.endswith("lora_a"))[: -len(".mindpet_delta_lora_a")]
    a, b = lora[f"{name}.mindpet_delta_lora_a"], lora[f"{name}.mindpet_delta_lora_b"]
    want = base[f"{name}.weight"] + (b @ a) * 2 * LORA_ALPHA / LORA_RANK
    assert np.allclose(folded[f"{name}.weight"], want, atol=1e-6)


def test_fold_refuses_what_does_not_fit(base_ckpt, tmp_path):
    base = dict(iter_checkpoint(base_ckpt))
    write_checkpoint(tmp_path / "m.ckpt", [*base.items(), *lora_tensors(base).items()])
    with pytest.raises(InputError, match=r"the adapter config's rank 8 and the weight"):
        fold_lora(tmp_path / "m.ckpt", tmp_path / "f.ckpt", adapter_json(tmp_path, 8, LORA_ALPHA))
    with pytest.raises(InputError, match="no LoRA tensors"):
        fold_lora(base_ckpt, tmp_path / "f.ckpt", adapter_json(tmp_path, LORA_RANK, LORA_ALPHA))
    (tmp_path / "bad.json").write_text('{"r": 0}')
    with pytest.raises(InputError, match="positive integer 'r'"):
        fold_lora(tmp_path / "m.ckpt", tmp_path / "f.ckpt", tmp_path / "bad.json")
    # fp16 weights and an adapter that overflows them: refused (PEFT's safe_merge), never written
    half = {k: v.astype(np.float16) for k, v in base.items()}
    huge = {k: v * 1e4 for k, v in lora_tensors(base).items()}
    write_checkpoint(tmp_path / "h.ckpt", [*half.items(), *huge.items()])
    with pytest.raises(InputError, match="non-finite values in float16"):
        fold_lora(tmp_path / "h.ckpt", tmp_path / "f.ckpt", adapter_json(tmp_path, LORA_RANK, LORA_ALPHA))
    assert not (tmp_path / "f.ckpt").exists()


def test_a_link_needs_no_free_space_and_a_copy_its_size(tmp_path):
    """Collecting a finished training links its checkpoints (14 GB a rank at 7B): the free-space check asks
    for nothing on the same file system, and for the copy's bytes across file systems."""
    import os

    from lorapipe.digests import copy_bytes, link_or_copy

    src = tmp_path / "a.ckpt"
    src.write_bytes(b"x" * 1000)
    assert copy_bytes(src, tmp_path / "not" / "yet") == 0
    link_or_copy(src, tmp_path / "b.ckpt")
    assert (tmp_path / "b.ckpt").stat().st_ino == src.stat().st_ino
    other = "/dev/shm"
    if os.path.isdir(other) and os.stat(other).st_dev != src.stat().st_dev:
        assert copy_bytes(src, other) == 1000
        link_or_copy(src, f"{other}/lorapipe-link-test.ckpt")  # no hard link across file systems: a copy
        try:
            assert os.stat(f"{other}/lorapipe-link-test.ckpt").st_ino != src.stat().st_ino
            assert open(f"{other}/lorapipe-link-test.ckpt", "rb").read() == src.read_bytes()
        finally:
            os.unlink(f"{other}/lorapipe-link-test.ckpt")


def test_the_base_goes_back_in_the_networks_order_and_dtypes(tmp_path):
    """Issue 32: checkpoints of the trainable parameters only, completed with the base (merged_ckpt): every
    network parameter where and as the saving network had it, the trained ones from the checkpoint, the frozen
    ones from the base, cast as MindSpore casts on load; bookkeeping left out."""
    from lorapipe.formats.msckpt import checkpoint_index

    rng = np.random.default_rng(0)
    base = {n: rng.normal(size=(4, 3)).astype(np.float16) for n in ("model.a.weight", "model.b.weight", "lm_head.weight")}
    write_checkpoint(tmp_path / "base.ckpt", list(base.items()))
    lora = rng.normal(size=(2, 3)).astype(np.float32)
    write_checkpoint(tmp_path / "trained.ckpt", [("model.a.lora_a", lora), ("global_step", np.array([7], np.int32))])
    order = [["model.a.lora_a", "Float32"], ["model.b.weight", "Float32"], ["model.a.weight", "Float16"],
             ["lm_head.weight", "Float32"], ["global_step", "Int32"], ["adam_m.model.a.lora_a", "Float32"]]
    (tmp_path / "order.json").write_text(json.dumps(order))
    complete_with_base(tmp_path / "trained.ckpt", tmp_path / "order.json", tmp_path / "base.ckpt", tmp_path / "out.ckpt")
    assert [(n, t) for n, t, _ in checkpoint_index(tmp_path / "out.ckpt")] == [
        ("model.a.lora_a", "Float32"), ("model.b.weight", "Float32"), ("model.a.weight", "Float16"),
        ("lm_head.weight", "Float32")]
    out = dict(iter_checkpoint(tmp_path / "out.ckpt"))
    assert out["model.a.lora_a"].tobytes() == lora.tobytes()
    assert out["model.b.weight"].tobytes() == base["model.b.weight"].astype(np.float32).tobytes()
    assert out["model.a.weight"].tobytes() == base["model.a.weight"].tobytes()
    # a base that lacks a frozen parameter of the network is not the one the run trained on
    (tmp_path / "order.json").write_text(json.dumps(order + [["model.c.weight", "Float32"]]))
    with pytest.raises(InputError, match=r"base.ckpt: lacks 1 frozen parameters the training network has "
                                         r"\(\['model.c.weight'\]"):
        complete_with_base(tmp_path / "trained.ckpt", tmp_path / "order.json", tmp_path / "base.ckpt",
                           tmp_path / "out2.ckpt")
    assert not (tmp_path / "out2.ckpt").exists()


def test_a_changed_base_or_setting_starts_a_fresh_state_and_says_why(tmp_path, caplog):
    """Issue 32: the training state is keyed by the rendered YAML and the identity of the base and the data
    (lorapipe.train.finetune); a changed key starts a fresh state, and the log names what changed."""
    import logging

    import yaml

    from lorapipe.train.finetune import _state_dir

    config, base, data = tmp_path / "run.yaml", tmp_path / "base.ckpt", tmp_path / "data.mindrecord"
    config.write_text(yaml.safe_dump({"lorapipe_checkpoint_params": "trainable", "seed": 0}))
    base.write_bytes(b"base one")
    data.write_bytes(b"rows")
    first = _state_dir(config, tmp_path / "state", [base, data])
    assert _state_dir(config, tmp_path / "state", [base, data]) == first  # same key: the same state, kept
    base.write_bytes(b"base two, a different file")
    caplog.set_level(logging.INFO, logger="lorapipe")
    second = _state_dir(config, tmp_path / "state", [base, data])
    assert second != first and not first.exists()
    assert f"{base} changed" in caplog.text and "data.mindrecord changed" not in caplog.text
    config.write_text(yaml.safe_dump({"lorapipe_checkpoint_params": "all", "seed": 0}))
    third = _state_dir(config, tmp_path / "state", [base, data])
    assert third != second and "lorapipe_checkpoint_params 'trainable' -> 'all'" in caplog.text


def test_a_truncated_or_corrupt_safetensors_checkpoint_is_named(tmp_path):
    """Issue 32: a safetensors checkpoint cut short, or with a damaged header, is one line naming it (as a .ckpt
    is), and a resume moves it aside like a damaged .ckpt (lorapipe.train.resume reads both)."""
    from lorapipe.formats.checkpoint_file import (
        checkpoint_index,
        checkpoint_writer,
        iter_checkpoint,
    )

    path = tmp_path / "x.safetensors"
    tensors = [("a", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.ones(4, np.float16))]
    with checkpoint_writer(path, [(n, a.dtype, a.shape) for n, a in tensors]) as w:
        for name, array in tensors:
            w.add(name, array)
    assert [(n, a.tobytes()) for n, a in iter_checkpoint(path)] == [(n, a.tobytes()) for n, a in tensors]
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(InputError, match=r"x.safetensors: truncated: tensor 'b'"):
        checkpoint_index(path)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(InputError, match=r"x.safetensors: corrupt safetensors header"):
        list(iter_checkpoint(path))
