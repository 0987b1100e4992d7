"""Chat generation with the Baichuan2 model: sampling, streaming, and predict.

The chat template is the training layout (lorapipe.data.rows): `<reserved_106>{question}<reserved_107>`,
earlier turns before it as `<reserved_106>q<reserved_107>a`, and the model answers until eos.
On Ascend, decoding is MindFormers' own generate() with use_past, the recipe's path. On the host its
kernels do not exist (paged attention, ApplyRotaryPosEmb, ArgMaxExt), so decoding is our own loop:
lorapipe.model.decode's KV-cache forward, or, as the reference it is tested against, the MindSpore network
re-run over the whole sequence; tokens are picked in numpy (greedy, or sampling with top-k, top-p,
temperature and repetition penalty). Models load through lorapipe.infer.loader.
"""

import json
import logging
import time

import numpy as np

from lorapipe.infer.loader import build_decoder
from lorapipe.model.chat_template import chat_ids
from lorapipe.model.decode import KVCacheDecoder
from lorapipe.model.tokenizer import ChatTokenizer
from lorapipe.outputs import atomic_outputs

log = logging.getLogger("lorapipe")


# Generation settings and their defaults (the keys of the config's predict section and of the predict
# YAML's model_config; MindFormers' generate() names them the same).
GENERATION_DEFAULTS = {"max_new_tokens": 32, "do_sample": False, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
                       "repetition_penalty": 1.0}


def generation_settings(model_config, overrides):
    """The generation settings: each of `overrides` (e.g. a script's flags) that is not None, else the
    YAML's model_config value, else the default."""
    return {k: model_config.get(k, v) if overrides.get(k) is None else overrides[k]
            for k, v in GENERATION_DEFAULTS.items()}


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


class TextStreamer:
    """on_token callback for generate(): writes the answer's new text as it grows. Text that ends in
    an incomplete UTF-8 sequence (byte-fallback tokens of one character) is held back until complete."""

    def __init__(self, tok, write):
        self.tok, self.write, self.shown = tok, write, ""

    def __call__(self, new_ids, final=False):
        text = self.tok.sp.decode(new_ids)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text

    def end(self, new_ids):
        """Write what was held back: the answer is complete."""
        self(new_ids, final=True)


def generate(model, prompt_ids, eos_id, max_new_tokens=32, seed=0, max_length=None, on_token=None, **sampling):
    """New token ids after `prompt_ids`, stopping at eos (not included), after max_new_tokens, when
    prompt and answer reach max_length tokens, or at the model's seq_length. `on_token(new_ids)` is
    called after every token.

    `model` is a lorapipe.model.decode.KVCacheDecoder (a new token costs one position's forward), a
    MindFormers network built with use_past (its own generate(), the Ascend path), or a plain network
    (every step re-runs the whole sequence: the reference the decoder is tested against)."""
    incremental = isinstance(model, KVCacheDecoder)
    capacity = model.max_positions if incremental else model.config.seq_length
    limit = min(max_new_tokens, capacity - len(prompt_ids))
    if max_length is not None:
        limit = min(limit, max_length - len(prompt_ids))
    if not incremental and model.config.use_past:
        return _mindformers_generate(model, prompt_ids, eos_id, limit, seed, **sampling)
    if incremental:
        model.reset()
        step = model.forward  # the tokens it has not seen yet: the prompt first, then one at a time
    else:
        from lorapipe.model.network import logits

        def step(_):
            return logits(model, np.array([ids], np.int32))[0, -1]

    rng = np.random.default_rng(seed)
    ids, new, unseen = list(prompt_ids), [], list(prompt_ids)
    for _ in range(limit):
        last = step(unseen)
        token = next_token(last, ids, rng, **sampling)
        if token == eos_id:
            break
        ids.append(token)
        new.append(token)
        unseen = [token]
        if on_token:
            on_token(new)
    return new


def _mindformers_generate(net, prompt_ids, eos_id, max_new_tokens, seed, do_sample=False, top_k=0, top_p=1.0,
                          temperature=1.0, repetition_penalty=1.0):
    """MindFormers' own generate() with use_past (paged attention; Ascend kernels): the recipe's path."""
    output = net.generate([list(prompt_ids)], max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k,
                          top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty,
                          eos_token_id=eos_id, seed=seed)
    new = [int(t) for t in np.asarray(output[0])[len(prompt_ids):]]
    return new[:new.index(eos_id)] if eos_id in new else new


def predict(models, tokenizer_file, model_config, prompts, generation, out_path=None, adapter=None,
            device_target="CPU", run=None):
    """Answer every prompt with every model {label: ckpt} -> rows, prompt-major so that the models'
    answers to one prompt sit side by side, written to `out_path` as JSON lines (printed without one).
    Timings go to the log, not the rows: the predictions of a greedy run are byte-reproducible."""
    import sys

    tok = ChatTokenizer(tokenizer_file)
    prompt_ids = [chat_ids(tok, prompt) for prompt in prompts]  # a bad prompt fails before any model loads
    generation = dict(generation)
    use_past = generation.pop("use_past", True)
    rows = []
    for label, ckpt in models.items():
        net = build_decoder(model_config, ckpt, adapter, use_past, device_target)
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
            start = time.time()
            new = generate(net, ids, tok.eos, **generation)
            seconds = time.time() - start
            rows.append({"index": i, "model": label, "prompt": prompt, "response": tok.sp.decode(new),
                         "prompt_tokens": len(ids), "new_tokens": len(new)})
            log.info("%s [%d/%d] %d tokens in %.2f s (%.1f tokens/s): %s -> %s", label, i + 1, len(prompts),
                     len(new), seconds, len(new) / seconds if seconds else 0.0, prompt, rows[-1]["response"])
    rows.sort(key=lambda r: (r["index"], list(models).index(r["model"])))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out_path is None:
        sys.stdout.write(text)
        return rows
    with atomic_outputs([out_path], run=run, inputs=[*models.values(), tokenizer_file]) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return rows
