"""The standard benchmarks (lorapipe.infer.tasks, lorapipe.infer.scoring): releases read as published, prompts
as lm-eval writes them, and scores equal to the reference's on generated questions.

The reference here is what lm-eval's hf backend computes (api/model.py _encode_pair, huggingface.py
_loglikelihood_tokens), written out with transformers' LlamaForCausalLM on the project's Llama export and its
HF tokenizer, one whole prompt at a time; tests/lmeval runs lm-eval itself. The releases are small ones made
here in the official layouts (the real ones' licences keep them out of the repository)."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from conftest import text, write_base_with_random_lora, write_release, zip_folder

from lorapipe.errors import ConfigError, InputError
from lorapipe.infer.scoring import (
    HostScorer,
    NetworkScorer,
    encode_pair,
    prompt_tokens,
    score_task,
)
from lorapipe.infer.tasks import (
    BENCHMARKS,
    LETTERS,
    SUBJECTS,
    check_tasks,
    load_task,
    question_text,
)

SUBJECT = {"ceval": "accountant", "cmmlu": "agronomy", "mmlu": "anatomy"}


def test_the_prompt_is_lm_evals():
    from lorapipe.infer.tasks import Question, subject_prefix

    q = Question("anatomy", 0, "  Which bone?\n", ("a", "b", "c", "d"), "B")
    shots = [Question("anatomy", i, f"Q{i}", ("w", "x", "y", "z"), "C") for i in range(2)]
    assert subject_prefix("mmlu", "anatomy", shots) + question_text("mmlu", q) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Q0\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\nQ1\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n"
        "Which bone?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert subject_prefix("ceval", "accountant", []) == "以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n"
    assert subject_prefix("cmmlu", "agronomy", []) == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
    assert question_text("cmmlu", q).endswith("\nD. d\n答案：")
    assert {b: len(s) for b, s in SUBJECTS.items()} == {"ceval": 52, "cmmlu": 67, "mmlu": 57}


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_a_zip_a_folder_and_a_zip_with_a_top_folder_read_the_same(tmp_path, benchmark):
    folder = write_release(tmp_path / "plain", benchmark, [SUBJECT[benchmark]])
    nested = write_release(tmp_path / "nested", benchmark, [SUBJECT[benchmark]], top="release-1.0")
    paths = [folder, zip_folder(folder, tmp_path / "a.zip"), zip_folder(nested, tmp_path / "b.zip")]
    tasks = [load_task({"name": benchmark, "path": str(p), "shots": 2, "subjects": [SUBJECT[benchmark]]})
             for p in paths]
    assert tasks[0].subjects == tasks[1].subjects == tasks[2].subjects
    prefix, qs = tasks[0].subjects[SUBJECT[benchmark]]
    assert len(qs) == 6 and [q.index for q in qs] == list(range(6))
    # cells stay the strings they are in the file: no NaN, no numbers
    with open(folder / BENCHMARKS[benchmark].file(BENCHMARKS[benchmark].splits[0], SUBJECT[benchmark]),
              encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1 if BENCHMARKS[benchmark].header else 0:]
    first = 1 if BENCHMARKS[benchmark].header else 0
    assert [(q.question, *q.choices, q.answer) for q in qs] == [tuple(r[first:first + 6]) for r in rows]


@pytest.mark.parametrize("bad, problem", [
    (("val", 3, 5, "E"), "row 3: answer 'E' is not one of A, B, C, D"),
    (("val", 2, 3, ""), "row 2: choice C is empty"),
    (("dev", 1, 5, ""), "row 1: answer '' is not one of A, B, C, D"),
])
def test_a_malformed_row_is_named_or_skipped_and_counted(tmp_path, bad, problem):
    root = write_release(tmp_path, "ceval", ["accountant"], bad=bad)
    entry = {"name": "ceval", "path": str(root), "subjects": ["accountant"]}
    with pytest.raises(InputError) as e:
        load_task(entry)
    assert f"{bad[0]}/accountant_{bad[0]}.csv (subject accountant) {problem}" in str(e.value)
    assert "skip_malformed" in str(e.value)
    task = load_task(entry | {"skip_malformed": True})
    assert task.skipped == [{"subject": "accountant", "split": bad[0], "index": bad[1], "problem": problem.split(": ", 1)[1]}]
    assert len(task.subjects["accountant"][1]) == 6 - (bad[0] == "val")


def test_a_short_row_is_named(tmp_path):
    root = write_release(tmp_path, "mmlu", ["anatomy"])
    path = root / "data/test/anatomy_test.csv"
    path.write_text(path.read_text(encoding="utf-8") + "only a question,a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"anatomy_test.csv \(subject anatomy\) row 6: has 3 of the 6 fields"):
        load_task({"name": "mmlu", "path": str(root), "subjects": ["anatomy"]})


def test_bad_settings_and_paths_get_one_line(tmp_path):
    cmmlu = write_release(tmp_path / "cmmlu", "cmmlu", ["agronomy"])
    with pytest.raises(InputError, match=r"not the C-Eval release: it has no dev/accountant_dev.csv or any other subject"):
        load_task({"name": "ceval", "path": str(cmmlu), "subjects": ["accountant"]})
    with pytest.raises(InputError, match=r"dev/agronomy.csv \(subject agronomy\): shots 4 but dev holds 3 usable"):
        load_task({"name": "cmmlu", "path": str(write_release(tmp_path / "c2", "cmmlu", ["agronomy"], dev=3)),
                   "subjects": ["agronomy"], "shots": 4})
    with pytest.raises(ConfigError, match=r"unknown CMMLU subject\(s\) agronomyy"):
        check_tasks([{"name": "cmmlu", "path": str(cmmlu), "subjects": ["agronomyy"]}])
    with pytest.raises(ConfigError, match=r"split 'test': C-Eval scores val \(its test split has no answers\)"):
        check_tasks([{"name": "ceval", "path": str(cmmlu), "split": "test"}])
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[0\] \(mmlu\): path .*nowhere.zip: no such file"):
        check_tasks([{"name": "mmlu", "path": str(tmp_path / "nowhere.zip")}])
    with pytest.raises(ConfigError, match="cmmlu listed more than once"):
        check_tasks([{"name": "cmmlu", "path": str(cmmlu)}] * 2)
    (tmp_path / "not.zip").write_text("hello")
    with pytest.raises(InputError, match="neither a zip nor a folder"):
        load_task({"name": "mmlu", "path": str(tmp_path / "not.zip")})


# -- scores against the reference -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_base_dir, tmp_path_factory):
    """The tiny base and a finetuned one (random LoRA, folded), in lorapipe's checkpoint and as the Llama export."""
    import mindspore.train.serialization  # noqa: F401  (its protobuf modules load before transformers' slow tokenizer's)

    from lorapipe.exports.llama import export_llama
    from lorapipe.model.architecture import mindformers_model_config
    from lorapipe.weights.checkpoints import fold_lora

    d = tmp_path_factory.mktemp("bench")
    base, lora = write_base_with_random_lora(tiny_base_dir, d, 4, seed=1)
    (d / "adapter.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 16,
                                                "target_modules": ".*wq|.*wk|.*wv"}))
    folded = d / "folded.ckpt"
    fold_lora(lora, folded, d / "adapter.json")
    export_llama(folded, tiny_base_dir, d / "hf_llama", "rope")
    hf_config = json.loads((tiny_base_dir / "config.json").read_text())
    return d, {"finetuned": folded, "base": base}, mindformers_model_config(hf_config, 64)


def reference_logliks(hf, hf_tok, context, max_length):
    """lm-eval's hf backend, for the continuations " A" ... " D" of `context`, one whole prompt each."""
    out = []
    for letter in LETTERS:
        whole = hf_tok.encode(context + " " + letter)
        ctx = hf_tok.encode(context)
        cont = whole[len(ctx):]
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        with torch.no_grad():
            logits = torch.log_softmax(hf(torch.tensor([inp])).logits[0].double(), -1)
        out.append(float(sum(logits[len(inp) - len(cont) + k, t] for k, t in enumerate(cont))))
    return out


@pytest.mark.parametrize("benchmark, shots", [("mmlu", 2), ("ceval", 1), ("cmmlu", 0)])
def test_scores_equal_the_reference_on_generated_questions(tmp_path, models, tiny_base_dir, benchmark, shots):
    """Prefix reuse, batching by length, and the fall-back to whole prompts where truncation cuts into the
    prefix, against one whole prompt at a time; max_length is the prompts' median length, so both happen."""
    import transformers

    from lorapipe.infer.loader import load_weights
    from lorapipe.model.tokenizer import ChatTokenizer

    d, checkpoints, model_config = models
    subjects = sorted(SUBJECTS[benchmark])[:3]
    root = write_release(tmp_path, benchmark, subjects, rows=40, seed=len(benchmark) + shots, words=6)
    task = load_task({"name": benchmark, "path": str(root), "shots": shots, "subjects": subjects})
    tok = ChatTokenizer(tiny_base_dir / "tokenizer.model")
    max_length = int(np.median([len(tok.encode([prefix + question_text(benchmark, q) + " A"])[0])
                                for prefix, qs in task.subjects.values() for q in qs]))
    config = {**model_config, "seq_length": max_length}
    scorers = {label: (lambda c=c: HostScorer(load_weights(config, c), config, max_length))
               for label, c in checkpoints.items()}
    samples, summary = score_task(task, tok, scorers, max_length)
    assert 0 < summary["truncated_prompts"] < len(samples), summary["truncated_prompts"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(d / "hf_llama", local_files_only=True)  # fast, as lm-eval
    hf = {"finetuned": transformers.AutoModelForCausalLM.from_pretrained(d / "hf_llama", local_files_only=True).eval(),
          "base": None}
    worst = 0.0
    prompts = {(s, q.index): prefix + question_text(benchmark, q) for s, (prefix, qs) in task.subjects.items() for q in qs}
    for sample in samples:
        context = prompts[sample["subject"], sample["index"]]
        want = reference_logliks(hf["finetuned"], hf_tok, context, max_length)
        got = sample["finetuned"]["loglik"]
        worst = max(worst, max(abs(a - b) for a, b in zip(want, got)))
        assert got == pytest.approx(want, abs=1e-4), sample
        assert sample["finetuned"]["pick"] == int(np.argmax(want)) or sorted(want)[-1] - sorted(want)[-2] < 1e-4
    assert worst < 1e-4
    assert summary["overall"]["questions"] == len(samples) == 3 * 40
    assert summary["overall"]["delta"] == pytest.approx(summary["overall"]["finetuned"] - summary["overall"]["base"])


def test_the_tokenizer_encodes_as_the_exports_hf_tokenizer(models, tiny_base_dir):
    """lorapipe encodes prompts with sentencepiece (ChatTokenizer); lm-eval with the export's HF tokenizer
    (fast, converted from tokenizer.model). They give the same ids on varied prompts and pairs."""
    import transformers

    from lorapipe.model.tokenizer import ChatTokenizer

    d, _, _ = models
    tok = ChatTokenizer(tiny_base_dir / "tokenizer.model")
    rng = random.Random(5)
    for use_fast in (True, False):
        hf_tok = transformers.AutoTokenizer.from_pretrained(d / "hf_llama", use_fast=use_fast, local_files_only=True)
        for _ in range(300):
            context = text(rng, 40) + rng.choice(["\n答案：", "\nAnswer:", "Answer: ", " ", "\n"])
            for letter in ("A", "D"):
                assert encode_pair(tok, context, " " + letter) == _hf_pair(hf_tok, context, " " + letter), context


def _hf_pair(hf_tok, context, continuation):
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = hf_tok.encode(context + continuation), hf_tok.encode(context)
    return ctx, whole[len(ctx):]


def test_the_network_on_the_device_scores_as_the_host(tmp_path, models, tiny_base_dir):
    """What runs on Ascend (the MindSpore network, whole prompts) gives the host's scores, here on CPU."""
    from lorapipe.infer.loader import load_model, load_weights
    from lorapipe.model.tokenizer import ChatTokenizer

    _, checkpoints, model_config = models
    root = write_release(tmp_path, "mmlu", ["anatomy"], rows=8)
    task = load_task({"name": "mmlu", "path": str(root), "shots": 2, "subjects": ["anatomy"]})
    tok = ChatTokenizer(tiny_base_dir / "tokenizer.model")
    config = {**model_config, "seq_length": 128}
    ckpt = checkpoints["finetuned"]
    host, _ = score_task(task, tok, {"finetuned": lambda: HostScorer(load_weights(config, ckpt), config, 128)}, 128)
    net, _ = score_task(task, tok, {"finetuned": lambda: NetworkScorer(load_model(config, ckpt), 4)}, 128)
    got, want = (np.array([s["finetuned"]["loglik"] for s in samples]) for samples in (net, host))
    assert np.abs(got - want).max() < 1e-4


def test_prompt_tokens_truncate_at_the_left_as_lm_eval(tiny_base_dir):
    from lorapipe.infer.tasks import Question
    from lorapipe.model.tokenizer import ChatTokenizer

    tok = ChatTokenizer(tiny_base_dir / "tokenizer.model")
    q = Question("anatomy", 0, "word " * 200, ("a", "b", "c", "d"), "A")
    p = prompt_tokens(tok, "", "mmlu", q, 64)
    assert p.truncated and all(len(i) == 64 for i in p.inputs)
    whole, ctx = tok.encode([question_text("mmlu", q) + " A", question_text("mmlu", q)])
    assert list(p.inputs[0]) == whole[-65:-1] and p.continuations[0] == tuple(whole[len(ctx):])
    assert len(p.continuations[0]) == 2  # this tokenizer's " A" is two pieces: each is scored
