import csv
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "config" / "config.yaml"
SAMPLE_DATA = REPO / "data" / "belle_sample.json"


def default_config():
    """The tiny default config with its data path made absolute (tests run in a temp dir)."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    cfg["data"]["train"] = str(SAMPLE_DATA)
    return cfg


def make_run_workdir(workdir):
    """`workdir` set up as the checkout is for `make run`: data/ (linked) and the tiny default config, with
    the data named as config/config.yaml names it, so that every artifact is make run's. Returns the
    config file."""
    (workdir / "data").symlink_to(SAMPLE_DATA.parent)
    cfg = default_config()
    cfg["data"]["train"] = str(SAMPLE_DATA.relative_to(REPO))
    return write_config(workdir / "config.yaml", cfg)


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def snakemake(workdir, *args, configfile=None, check=True):
    """Run the workflow in `workdir` (its results and .snakemake/ stay there)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(cfg, hf_config, tokenizer, base_ckpt_dir="ckpt", train_data="data/belle.mindrecord", name="x",
           **overrides):
    """The finetune YAML lorapipe renders for a config dict (lorapipe.config.load_config's), as mf_config
    would; `overrides` replace render arguments (seq_length, parallel, device_target, ...)."""
    from lorapipe.model.architecture import position_embedding_of
    from lorapipe.train.mindformers_yaml import render_mindformers_config

    par = cfg["parallel"]
    settings = dict(seq_length=cfg["data"]["seq_length"], lora=cfg["lora"], train=cfg["train"],
                    device_target=cfg["device_target"],  # the architecture decided as the Snakefile decides it
                    position_embedding=position_embedding_of(hf_config, cfg["base_model"].get("position_embedding", "auto")),
                    parallel={k: par[k] for k in ("data_parallel", "model_parallel", "pipeline_stage",
                                                  "max_device_memory")})
    return render_mindformers_config(hf_config, tokenizer=tokenizer, base_ckpt_dir=base_ckpt_dir,
                                     train_data=train_data, name=name, **{**settings, **overrides})


@pytest.fixture
def tiny_config(tmp_path):
    return write_config(tmp_path / "config.yaml", default_config())


# MindFormers writes its logs under $LOCAL_DEFAULT_PATH (default ./output); keep them out of the repo.
os.environ.setdefault("LOCAL_DEFAULT_PATH", str(Path(tempfile.mkdtemp(prefix="lorapipe-mf-"))))

TINY_DIMS = dict(seed=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=88,
                 max_position_embeddings=128, vocab_size=600, init_std=0.02)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny HF Baichuan2 model directory, built once per test session."""
    from lorapipe.weights.tiny_base import build_tiny_base

    return build_tiny_base(SAMPLE_DATA, tmp_path_factory.mktemp("tiny_base") / "base", **TINY_DIMS)


def write_base_with_random_lora(base_dir, folder, rank, seed):
    """(base .ckpt, the same with random LoRA pairs on wq, wk, wv): what finetune's merged_ckpt holds, with
    adapters drawn from normal(0, 0.1) by a generator seeded with `seed`."""
    import numpy as np

    from lorapipe.formats.msckpt import iter_checkpoint, write_checkpoint
    from lorapipe.weights.convert import convert_hf_to_mindspore

    base = convert_hf_to_mindspore(base_dir, folder / "ckpt" / "base.ckpt")
    rng = np.random.default_rng(seed)
    entries = []
    for name, array in iter_checkpoint(base):
        entries.append((name, array))
        if name.rsplit(".", 2)[-2] in ("wq", "wk", "wv"):
            cell = name[: -len(".weight")]
            entries += [(f"{cell}.mindpet_delta_lora_a", rng.normal(0, 0.1, (rank, array.shape[1])).astype(np.float32)),
                        (f"{cell}.mindpet_delta_lora_b", rng.normal(0, 0.1, (array.shape[0], rank)).astype(np.float32))]
    lora = folder / "merged_ckpt.ckpt"
    write_checkpoint(lora, entries)
    return base, lora


# -- benchmark releases (tests/test_benchmarks.py, the workflow's eval_tasks test) -------------------------
# Small releases in the official layouts, made here: the real ones' licences keep them out of the repository.
WORDS = ["the", "value", "of", "None", "nan", "NA", "1.50", "01", "true", "x,y", '"quoted"', "  spaced ", "数学",
         "函数", "的", "是", "下列", "哪个", "正确", "🙂", "龘", "é", "\t", "a\r\nb", "____", "A.", "答案："]


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))


def write_release(root, benchmark, subjects, rows=6, dev=5, seed=0, top=None, bad=None, words=12):
    """A release in `benchmark`'s official layout under root[/top]; `bad` = (split, row, field, value)."""
    from lorapipe.infer.tasks import BENCHMARKS, LETTERS

    rng = random.Random(seed)
    b = BENCHMARKS[benchmark]
    base = root / top if top else root
    for subject in subjects:
        for split, count in (("dev", dev), (b.splits[0], rows)):
            path = base / b.file(split, subject)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                if b.header:
                    w.writerow(list(b.header) + (["explanation"] if benchmark == "ceval" and split == "dev" else []))
                for i in range(count):
                    row = [text(rng, words)] + [text(rng, max(1, words // 3)) for _ in range(4)] + [rng.choice(LETTERS)]
                    if bad and bad[:2] == (split, i):
                        row[bad[2]] = bad[3]
                    lead = [str(i)] if b.header else []
                    w.writerow(lead + row + (["why"] if benchmark == "ceval" and split == "dev" else []))
    return base if not top else root


def zip_folder(folder, path):
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder))
    return path
