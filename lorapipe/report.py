"""Figures and tables for `snakemake --report`: loss curve, data statistics, evaluation, predictions."""

import base64
import csv
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lorapipe.formats.checkpoint_file import SUFFIXES, checkpoint_files, checkpoint_index
from lorapipe.model.baichuan2 import LORA_A, LORA_B
from lorapipe.train.losslog import read_loss_tsv
from lorapipe.train.mindformers_yaml import read_mindformers_yaml


def plot_loss(loss_tsv, png):
    rows = read_loss_tsv(loss_tsv)
    steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=1, label="loss (rank 0)")
    window = max(1, len(loss) // 10)
    if len(loss) > window > 1:
        smooth = [sum(loss[i - window + 1:i + 1]) / window for i in range(window - 1, len(loss))]
        ax.plot(steps[window - 1:], smooth, lw=2, label=f"mean of {window} steps")
    ax.set(xlabel="step", ylabel="training loss", title="LoRA finetune")
    _save(fig, ax, png)


def plot_lengths(stats_json, png):
    stats = json.loads(Path(stats_json).read_text())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split in ("train", "heldout"):
        hist = stats.get(split, {}).get("length_histogram")
        if hist:
            edges, counts = hist["edges"], hist["counts"]
            ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
                   alpha=0.6, label=split)
    ax.axvline(stats["seq_length"] + 1, color="k", ls="--", label="row length (longer: truncated)")
    ax.set(xlabel="tokens per conversation", ylabel="conversations", title="Token lengths")
    _save(fig, ax, png)


def plot_subject_deltas(task_json, png):
    """One bar per subject: finetuned minus base accuracy, sorted, coloured by lm-eval group."""
    result = json.loads(Path(task_json).read_text(encoding="utf-8"))
    subjects = sorted(result["subjects"].items(), key=lambda kv: kv[1].get("delta", 0.0))
    groups = sorted({v["group"] for _, v in subjects})
    colours = {g: plt.get_cmap("tab10")(i) for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.16 * len(subjects) + 1)))
    for g in groups:
        rows = [(i, v) for i, (_, v) in enumerate(subjects) if v["group"] == g]
        ax.barh([i for i, _ in rows], [100 * v.get("delta", 0.0) for _, v in rows], color=colours[g], label=g)
    ax.set_yticks(range(len(subjects)), [name for name, _ in subjects], fontsize=6)
    ax.axvline(0, color="k", lw=0.8)
    overall = result["overall"]
    ax.set(xlabel="accuracy, finetuned - base (points)", ylim=(-1, len(subjects)),
           title=f"{result['title']} {result['split']}, {result['shots']}-shot: {100 * overall.get('delta', 0):+.1f} "
                 f"points overall ({overall['questions']} questions)")
    _save(fig, ax, png)


def _save(fig, ax, png):
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>"


def _image(png, alt):
    """A PNG inside the page (a data URI): summary.html is one file to open or send."""
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(Path(png).read_bytes()).decode()}'>"


def _percent(x):
    return "" if x is None else f"{100 * x:.1f}"


def task_table(task_json):
    """A benchmark's accuracy, base / finetuned / difference, overall and per lm-eval group."""
    result = json.loads(Path(task_json).read_text(encoding="utf-8"))
    parts = [("overall", result["overall"])] + (list(result["groups"].items()) if len(result["groups"]) > 1 else [])
    skipped = f"; {len(result['skipped'])} malformed rows skipped" if result["skipped"] else ""
    return (f"<h3>{html.escape(result['title'])} ({result['split']}, {result['shots']}-shot)</h3>"
            + _table(["", "questions", "base %", "finetuned %", "Δ points"],
                     [[name, v["questions"], _percent(v.get("base")), _percent(v.get("finetuned")),
                       "" if "delta" not in v else f"{100 * v['delta']:+.1f}"] for name, v in parts])
            + f"<p>Scored as lm-evaluation-harness 0.4.x scores {result['lm_eval_group']}; "
              f"{result['truncated_prompts']} prompts cut at the left to {result['max_length']} tokens{skipped}.</p>")


def summary_html(metrics_json, stats_json, predictions_jsonl, out_html, figures=(), tasks=()):
    """The page a user opens: the evaluation and data tables, the benchmarks' tables (`tasks`: their JSON
    results), the sample predictions, and `figures` [(png, caption)] embedded."""
    metrics = json.loads(Path(metrics_json).read_text())
    stats = json.loads(Path(stats_json).read_text())
    predictions = [json.loads(line) for line in Path(predictions_jsonl).read_text().splitlines()]
    parts = [
        "<h2>Held-out evaluation</h2>",
        _table(["model", "loss", "perplexity", "tokens", "samples"],
               [[m, f"{v['loss']:.4f}", f"{v['perplexity']:.2f}", v["tokens"], v["samples"]]
                for m, v in metrics.items()]),
        *(["<h2>Benchmarks</h2>", *map(task_table, tasks)] if tasks else []),
        "<h2>Data</h2>",
        _table(["split", "samples", "tokens", "label tokens", "truncated", "mean length", "max length"],
               [[s, stats[s]["samples"], stats[s]["tokens"], stats[s]["label_tokens"],
                 f"{stats[s]['truncated']} ({100 * stats[s]['truncated_ratio']:.1f}%)", stats[s]["length_mean"],
                 stats[s]["length_max"]] for s in ("train", "heldout") if s in stats])
        + f"<p>{stats['skipped']} bad records skipped; rows of {stats['seq_length'] + 1} tokens.</p>",
        *(f"<h2>{html.escape(caption)}</h2>{_image(png, caption)}" for png, caption in figures),
        "<h2>Sample predictions</h2>",
        _table(["prompt", "model", "response", "new tokens"],
               [[p["prompt"], p["model"], p["response"], p["new_tokens"]] for p in predictions]),
    ]
    Path(out_html).write_text("<html><meta charset='utf-8'><body>" + "\n".join(parts) + "</body></html>\n",
                              encoding="utf-8")


# What the end-of-run summary points at: (path under results, what it is), listed where it exists; {suffix}
# stands for the checkpoint format's (checkpoint.format: .ckpt or .safetensors).
RUN_OUTPUTS = [
    ("merged_lora/rank_0/merged_lora{suffix}", "the finetuned model, LoRA folded (merged_ckpt/ holds it unfolded)"),
    ("hf_llama", "for transformers and vLLM (hf/: Baichuan2's own layout, with its remote code)"),
    ("peft_adapter", "the LoRA adapter for PEFT, on hf_llama_base/"),
    ("gguf", "for llama.cpp and Ollama (ollama create <name> -f gguf/Modelfile)"),
    ("predict/predictions.jsonl", "finetuned and base answers to predict.prompts"),
    ("report/summary.html", "the report: loss, data, evaluation, predictions"),
]


def run_summary(results, tasks=()):
    """The lines a successful run ends with: where the finetuned model, the exports and the report are, and
    the held-out loss, base -> finetuned, and the accuracy of each benchmark in `tasks`."""
    results = Path(results)
    lines = [f"lorapipe: done; in {results}/:"]
    lines += [f"  {path:42} {what}" for pattern, what in RUN_OUTPUTS
              for path in dict.fromkeys(pattern.format(suffix=s) for s in SUFFIXES) if (results / path).exists()]
    metrics = results / "evaluate" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        if {"base", "finetuned"} <= set(m):
            lines.append(f"  held-out loss {m['base']['loss']:.3f} (base) -> {m['finetuned']['loss']:.3f} (finetuned), "
                         f"perplexity {m['base']['perplexity']:.1f} -> {m['finetuned']['perplexity']:.1f}")
    for task in tasks:  # the configured benchmarks (evaluate.tasks)
        path = results / "evaluate" / f"{task}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text(encoding="utf-8"))
        o = r["overall"]
        if "delta" in o:
            lines.append(f"  {r['title']} {r['split']} {r['shots']}-shot accuracy {100 * o['base']:.1f}% (base) -> "
                         f"{100 * o['finetuned']:.1f}% (finetuned), {100 * o['delta']:+.1f} points over "
                         f"{o['questions']} questions")
    return "\n".join(lines)


# -- experiments compared side by side (snakemake compare) ------------------------------------------------

def experiment_row(name, results, tasks=()):
    """One experiment's figures: held-out loss and perplexity, the benchmarks' accuracy, trainable parameters,
    training wall time and tokens per second (padded rows and real tokens), and checkpoint bytes."""
    results = Path(results)
    metrics = json.loads((results / "evaluate/metrics.json").read_text())
    rendered = read_mindformers_yaml(results / "finetune/run_baichuan2_lora.yaml")
    steps = len(read_loss_tsv(results / "finetune/loss.tsv"))
    rows_per_step = rendered["runner_config"]["batch_size"] * rendered["parallel_config"]["data_parallel"]
    seq = rendered["model"]["model_config"]["seq_length"]
    # the data's statistics beside its MindRecord: tokens of the conversations themselves, without padding
    stats = json.loads((Path(rendered["train_dataset"]["data_loader"]["dataset_dir"]).parent
                        / f"belle_{seq}.stats.json").read_text())
    real_tokens = stats["train"]["tokens"] * rendered["runner_config"]["epochs"]
    trainable = sum(math.prod(shape) for ckpt in checkpoint_files(results / "filter_out/rank_0")
                    for name, _, shape in checkpoint_index(ckpt) if name.endswith((LORA_A, LORA_B)))
    bench = results / "benchmarks/finetune.tsv"  # Snakemake's record of the finetune job
    wall = float(next(csv.DictReader(bench.open(), delimiter="\t"))["s"]) if bench.is_file() else None
    row = {"experiment": name, "heldout_loss_base": metrics["base"]["loss"],
           "heldout_loss": metrics["finetuned"]["loss"], "perplexity": metrics["finetuned"]["perplexity"]}
    for task in tasks:
        result = json.loads((results / "evaluate" / f"{task}.json").read_text())["overall"]
        row[f"{task}_accuracy"], row[f"{task}_delta"] = result.get("finetuned"), result.get("delta")
    ckpt_bytes = sum(f.stat().st_size for rank in (results / "finetune/checkpoint_network").glob("rank_*")
                     for f in checkpoint_files(rank))
    row |= {"trainable_parameters": trainable, "steps": steps, "train_seconds": wall,
            "tokens_per_s": steps * rows_per_step * seq / wall if wall else None,
            "real_tokens_per_s": real_tokens / wall if wall else None,
            "checkpoint_bytes": ckpt_bytes}
    return row


def plot_loss_curves(named_loss_tsvs, png):
    """The experiments' training loss curves on one plot."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, tsv in named_loss_tsvs.items():
        rows = read_loss_tsv(tsv)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=name)
    ax.set(xlabel="step", ylabel="training loss (rank 0)", title="Experiments")
    _save(fig, ax, png)


def compare_experiments(experiments, out_csv, out_html, out_png):
    """The table (CSV and HTML, one row per experiment) and the loss curves of `experiments`
    {name: (results folder, [benchmark task names])}."""
    rows = [experiment_row(name, results, tasks) for name, (results, tasks) in experiments.items()]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_loss_curves({name: Path(results) / "finetune/loss.tsv" for name, (results, _) in experiments.items()}, out_png)

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else value)

    page = _table(columns, [[cell(row.get(c)) for c in columns] for row in rows]) + _image(out_png, "loss curves")
    Path(out_html).write_text("<html><meta charset='utf-8'><body><h2>Experiments</h2>" + page + "</body></html>\n",
                              encoding="utf-8")
    return rows
