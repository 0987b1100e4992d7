"""The GGUF files proven in llama.cpp itself (llama-cpp-python, built from source: `make test-deploy`).

The tiny default is built by the workflow (export_gguf, export_llama, predict_config) in a temporary
folder, or in $LORAPIPE_DEPLOY_WORKDIR when set (kept between runs); the f32 file is exported here. Then
llama.cpp, on the same token ids as lorapipe:
* logits: f32 against lorapipe's MindSpore network and transformers on the Llama export; f16 and q8_0
  within the tolerances below, with the argmax;
* greedy decoding (temperature 0, no repetition penalty) of the predict prompts: f32 and f16 give
  predict's tokens, all 32 or up to eos; q8_0 the same until the reference's top-two margin is within
  q8_0's logit error;
* its tokenizer gives lorapipe's ids (ChatTokenizer) on varied texts;
* create_chat_completion with the embedded template gives lorapipe's prompt ids (chat_template.chat_ids), and
  the answer predict gives.
Not collected by `make test` (pyproject.toml: norecursedirs); skipped where llama_cpp is not installed.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import default_config, snakemake, write_config

llama_cpp = pytest.importorskip("llama_cpp")

NAME = "baichuan2_tiny"
MAX_NEW = 32  # predict.max_new_tokens of the tiny default
# How far llama.cpp's logits may be from lorapipe's (max abs over every position and vocab entry; the
# tiny model's logits span about ±4). f32: the same arithmetic in another order (ggml's SIMD sums, its
# rotary and softmax), so float32 rounding only. f16: ggml's CPU matmul for f16 weights converts the
# activations to f16 too (vec_dot_type F16), so each product carries two f16 roundings (2^-11 relative).
# q8_0: weights rounded to 1/254 of their block's max, and activations quantised to q8_0 as well. f16 and
# q8_0 also keep keys and values in llama.cpp's default f16 KV cache.
# Measured on the tiny default: 4.4e-6, 3.4e-3 and 0.079; the bounds leave room for another CPU's SIMD.
TOLERANCE = {"f32": 5e-5, "f16": 1e-2, "q8_0": 0.15}
QUESTIONS = ["Hello!", "写一首关于秋天的诗", "Tell me about </s> and <s>.", "What is 12 plus 7?\nAnswer briefly."]
HISTORY = [("Hi", "Hello, how can I help?")]
TEXTS = [
    "Hello, world!", "法国的首都是哪里？", "写一首关于秋天的诗", "What is 12 plus 7? 12345678901234567890",
    "  two leading spaces,  double  spaces and a trailing one ", "tabs\tand\nnewlines\n\n", "混合 mixed 中文 and English。",
    "emoji 🙂🚀 and rare 龘 characters (byte fallback)", "literal </s> and <s> and <unk> stay text",
    "typed markers <reserved_106> and <reserved_107> stay text", "a<reserved_106>b", "", " ", "\u00e9\u00e8 caf\u00e9",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The workflow's artifacts for the tiny default, and llama.cpp's models of its GGUF files."""
    workdir = Path(os.environ.get("LORAPIPE_DEPLOY_WORKDIR") or tmp_path_factory.mktemp("deploy"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "deploy_config.yaml", default_config())
    snakemake(workdir, "--cores", "2", "export_gguf", "export_llama", "predict_config", configfile=config)
    results = workdir / "results" / "tiny"
    from lorapipe.exports.gguf import export_gguf

    ckpt, base = results / "merged_lora/rank_0/merged_lora.ckpt", results / "tiny_base"
    f32 = export_gguf(ckpt, base, tmp_path_factory.mktemp("f32"), NAME, "rope", ("f32",))["f32"]
    paths = {"f32": f32, **{t: results / "gguf" / f"{NAME}-{t}.gguf" for t in ("f16", "q8_0")}}
    # The f32 file runs with an f32 KV cache (GGML_TYPE_F32 = 0): the exactness proof. The others as deployed,
    # with llama.cpp's default f16 cache.
    models = {t: llama_cpp.Llama(model_path=str(p), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, seed=0,
                                 verbose=False, **({"type_k": 0, "type_v": 0} if t == "f32" else {}))
              for t, p in paths.items()}
    return SimpleNamespace(results=results, ckpt=ckpt, base=base, paths=paths, models=models,
                           hf_config=json.loads((base / "config.json").read_text()))


@pytest.fixture(scope="module")
def tok(run):
    from lorapipe.model.tokenizer import ChatTokenizer

    return ChatTokenizer(run.base / "tokenizer.model")


@pytest.fixture(scope="module")
def predict_decoder(run):
    """What predict decodes with on the host (the KV-cache decoder of the predict YAML's network)."""
    from lorapipe.infer.loader import build_decoder
    from lorapipe.train.mindformers_yaml import read_mindformers_yaml

    rendered = read_mindformers_yaml(run.results / "predict" / "run_baichuan2.yaml")
    return build_decoder(rendered["model"]["model_config"], run.ckpt)


def predict_prompts(tok):
    from lorapipe.model.chat_template import chat_ids

    prompts = default_config()["predict"]["prompts"]
    return [chat_ids(tok, p) for p in prompts] + [chat_ids(tok, q) for q in QUESTIONS] + \
        [chat_ids(tok, QUESTIONS[0], HISTORY)]


def lorapipe_greedy(decoder, tok, ids, eos=None):
    """predict's greedy tokens (temperature 0, no repetition penalty); eos -1: 32 tokens, eos or not."""
    from lorapipe.infer.generate import generate

    return generate(decoder, ids, tok.eos if eos is None else eos, max_new_tokens=MAX_NEW, do_sample=False,
                    repetition_penalty=1.0)


def llama_cpp_greedy(llm, ids, eos):
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == eos or len(out) == MAX_NEW:
            break
        out.append(token)
    return out[:MAX_NEW]


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float64)


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_llama_cpp_reads_the_files_as_written(run, tok):
    for t, llm in run.models.items():
        m = llm.metadata
        assert m["general.architecture"] == "llama" and m["tokenizer.ggml.add_bos_token"] == "false"
        assert llm.n_vocab() == run.hf_config["vocab_size"] and llm.n_ctx() == 256
        assert (llm.token_bos(), llm.token_eos()) == (1, tok.eos)
        assert llm._model.add_bos_token() is False  # what llama.cpp's vocabulary decided from the file


def test_logits_agree(run, tok, predict_decoder):
    """Every position of every prompt and of 32 greedy tokens after it, on the same ids: llama.cpp against
    lorapipe's MindSpore network and against transformers on the Llama export."""
    import torch
    import transformers

    from lorapipe.infer.loader import load_model
    from lorapipe.model.architecture import mindformers_model_config
    from lorapipe.model.network import logits

    net = load_model(mindformers_model_config(run.hf_config, 64), run.ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run.results / "hf_llama", local_files_only=True).eval()
    worst = {t: 0.0 for t in run.models}
    agree = {t: [0, 0] for t in run.models}
    for ids in predict_prompts(tok):
        ids = (ids + lorapipe_greedy(predict_decoder, tok, ids, eos=-1))[:64]  # the network's seq_length
        want = logits(net, np.array([ids], np.int32))[0]
        with torch.no_grad():
            assert max_diff(hf(torch.tensor([ids])).logits[0].numpy(), want) < 1e-4  # the two references agree
        for t, llm in run.models.items():
            got = llama_cpp_logits(llm, ids)
            worst[t] = max(worst[t], max_diff(got, want))
            agree[t][0] += int((got.argmax(-1) == want.argmax(-1)).sum())
            agree[t][1] += len(ids)
    print("max |llama.cpp - lorapipe| logits:", worst, "argmax agreement:", agree)
    for t in run.models:
        assert worst[t] < TOLERANCE[t], (t, worst[t])
    assert agree["f32"][0] == agree["f32"][1]
    assert agree["f16"][0] >= 0.98 * agree["f16"][1]


def test_greedy_decoding_gives_predicts_tokens(run, tok, predict_decoder):
    """f32 and f16: predict's tokens, all 32 or up to eos; and, to compare longer runs (the tiny model
    often answers in a few tokens), 32 tokens with eos taken as any token. q8_0: the same tokens up to the
    first step where the reference's own top-two margin is below twice q8_0's logit tolerance: there an
    error within the tolerance on each logit can swap the two, so agreement can only be asked up to it."""
    report = {}
    for stop in (tok.eos, -1):
        lengths, q8 = [], []
        for ids in predict_prompts(tok):
            want = lorapipe_greedy(predict_decoder, tok, ids, stop)
            lengths.append(len(want))
            for t in ("f32", "f16"):
                assert llama_cpp_greedy(run.models[t], ids, stop) == want, (t, stop, ids)
            got = llama_cpp_greedy(run.models["q8_0"], ids, stop)
            n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            margin = None
            if got != want:
                top2 = np.sort(llama_cpp_logits(run.models["f32"], ids + want[:n])[-1])[-2:]
                margin = round(float(top2[1] - top2[0]), 4)
                assert margin < 2 * TOLERANCE["q8_0"], (stop, ids, n, top2)
            q8.append((n, len(want), margin))
        report["up to eos" if stop == tok.eos else "eos ignored"] = (lengths, q8)
    print("greedy tokens per prompt, and q8_0's agreement (n equal of len, the reference's margin where it "
          "parts):", report)
    lengths = report["up to eos"][0]
    assert MAX_NEW in lengths and min(lengths) < MAX_NEW  # the full 32 tokens, and eos, both covered
    assert set(report["eos ignored"][0]) == {MAX_NEW}


def test_tokenizer_gives_lorapipes_ids(run, tok):
    llm = run.models["f16"]
    for text in TEXTS:
        want = tok.encode([text])[0]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
        # add_bos asks for the model's default, which the file sets to none
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text
        assert llm.detokenize(want).decode() == tok.sp.decode(want), text
    # Parsing special tokens (what chat formatting does): the turn markers are ids.
    assert llm.tokenize("<reserved_106>你好<reserved_107>".encode(), add_bos=False, special=True) == \
        [tok.user, *tok.encode(["你好"])[0], tok.assistant]


def test_chat_completion_formats_as_predict(run, tok, predict_decoder):
    """create_chat_completion with the GGUF's own template: lorapipe's prompt ids, and predict's answer."""
    import jinja2

    from lorapipe.model.chat_template import chat_ids

    llm = run.models["f32"]
    assert llm.chat_format == "chat_template.default"
    seen = []
    original = llm.create_completion

    def capture(*args, **kwargs):
        seen.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    llm.create_completion = capture
    cases = [([], q, None) for q in QUESTIONS[:2]] + [(HISTORY, QUESTIONS[1], None), ([], QUESTIONS[0], "Be brief.")]
    for history, question, system in cases:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))] + \
            [{"role": "user", "content": question}]
        want = chat_ids(tok, (system + "\n" if system else "") + question, history)
        reply = llm.create_chat_completion(messages, temperature=0.0, repeat_penalty=1.0, max_tokens=MAX_NEW)
        assert seen[-1] == want, (messages, seen[-1], want)
        answer = lorapipe_greedy(predict_decoder, tok, want)
        assert reply["choices"][0]["message"]["content"] == tok.sp.decode(answer)
        # The template alone (jinja2, as any client renders it), tokenised with special tokens parsed.
        text = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"]).render(
            messages=messages, add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want


def test_why_the_turn_markers_are_control_tokens(run, tok, tmp_path, monkeypatch):
    """llama.cpp matches a piece in text only when its type is CONTROL or USER_DEFINED
    (src/llama-vocab.cpp, tokenizer_st_partition); a NORMAL piece must come out of SPM merges, and no
    merge path leads to `<reserved_106>`. convert_hf_to_gguf.py types sentencepiece's user-defined pieces
    NORMAL unless added_tokens declare them (conversion/base.py, _create_vocab_sentencepiece): such a
    file would give the template's markers as a dozen character pieces."""
    import gguf

    from lorapipe.exports import gguf as gguf_export

    vocabulary = gguf_export.vocabulary

    def as_the_converter_types_them(tokenizer_model, vocab_size):
        tokens, scores, types, ids, prefix = vocabulary(tokenizer_model, vocab_size)
        for i in (tok.user, tok.assistant):
            types[i] = int(gguf.TokenType.NORMAL)
        return tokens, scores, types, ids, prefix

    monkeypatch.setattr(gguf_export, "vocabulary", as_the_converter_types_them)
    path = gguf_export.export_gguf(run.ckpt, run.base, tmp_path, "normal", "rope", ("f16",))["f16"]
    normal = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    text = "<reserved_106>hi<reserved_107>".encode()
    assert run.models["f16"].tokenize(text, add_bos=False, special=True) == [tok.user, *tok.encode(["hi"])[0], tok.assistant]
    split = normal.tokenize(text, add_bos=False, special=True)
    assert tok.user not in split and len(split) > 10
    # llama.cpp's built-in template matcher (llama_chat_apply_template, src/llama-chat.cpp) does not know
    # this template: clients need a jinja engine (llama-server and llama-cli have one, on by default).
    import ctypes

    messages = (llama_cpp.llama_chat_message * 1)(llama_cpp.llama_chat_message(role=b"user", content=b"hi"))
    buffer = ctypes.create_string_buffer(256)
    template = run.models["f16"].metadata["tokenizer.chat_template"].encode()
    assert llama_cpp.llama_chat_apply_template(template, messages, 1, True, buffer, 256) == -1
