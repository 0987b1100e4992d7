"""One forward and backward step before any rank starts: the run's widths, one layer, one real batch.

A shape or dtype that only a run shows (a head dimension RoPE cannot rotate, a column the network does not
take, a mask of the wrong size) stops every rank after they started, with a rank log tail. Preflight runs
the training step itself on the host first: the rendered YAML's network with one layer (every layer is the
same cell) and a vocabulary of TRIAL_VOCAB (the embedding's size changes no shape that matters here; token
ids are taken modulo it), LoRA attached, on the first micro-batch of the MindRecord at the run's
seq_length, and the loss's gradient with respect to the LoRA parameters.

On the host it runs as MindSpore's CPU backend can: fp32, data parallel, PyNative, without flash attention
or fused RMSNorm. For an Ascend YAML (fp16, semi-auto parallel) that proves the shapes of the cells and of
the data, not the fp16 kernels, the shard strategies (train.network_checks checks them) or device memory:
those stay inferred. benchmarks/README.md gives its cost at Baichuan2-7B and 13B widths.
"""

import copy
import logging
import os
import tempfile
import time

import numpy as np
import yaml

from lorapipe.train.checks import Check
from lorapipe.train.network_checks import build_network

log = logging.getLogger("lorapipe")

TRIAL_VOCAB = 1024
# The config keys a failed step points at.
KEYS = ("the keys it runs with: data.seq_length, data.packing, train.batch_size, lora.*, and the base model's "
        "config.json widths (tiny_base.* for the tiny default)")


def trial_config(rendered):
    """The rendered YAML, cut to the trial: one layer, TRIAL_VOCAB, fp32 on CPU, data parallel on one device."""
    trial = copy.deepcopy(rendered)
    model_config = trial["model"]["model_config"]
    model_config.update(num_layers=1, vocab_size=min(model_config["vocab_size"], TRIAL_VOCAB),
                        compute_dtype="float32", param_init_type="float32", use_flash_attention=False,
                        fused_rms_norm=False, checkpoint_name_or_path="")
    trial["context"].update(device_target="CPU", mode=1)
    trial["parallel"].update(parallel_mode=0, full_batch=False, enable_parallel_optimizer=False)
    trial["parallel_config"].update(data_parallel=1, model_parallel=1, pipeline_stage=1, micro_batch_num=1)
    trial["recompute_config"].update(recompute=False, mp_comm_recompute=False, recompute_slice_activation=False)
    return trial


def first_batch(rendered, train_data, vocab_size):
    """The first micro-batch of the MindRecord, in the columns the YAML reads, ids taken modulo vocab_size."""
    import mindspore.dataset as ds

    columns = rendered["train_dataset"]["input_columns"]
    data = ds.MindDataset(str(train_data), columns_list=columns, shuffle=False)
    batch = next(data.batch(rendered["runner_config"]["batch_size"]).create_tuple_iterator(output_numpy=True))
    batch = dict(zip(columns, batch))
    batch["input_ids"] = batch["input_ids"] % vocab_size
    batch["labels"] = np.where(batch["labels"] >= 0, batch["labels"] % vocab_size, batch["labels"])
    return batch


def check_trial_step(rendered, train_data):
    """Check "trial step": ok with the loss, the time and the LoRA gradients' norm, or fail with the error in
    one line, naming the widths it ran at."""
    import mindspore as ms

    trial = trial_config(rendered)
    model_config = trial["model"]["model_config"]
    widths = (f"hidden_size {model_config['hidden_size']}, num_heads {model_config['num_heads']}, "
              f"intermediate_size {model_config['intermediate_size']}, seq_length {model_config['seq_length']}, "
              f"batch {trial['runner_config']['batch_size']}")
    start = time.time()
    previous = ms.get_context("mode")
    ms.reset_auto_parallel_context()  # (the network checks built under the run's semi-auto context)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    # The ranks build their cells without ENFORCE_EAGER (lorapipe's host forward passes set it, and with it
    # MindFormers slices its causal mask to any input's length: model.network.build_model).
    eager = os.environ.pop("ENFORCE_EAGER", None)
    try:
        batch = first_batch(trial, train_data, model_config["vocab_size"])
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trial.yaml")
            with open(path, "w", encoding="utf-8") as f:
                yaml.safe_dump(trial, f)
            net, _ = build_network(path, allocate=True)
        net.set_train(True)
        inputs = {name: ms.Tensor(column, ms.int32) for name, column in batch.items()}

        def loss(input_ids, labels):
            return net(input_ids, labels, **{k: v for k, v in inputs.items() if k not in ("input_ids", "labels")})

        value, grads = ms.value_and_grad(loss, None, net.trainable_params())(inputs["input_ids"], inputs["labels"])
        value = float(value.asnumpy().reshape(-1)[0])
        norm = float(np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads)))
    except Exception as e:  # noqa: BLE001 - whatever the step raises is this check's result
        reason = [line for line in str(e).strip().splitlines() if line.strip()]
        return Check("trial step", "fail", f"one training step at the run's widths ({widths}; one layer) fails: "
                                           f"{type(e).__name__}: {reason[0] if reason else ''} ({KEYS})")
    finally:
        ms.set_context(mode=previous)
        if eager is not None:
            os.environ["ENFORCE_EAGER"] = eager
    if not (np.isfinite(value) and np.isfinite(norm)):
        return Check("trial step", "fail", f"one training step at the run's widths ({widths}; one layer) gives "
                                           f"loss {value} and LoRA gradient norm {norm}")
    # (the numbers go to the log: preflight.json is deterministic, and CPU threads may move a last digit)
    log.info("trial step: loss %.4f, LoRA gradient norm %.4g, %.1f s", value, norm, time.time() - start)
    return Check("trial step", "ok", f"one forward and backward step at the run's widths ({widths}; one layer, "
                                     f"fp32 on the host): a finite loss and LoRA gradients")
