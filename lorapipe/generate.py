"""Chat generation and held-out evaluation with the Baichuan2 model.

The chat template is the training layout (lorapipe.data): `<reserved_106>{question}<reserved_107>`,
earlier turns before it as `<reserved_106>q<reserved_107>a`, and the model answers until eos.
On CPU, MindFormers' generate() uses Ascend-only kernels (ArgMaxExt, TopkExt), so decoding is our own
loop over the model's logits (greedy, or sampling with top-k, top-p, temperature and repetition
penalty, in numpy). It re-runs the prompt at every step (no KV cache): fine for the tiny model and
short answers; on Ascend, MindFormers' generate() with use_past is the fast path.
"""

import json
import logging
import math
import time

import numpy as np

from lorapipe.data import IGNORE_TOKEN_ID, PAD_ID, ChatTokenizer

log = logging.getLogger("lorapipe")


def chat_ids(tok, question, history=()):
    """Prompt ids for `question` after earlier (question, answer) turns."""
    ids = []
    for q, a in history:
        ids += [tok.user, *tok.encode([q])[0], tok.assistant, *tok.encode([a])[0]]
    return ids + [tok.user, *tok.encode([question])[0], tok.assistant]


def next_token(logits, generated, rng, do_sample=False, top_k=0, top_p=1.0, temperature=1.0,
               repetition_penalty=1.0):
    """Pick the next token id from one position's logits [vocab] (float64 math)."""
    logits = logits.astype(np.float64)
    if repetition_penalty != 1.0 and generated:
        seen = np.unique(generated)
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / repetition_penalty,
                                logits[seen] * repetition_penalty)
    if not do_sample:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k:
        kth = np.sort(logits)[-min(top_k, logits.size)]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # always keeps the most likely token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def generate(net, prompt_ids, eos_id, max_new_tokens=32, seed=0, **sampling):
    """New token ids after `prompt_ids`, stopping at eos (not included) or max_new_tokens."""
    from lorapipe.model import logits

    rng = np.random.default_rng(seed)
    ids, new = list(prompt_ids), []
    for _ in range(max_new_tokens):
        token = next_token(logits(net, np.array([ids], np.int32))[0, -1], ids, rng, **sampling)
        if token == eos_id:
            break
        ids.append(token)
        new.append(token)
    return new


def read_model_config(mindformers_yaml):
    """The model_config section of a rendered MindFormers YAML."""
    import yaml

    with open(mindformers_yaml, encoding="utf-8") as f:
        return yaml.safe_load(f)["model"]["model_config"]


def load_model(model_config, ckpt):
    """The plain Baichuan2 model (eval mode, no LoRA) with a complete checkpoint's weights.
    `model_config` is the model_config of a rendered MindFormers YAML."""
    import mindspore as ms

    from lorapipe.model import build_model
    from lorapipe.msckpt import iter_checkpoint

    net = build_model({k: v for k, v in model_config.items() if k not in ("pet_config", "checkpoint_name_or_path")})
    params = {n: ms.Parameter(ms.Tensor(a), name=n) for n, a in iter_checkpoint(ckpt)}
    not_loaded, _ = ms.load_param_into_net(net, params)
    if not_loaded:
        raise ValueError(f"{ckpt}: has no {not_loaded[0]} (and {len(not_loaded) - 1} more); expected a "
                         f"complete Baichuan2 checkpoint")
    return net


def predict(models, tokenizer_file, model_config, prompts, generation, out_path, run=None):
    """Answer every prompt with every model {label: ckpt}; write predictions.jsonl, prompt-major, so
    the models' answers to one prompt sit side by side."""
    from lorapipe.outputs import atomic_outputs

    tok = ChatTokenizer(tokenizer_file)
    rows = []
    for label, ckpt in models.items():
        net = load_model(model_config, ckpt)
        for i, prompt in enumerate(prompts):
            ids = chat_ids(tok, prompt)
            start = time.time()
            new = generate(net, ids, tok.eos, **generation)
            rows.append({"index": i, "model": label, "prompt": prompt, "response": tok.sp.decode(new),
                         "prompt_tokens": len(ids), "new_tokens": len(new),
                         "seconds": round(time.time() - start, 3)})
            log.info("%s [%d/%d] %s -> %s", label, i + 1, len(prompts), prompt, rows[-1]["response"])
    rows.sort(key=lambda r: (r["index"], list(models).index(r["model"])))
    with atomic_outputs([out_path], run=run, inputs=[*models.values(), tokenizer_file]) as (tmp,):
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def heldout_loss(net, mindrecord, batch_size=8):
    """Mean token loss on a MindRecord with the training masking: position t predicts labels[t+1] from
    input_ids[:t+1], counted where labels[t+1] != -100 and input_ids[t] is not padding."""
    import mindspore.dataset as ds

    from lorapipe.model import logits

    rows = list(ds.MindDataset(str(mindrecord), shuffle=False).create_dict_iterator(output_numpy=True))
    if not rows:
        raise ValueError(f"{mindrecord}: no rows to evaluate")
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


def evaluate(models, model_config, mindrecord, out_path, run=None):
    """Held-out loss and perplexity of each model {label: ckpt} -> metrics JSON."""
    from lorapipe.outputs import atomic_outputs

    metrics = {}
    for label, ckpt in models.items():
        metrics[label] = heldout_loss(load_model(model_config, ckpt), mindrecord)
        log.info("%s: held-out loss %.4f, perplexity %.2f over %d tokens", label, metrics[label]["loss"],
                 metrics[label]["perplexity"], metrics[label]["tokens"])
    with atomic_outputs([out_path], run=run, inputs=[*models.values(), mindrecord]) as (tmp,):
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

