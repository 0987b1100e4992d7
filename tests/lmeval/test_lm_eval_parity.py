"""lorapipe's benchmark scores are lm-evaluation-harness's: the same prompts, log-likelihoods and picks.

The tiny default is built with C-Eval (val), CMMLU and MMLU configured 5-shot, the first LIMIT questions of
every subject (`snakemake all`, which runs eval_tasks). lm-eval 0.4.x's hf backend then scores the same
questions on the project's own Llama exports, hf_llama (finetuned) and hf_llama_base (base), through its
stock task YAMLs pointed at the local release (lm_eval_tasks.py). For every question and both models:
* lm-eval's context is lorapipe's prompt, character for character, and its continuation " A" ... " D";
* the four log-likelihoods agree within 1e-3 (lorapipe: the host's fp32 forward with each subject's
  few-shot prefix reused; lm-eval: transformers' LlamaForCausalLM in fp32);
* the pick is the same, except where the top two are within that tolerance of each other;
and the per-subject descriptions are lm-eval's. The tiny tokenizer's byte-fallback Chinese makes 5-shot
C-Eval prompts 700-2,800 tokens, so lm-eval's left truncation to the model's 512 positions is compared too.

Needs lm-eval in its own venv (`make test-lmeval`: .venv-lmeval, LORAPIPE_LMEVAL_PYTHON) and the official
releases in ../shared/eval (LORAPIPE_EVAL_DIR); skipped otherwise. Not collected by `make test`.
$LORAPIPE_LMEVAL_WORKDIR keeps the built tiny default between runs.
"""

import json
import os
from pathlib import Path

import pytest
from conftest import REPO, make_run_workdir, snakemake, write_config
from lm_eval_tasks import lm_eval_python, run_lm_eval, stock_tasks_dir, write_tasks

from lorapipe.infer.tasks import BENCHMARKS, SUBJECTS, load_task, question_text

EVAL_DIR = Path(os.environ.get("LORAPIPE_EVAL_DIR", REPO.parent / "shared" / "eval"))
PYTHON = lm_eval_python()
LIMIT, SHOTS, TOLERANCE = 2, 5, 1e-3
pytestmark = pytest.mark.skipif(not PYTHON or not (EVAL_DIR / "ceval.zip").is_file(),
                                reason="needs LORAPIPE_LMEVAL_PYTHON (make test-lmeval) and the releases in ../shared/eval")
MODELS = {"finetuned": "hf_llama", "base": "hf_llama_base"}


def task_entry(name):
    return {"name": name, "path": str(EVAL_DIR / f"{name}.zip"), "shots": SHOTS, "limit": LIMIT}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = Path(os.environ.get("LORAPIPE_LMEVAL_WORKDIR") or tmp_path_factory.mktemp("lmeval"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yaml"
    if not (workdir / "data").exists():
        make_run_workdir(workdir)
    import yaml

    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["evaluate"] = {"tasks": [task_entry(n) for n in BENCHMARKS]}
    write_config(config, cfg)
    snakemake(workdir, "--cores", "2", "all", configfile=config)
    return workdir / "results" / "tiny"


@pytest.fixture(scope="module", params=list(BENCHMARKS))
def compared(request, built, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(f"lm_eval_{name}")
    tasks = write_tasks(PYTHON, name, EVAL_DIR / f"{name}.zip", sorted(SUBJECTS[name]), tmp / "tasks")
    theirs = {label: run_lm_eval(PYTHON, built / folder, tasks, tmp / "tasks", tmp / label, SHOTS, LIMIT)[0]
              for label, folder in MODELS.items()}
    ours = [json.loads(line) for line in (built / "evaluate" / f"{name}.samples.jsonl").read_text().splitlines()]
    return name, theirs, {(s["subject"], s["index"]): s for s in ours}


def test_the_descriptions_are_lm_evals():
    from lm_eval_tasks import STOCK, _load_stock

    for name, (folder, _, prefix, _) in STOCK.items():
        stock = stock_tasks_dir(PYTHON) / folder
        for subject in SUBJECTS[name]:
            theirs = _load_stock(stock / f"{prefix}{subject}.yaml")["description"]
            assert BENCHMARKS[name].description.format(BENCHMARKS[name].subject_name(subject)) == theirs, subject


def test_prompts_logliks_and_picks_are_lm_evals(compared):
    name, theirs, ours = compared
    task = load_task(task_entry(name))
    prompts = {(s, q.index): prefix + question_text(name, q) for s, (prefix, qs) in task.subjects.items() for q in qs}
    counted, near_ties, worst = 0, 0, 0.0
    for label in MODELS:
        for task_name, samples in theirs[label].items():
            subject = task_name[len(f"local_{name}_"):]
            assert len(samples) == min(LIMIT, len(task.subjects[subject][1])), task_name
            for sample in samples:
                key = (subject, sample["doc"]["index"])
                mine = ours[key][label]
                args = [sample["arguments"][f"gen_args_{j}"] for j in range(4)]
                assert all(a["arg_0"] == prompts[key] for a in args), key
                assert [a["arg_1"] for a in args] == [" A", " B", " C", " D"]
                logliks = [float(r[0][0]) for r in sample["resps"]]
                worst = max(worst, max(abs(a - b) for a, b in zip(logliks, mine["loglik"])))
                assert logliks == pytest.approx(mine["loglik"], abs=TOLERANCE), (label, key)
                top = sorted(logliks, reverse=True)
                if top[0] - top[1] <= TOLERANCE:
                    near_ties += 1
                else:
                    assert logliks.index(top[0]) == mine["pick"], (label, key)
                assert ours[key]["gold"] == int(sample["target"]), key
                counted += 1
    print(f"{name}: {counted} question-model pairs, largest log-likelihood difference {worst:.2e}, "
          f"{near_ties} near-ties")
    assert counted == 2 * len(ours)


def test_the_accuracies_are_lm_evals(compared, built):
    name, theirs, ours = compared
    result = json.loads((built / "evaluate" / f"{name}.json").read_text())
    for label in MODELS:
        correct = sum(s["acc"] for samples in theirs[label].values() for s in samples)
        total = sum(len(samples) for samples in theirs[label].values())
        assert result["overall"][label] == pytest.approx(correct / total, abs=1.5 / total), label
