"""Benchmark accuracy, base against finetuned, scored as lm-evaluation-harness 0.4.x's `hf` backend scores it.

Each choice is the continuation " A" ... " D" of the prompt (lorapipe.infer.tasks), encoded as lm-eval's
_encode_pair does: the whole text and the context are encoded apart (no BOS: the exports' tokenizers say
add_bos_token false), and the continuation is what the whole has past the context's tokens. The model reads
(context + continuation)[-(max_length + 1):][:-1], left-truncated to its positions as lm-eval does, and a
choice's log-likelihood is the sum of its tokens' log-probabilities; the pick is the first highest.

Faster than lm-eval, with the same numbers: choices whose model input is the same are one forward (lm-eval's
logits cache does that too); the description and few-shot examples that open every prompt of a subject are
run once and their keys and values reused (HostScorer; where truncation cut into them, the whole prompt is
run); and rows of similar length are batched. On Ascend (NetworkScorer) the MindSpore network runs each
whole prompt on one NPU in the training dtypes (inferred, not run here: no NPU).
"""

import json
import logging
from dataclasses import dataclass

import numpy as np

from lorapipe.infer.loader import load_model, load_weights, on_device
from lorapipe.infer.tasks import BENCHMARKS, LETTERS, question_text
from lorapipe.progress import Progress

log = logging.getLogger("lorapipe")

# Attention scores held at once (batch x heads x new x all positions, float32): 16 MB. Batches whose scores
# stay near the CPU's caches score ~2x faster than ones holding hundreds of MB (benchmarks/eval_tasks.py).
SCORE_BUDGET = 1 << 22


def encode_pair(tokenizer, context, continuation):
    """lm-eval's _encode_pair: trailing spaces move from the context to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tokenizer.encode([context + continuation, context])
    return ctx, whole[len(ctx):]


@dataclass
class Prompt:
    """One question's model inputs: `inputs[j]` is the token row choice j is read from, and `continuations[j]`
    its tokens; `truncated`: the prompt was cut at the left to fit the model's positions."""
    inputs: list
    continuations: list
    truncated: bool


def prompt_tokens(tokenizer, prefix, benchmark, question, max_length):
    context = prefix + question_text(benchmark, question)
    inputs, continuations, truncated = [], [], False
    for letter in LETTERS:
        ctx, cont = encode_pair(tokenizer, context, " " + letter)
        whole = ctx + cont
        truncated |= len(whole) > max_length + 1
        inputs.append(tuple(whole[-(max_length + 1):][:-1]))
        continuations.append(tuple(cont))
    return Prompt(inputs, continuations, truncated)


def _shared_length(row, prefix):
    n = min(len(row), len(prefix))
    mismatch = np.flatnonzero(np.asarray(row[:n]) != np.asarray(prefix[:n]))
    return int(mismatch[0]) if mismatch.size else n


class HostScorer:
    """The host's fp32 forward (lorapipe.model.decode), with each subject's prefix run once."""

    def __init__(self, weights, model_config, max_length):
        from lorapipe.model.decode import KVCacheDecoder

        self.decoder = KVCacheDecoder(weights, {**model_config, "seq_length": max_length})
        self.heads, self.prefix = self.decoder.heads, ()

    def set_prefix(self, ids):
        # A prefix as long as the positions leaves every prompt cut at the left: nothing to reuse.
        self.prefix = tuple(ids) if len(ids) < self.decoder.max_positions else ()
        if self.prefix:
            self.decoder.hidden_rows([list(ids)], keep=True)

    def hidden(self, rows, start):
        return self.decoder.hidden_rows(rows, start)

    def log_probs(self, hidden):
        return _log_softmax(self.decoder.logits_of(hidden))


class NetworkScorer:
    """The MindSpore network (lorapipe.model.network) on the configured device: whole prompts, no prefix."""

    def __init__(self, net, heads):
        self.net, self.heads, self.prefix = net, heads, ()

    def set_prefix(self, ids):
        pass  # MindFormers' network reruns every position; only the host's decoder keeps a cache to reuse

    def hidden(self, rows, start):
        from lorapipe.model.network import logits

        ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
        return logits(self.net, ids)  # [batch, length, vocab]: the "hidden" state is already the logits

    def log_probs(self, logits):
        return _log_softmax(logits)


def scorers(model, max_length):
    """{label: a function that loads it as a scorer} for each checkpoint of a trained model
    (lorapipe.infer.loader.trained_model), on its device: on the host in fp32, each subject's prefix reused;
    on one NPU, MindFormers' network in the dtypes the model trained in. score_task loads one at a time."""
    target, config = on_device(model, seq_length=max_length)
    if target == "CPU":
        return {label: (lambda ckpt=ckpt: HostScorer(load_weights(config, ckpt, model.adapter), config, max_length))
                for label, ckpt in model.checkpoints.items()}
    return {label: (lambda ckpt=ckpt: NetworkScorer(load_model(config, ckpt, model.adapter), config["num_heads"]))
            for label, ckpt in model.checkpoints.items()}


def _log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batches(rows, heads, budget=None):
    """Row indices in batches of similar length (longest first), each within the attention budget."""
    budget = budget or SCORE_BUDGET
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]))
    batch = []
    for i in order:
        start, new = rows[i][0], len(rows[i][1])
        longest = len(rows[batch[0]][1]) if batch else new
        if batch and (len(batch) + 1) * heads * longest * (start + longest) > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def score_prompts(scorer, prompts, progress=None, done=0):
    """[[log-likelihood of choice A..D]] of each prompt, for prompts that share the scorer's prefix."""
    unique = {}  # (start, new tokens) -> [(prompt, choice)] of the choices read from that input
    for p, prompt in enumerate(prompts):
        for j, (row, cont) in enumerate(zip(prompt.inputs, prompt.continuations)):
            start = min(_shared_length(row, scorer.prefix), len(row) - len(cont))
            unique.setdefault((start, row[start:]), []).append((p, j))
    keys = list(unique)
    logliks = [[0.0] * len(LETTERS) for _ in prompts]
    by_start = {}
    for k, (start, _) in enumerate(keys):
        by_start.setdefault(start, []).append(k)
    scored = 0
    for start, members in sorted(by_start.items()):
        rows = [keys[k] for k in members]
        for batch in _batches(rows, scorer.heads):
            scored += len(batch)
            hidden = scorer.hidden([list(rows[i][1]) for i in batch], start)
            for b, i in enumerate(batch):
                new = rows[i][1]
                for p, j in unique[rows[i]]:
                    cont = prompts[p].continuations[j]
                    at = len(new) - len(cont) + np.arange(len(cont))
                    lp = scorer.log_probs(hidden[b, at])
                    logliks[p][j] = float(lp[np.arange(len(cont)), cont].sum())
            if progress:
                progress.update(done + len(prompts) * scored // len(keys))
    return logliks


def pick(logliks):
    return int(np.argmax(logliks))


def accuracy(samples, label):
    correct = sum(s[label]["pick"] == s["gold"] for s in samples)
    return correct / len(samples) if samples else None


def summarize(task, samples, meta):
    """{benchmark, overall, groups, subjects} accuracies for base and finetuned, question-weighted (lm-eval's
    weight_by_size), with the finetuned-minus-base difference."""
    benchmark = BENCHMARKS[task.name]
    labels = [m for m in ("base", "finetuned") if samples and m in samples[0]]

    def entry(part):
        out = {"questions": len(part)} | {m: accuracy(part, m) for m in labels}
        if len(labels) == 2 and part:
            out["delta"] = out["finetuned"] - out["base"]
        return out

    groups, subjects = {}, {}
    for s in samples:
        groups.setdefault(benchmark.subject_group(s["subject"]), []).append(s)
        subjects.setdefault(s["subject"], []).append(s)
    return {"benchmark": task.name, "title": benchmark.title, "split": task.split, "shots": task.shots,
            "lm_eval_group": benchmark.group, **meta, "overall": entry(samples),
            "groups": {g: entry(part) for g, part in sorted(groups.items())},
            "subjects": {s: {"group": benchmark.subject_group(s)} | entry(part) for s, part in subjects.items()},
            "skipped": task.skipped}


def score_task(task, tokenizer, scorers, max_length):
    """Score `task` (lorapipe.infer.tasks.Task) with each scorer {label: zero-argument function that
    loads it}, one model at a time; returns (samples, summary)."""
    prompts, prefixes = {}, {}
    for subject, (prefix, questions) in task.subjects.items():
        prefixes[subject] = tokenizer.encode([prefix])[0]
        prompts[subject] = [prompt_tokens(tokenizer, prefix, task.name, q, max_length) for q in questions]
    total = sum(map(len, prompts.values()))
    truncated = sum(p.truncated for ps in prompts.values() for p in ps)
    log.info("%s: %d questions in %d subjects, %d-shot; %d prompts cut at the left to %d tokens", task.name, total,
             len(prompts), task.shots, truncated, max_length)
    samples = [{"benchmark": task.name, "subject": subject, "index": q.index, "gold": q.gold}
               for subject, (_, questions) in task.subjects.items() for q in questions]
    for label in sorted(scorers):  # base, then finetuned
        scorer = scorers[label]()
        progress = Progress(f"{task.name} ({label})", total, unit="questions")
        done, results = 0, []
        for subject, ps in prompts.items():
            scorer.set_prefix(prefixes[subject])
            results += score_prompts(scorer, ps, progress, done)
            done += len(ps)
            progress.update(done)
        for sample, logliks in zip(samples, results):
            sample[label] = {"loglik": logliks, "pick": pick(logliks)}
        del scorer
    summary = summarize(task, samples, {"max_length": max_length, "truncated_prompts": truncated})
    return samples, summary


def write_results(samples, summary, json_path, samples_path):
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(samples_path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")


def lm_eval_max_length(hf_config):
    """The positions lm-eval's hf backend gives a model (HFLM.max_length): the config's
    max_position_embeddings, else the tokenizer's model_max_length, else 2048."""
    return int(hf_config.get("max_position_embeddings") or hf_config.get("model_max_length") or 2048)
