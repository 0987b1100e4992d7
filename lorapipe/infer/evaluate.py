"""Held-out evaluation: each model's loss and perplexity on the held-out MindRecord.

Masked as in training: only assistant tokens and end-of-turn markers count."""

import json
import logging
import math

import numpy as np

from lorapipe.data.rows import IGNORE_TOKEN_ID, PAD_ID
from lorapipe.errors import InputError
from lorapipe.infer.loader import load_model
from lorapipe.outputs import atomic_outputs

log = logging.getLogger("lorapipe")


def heldout_loss(net, mindrecord, batch_size=8):
    """Mean token loss on a MindRecord with the training masking: position t predicts labels[t+1] from
    input_ids[:t+1], counted where labels[t+1] != -100 and input_ids[t] is not padding."""
    import mindspore.dataset as ds

    from lorapipe.model.network import logits  # imports MindSpore

    rows = list(ds.MindDataset(str(mindrecord), shuffle=False).create_dict_iterator(output_numpy=True))
    if not rows:
        raise InputError(f"{mindrecord}: no rows to evaluate")
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        inputs = np.stack([r["input_ids"] for r in batch])[:, :-1]
        labels = np.stack([r["labels"] for r in batch])[:, 1:]
        mask = (labels != IGNORE_TOKEN_ID) & (inputs != PAD_ID)
        out = logits(net, inputs).astype(np.float64)
        out -= out.max(-1, keepdims=True)
        log_probs = out - np.log(np.exp(out).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, np.where(mask, labels, 0)[..., None], -1)[..., 0]
        total -= float((picked * mask).sum())
        count += int(mask.sum())
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count, "samples": len(rows)}


def evaluate(models, model_config, mindrecord, out_path, adapter=None, run=None):
    """Held-out loss and perplexity of each model {label: ckpt} -> metrics JSON."""
    metrics = {}
    for label, ckpt in models.items():
        metrics[label] = heldout_loss(load_model(model_config, ckpt, adapter), mindrecord)
        log.info("%s: held-out loss %.4f, perplexity %.2f over %d tokens", label, metrics[label]["loss"],
                 metrics[label]["perplexity"], metrics[label]["tokens"])
    with atomic_outputs([out_path], run=run, inputs=[*models.values(), mindrecord]) as (tmp,):
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

