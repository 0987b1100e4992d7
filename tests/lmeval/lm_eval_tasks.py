"""lm-evaluation-harness 0.4.x on a local benchmark release: its stock task YAMLs (ceval-valid, cmmlu, mmlu),
pointed at JSON Lines written from the release instead of the hub.

The stock tasks load ceval/ceval-exam, haonan-li/cmmlu and cais/mmlu from the Hugging Face hub, which this
machine cannot reach. So each subject's rows are written as the hub's dataset has them (every cell a string;
MMLU as question, choices [4], answer 0-3), and each task YAML is the stock one with `dataset_path: json` and
those files; description, prompt, choices and target stay lm-eval's own. Each row also carries `index`, its
0-based row in the release's CSV, for matching lm-eval's logged samples to lorapipe's.

Used by tests/lmeval/test_lm_eval_parity.py and benchmarks/eval_tasks.py; needs lm-eval in its own venv
(LORAPIPE_LMEVAL_PYTHON; `make test-lmeval` builds .venv-lmeval from envs/lmeval-requirements.txt).
"""

import json
import os
import subprocess
from pathlib import Path

import yaml

from lorapipe.infer.tasks import Release, questions

STOCK = {  # benchmark: (folder under lm_eval/tasks, the defaults YAML, subject YAML prefix, split name)
    "ceval": ("ceval", "_default_ceval_yaml", "ceval-valid_", "val"),
    "cmmlu": ("cmmlu", "_default_template_yaml", "cmmlu_", "test"),
    "mmlu": ("mmlu/default", "_default_template_yaml", "mmlu_", "test"),
}


def lm_eval_python():
    return os.environ.get("LORAPIPE_LMEVAL_PYTHON")


def stock_tasks_dir(python):
    out = subprocess.run([python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out) / "tasks"


def _hub_row(benchmark, q):
    if benchmark == "mmlu":
        return {"question": q.question, "subject": q.subject, "choices": list(q.choices),
                "answer": "ABCD".index(q.answer), "index": q.index}
    row = {"question" if benchmark == "ceval" else "Question": q.question,
           **dict(zip("ABCD", q.choices)), "answer" if benchmark == "ceval" else "Answer": q.answer}
    return row | {"index": q.index}


def _load_stock(path):
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text.replace("!function ", ""))  # (no !function in these tasks' fields we keep)


def write_tasks(python, benchmark, release_path, subjects, out_dir):
    """Task YAMLs `local_<benchmark>_<subject>` and their data under `out_dir`; returns the task names."""
    folder, defaults, prefix, split = STOCK[benchmark]
    stock = stock_tasks_dir(python) / folder
    base = _load_stock(stock / defaults)
    release = Release(benchmark, release_path)
    names = []
    for subject in subjects:
        subject_yaml = _load_stock(stock / f"{prefix}{subject}.yaml")
        files = {}
        for part in ("dev", split):
            path = Path(out_dir) / "data" / benchmark / f"{subject}_{part}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for q in questions(release, part, subject):
                    f.write(json.dumps(_hub_row(benchmark, q), ensure_ascii=False) + "\n")
            files[part] = str(path)
        task = {k: v for k, v in base.items() if k not in ("dataset_path", "dataset_name", "tag", "group")}
        task.update(task=f"local_{benchmark}_{subject}", dataset_path="json", dataset_kwargs={"data_files": files},
                    description=subject_yaml["description"])
        (Path(out_dir) / f"local_{benchmark}_{subject}.yaml").write_text(
            yaml.safe_dump(task, allow_unicode=True, sort_keys=False), encoding="utf-8")
        names.append(task["task"])
    return names


def run_lm_eval(python, model_dir, tasks, include_path, out_dir, shots, limit=None, batch_size=8, threads=None):
    """lm-eval's hf backend (fp32, CPU) on `tasks`; returns {task: [logged samples]} and the seconds it ran."""
    import time

    cmd = [python, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", ",".join(tasks), "--include_path", str(include_path), "--num_fewshot", str(shots),
           "--batch_size", str(batch_size), "--device", "cpu", "--log_samples", "--output_path", str(out_dir)]
    if limit:
        cmd += ["--limit", str(limit)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.time() - start
    if proc.returncode:
        raise AssertionError(f"lm-eval failed ({' '.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    samples = {}
    for path in Path(out_dir).rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return samples, seconds
