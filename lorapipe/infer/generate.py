"""Chat generation with the Baichuan2 model.

The chat template is the training layout (lorapipe.data.rows): `<reserved_106>{question}<reserved_107>`,
earlier turns before it as `<reserved_106>q<reserved_107>a`, and the model answers until eos.
On Ascend, decoding is MindFormers' own generate() with use_past, the recipe's path. On the host its
kernels do not exist (paged attention, ApplyRotaryPosEmb, ArgMaxExt), so decoding is our own loop:
lorapipe.model.decode's KV-cache forward, or, as the reference it is tested against, the MindSpore network
re-run over the whole sequence; tokens are picked in numpy (greedy, or sampling with top-k, top-p,
temperature and repetition penalty). Every checkpoint is loaded through load_weights, which checks it
against the network and folds LoRA tensors with the trained run's scale.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np

from lorapipe.errors import InputError
from lorapipe.formats.msckpt import checkpoint_index, iter_checkpoint
from lorapipe.model.architecture import is_alibi
from lorapipe.model.baichuan2 import network_shapes
from lorapipe.model.chat_template import chat_ids
from lorapipe.model.decode import KVCacheDecoder
from lorapipe.model.lora import check_adapter_shapes, fold, lora_pairs, pet_config_adapter, read_adapter_config
from lorapipe.model.tokenizer import ChatTokenizer
from lorapipe.outputs import atomic_outputs
from lorapipe.weights.checkpoints import rank_checkpoints

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


def read_mindformers_yaml(path):
    """A rendered MindFormers YAML as a dict, with a clear error for a missing or unreadable file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            rendered = yaml.safe_load(f)
        rendered["model"]["model_config"]
    except FileNotFoundError:
        raise InputError(f"{path}: MindFormers YAML not found") from None
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a MindFormers YAML with model.model_config ({e})") from None
    return rendered


def tokenizer_file(rendered, override, where):
    """The tokenizer: `override` (--vocab_file), else the YAML's processor.tokenizer.vocab_file."""
    path = override or (rendered.get("processor") or {}).get("tokenizer", {}).get("vocab_file")
    if not path:
        raise InputError(f"{where}: has no processor.tokenizer.vocab_file; pass --vocab_file")
    return path


def complete_checkpoint(path):
    """The complete checkpoint `--load_checkpoint` names: a .ckpt file, or (MindFormers' layout) a
    folder holding rank_0/ with one checkpoint. A folder of several ranks is a distributed checkpoint:
    merge it first."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"{path}: no such checkpoint file or folder")
    ckpts = rank_checkpoints(path)
    if len(ckpts) > 1:
        raise InputError(f"{path}: holds {len(ckpts)} rank folders, a distributed checkpoint; merge it into one "
                         f"first (snakemake merged_ckpt, or scripts/transform_ckpt.py)")
    return ckpts[0]


def read_adapter(adapter_config, model_config, where):
    """The LoRA settings to fold with: the adapter_config.json given, else the YAML's pet_config, else
    None (a checkpoint with LoRA tensors is then refused by load_model)."""
    if adapter_config:
        return read_adapter_config(adapter_config)
    if model_config.get("pet_config"):
        return pet_config_adapter(model_config["pet_config"], where)
    return None


def load_weights(model_config, ckpt, adapter=None):
    """{parameter name: array} of a complete checkpoint for the Baichuan2 network `model_config`
    describes (a rendered YAML's model_config), checked name by name and shape by shape.

    A checkpoint that holds LoRA tensors (merged_ckpt, as the recipe predicts from) is folded with
    `adapter` (the trained run's settings, lorapipe.model.lora.read_adapter_config), which it then needs. A
    tensor the model does not have, or a parameter the checkpoint lacks, is an error: nothing is dropped
    silently."""
    if not Path(ckpt).is_file():
        raise InputError(f"{ckpt}: checkpoint not found")
    index = checkpoint_index(ckpt)
    shapes = {name: shape for name, _, shape in index}
    pairs = lora_pairs(shapes, ckpt)
    if pairs:
        if adapter is None:
            raise InputError(f"{ckpt}: holds LoRA adapters ({pairs[next(iter(pairs))][0]} ...) but no adapter "
                             f"config says how to scale them; pass --adapter_config <finetune>/adapter_config.json "
                             f"(or a YAML with model_config.pet_config), or load the folded merged_lora checkpoint")
        check_adapter_shapes(pairs, shapes, adapter["r"], ckpt)
    expected = network_shapes(model_config)
    adapters = {n for pair in pairs.values() for n in pair}
    unexpected = [n for n in shapes if n not in expected and n not in adapters]
    missing = [n for n in expected if n not in shapes]
    misshapen = [f"{n} {tuple(shapes[n])} (expected {s})" for n, s in expected.items()
                 if n in shapes and tuple(shapes[n]) != s]
    problems = [f"{what}: {_some(names)}" for what, names in (("tensors the model does not have", unexpected),
                                                             ("parameters it lacks", missing),
                                                             ("tensors of the wrong shape", misshapen)) if names]
    if problems:
        raise InputError(f"{ckpt}: not a complete Baichuan2 checkpoint for this model ({'; '.join(problems)})")
    lora = dict(iter_checkpoint(ckpt, select=adapters.__contains__))
    weights = {}
    for name, array in iter_checkpoint(ckpt, select=lambda n: n not in adapters, hashed=True):
        weights[name] = fold(array, lora[pairs[name][0]], lora[pairs[name][1]], adapter["scaling"], name) \
            if name in pairs else array
    if pairs:
        log.info("%s: folded %d LoRA adapters on load (scale %s)", ckpt, len(pairs), adapter["scaling"])
    return weights


def _some(names, shown=3):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def load_model(model_config, ckpt, adapter=None, use_past=False):
    """The Baichuan2 MindSpore network (eval mode) with load_weights(...) in it; use_past builds
    MindFormers' incremental network (paged attention: Ascend kernels only)."""
    import mindspore as ms

    from lorapipe.model.network import build_model

    weights = load_weights(model_config, ckpt, adapter)
    net = build_model({k: v for k, v in model_config.items() if k not in ("pet_config", "checkpoint_name_or_path")
                       } | {"use_past": use_past})
    not_loaded, _ = ms.load_param_into_net(net, {n: ms.Parameter(ms.Tensor(a), name=n) for n, a in weights.items()})
    if [n for n in not_loaded if "cache" not in n]:  # use_past adds its key/value cache parameters
        raise InputError(f"{ckpt}: the network has parameters the checkpoint does not: {_some(not_loaded)}")
    return net


def use_device(rendered, mode=None, device_id=None):
    """MindSpore's device from a rendered YAML's context (the recipe's --mode and --device_id override
    it); returns the device target. The host (CPU) decodes in PyNative, MindSpore's default."""
    import mindspore as ms

    context = rendered.get("context") or {}
    target = context.get("device_target", "CPU")
    if target != "CPU":
        ms.set_context(device_target=target, mode=context.get("mode", 0) if mode is None else mode,
                       **({} if device_id is None else {"device_id": device_id}))
    return target


def build_decoder(model_config, ckpt, adapter=None, use_past=True, device_target="CPU"):
    """What predict and chat decode with: on the host with use_past, the KV-cache decoder; on Ascend,
    MindFormers' use_past network; without use_past, the plain network (full recompute). An ALiBi model
    (Baichuan2-13B) on Ascend decodes with the plain network: MindFormers 1.9's use_past path for LLaMA
    applies rotary embeddings and no ALiBi bias (models/llama/llama.py:353-370, llama_transformer.py:494-496)."""
    if use_past and device_target == "CPU":
        return KVCacheDecoder(load_weights(model_config, ckpt, adapter), model_config)
    if use_past and is_alibi(model_config):
        log.warning("ALiBi model on %s: MindFormers has no incremental ALiBi path for this network; decoding "
                    "re-runs the whole sequence for every new token", device_target)
        use_past = False
    return load_model(model_config, ckpt, adapter, use_past=use_past)


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
