"""Preflight's trial step (issue 35) at Baichuan2-7B and 13B widths: wall time and peak RSS on this machine.

    python benchmarks/trial_step.py

Each run is preflight's check_trial_step in a process of its own: the finetune YAML that mf_config renders
from config/baichuan2_{7b,13b}_910b.yaml for a config.json at the real widths, and a MindRecord of the
sample data at seq 512 (tokenizer trained on it; the step takes ids modulo its 1024-token vocabulary).
The baseline measured in the same run is importing MindSpore and MindFormers and building the same
network with no step. Goal (issue 35): <= 3 GB and <= 60 s.
"""

import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from common import measure  # noqa: E402

WIDTHS = {"7b": (4096, 32, 11008), "13b": (5120, 40, 13696)}

CHILD = """
import sys, yaml
from lorapipe.train.trial_step import check_trial_step, trial_config
rendered = yaml.safe_load(open(sys.argv[1]))
if sys.argv[3] == "step":
    check = check_trial_step(rendered, sys.argv[2])
    assert check.status == "ok", check
else:  # the baseline: MindSpore and MindFormers imported and the one-layer network built, no step
    import os, tempfile
    from lorapipe.train.network_checks import build_network
    with tempfile.TemporaryDirectory() as d:
        yaml.safe_dump(trial_config(rendered), open(os.path.join(d, "t.yaml"), "w"))
        build_network(os.path.join(d, "t.yaml"), allocate=True)
"""


def main():
    from lorapipe.config import load_config
    from lorapipe.data.conversations import conversation_texts
    from lorapipe.data.pipeline import preprocess_conversations
    from lorapipe.train.mindformers_yaml import render_mindformers_config
    from lorapipe.weights.tiny_base import hf_config, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="trial-step-"))
    sample = REPO / "data/belle_sample.json"
    (work / "tokenizer.model").write_bytes(train_tokenizer(conversation_texts(str(sample)), 1000))
    data = work / "belle_512.mindrecord"
    preprocess_conversations(str(sample), work / "tokenizer.model", data, 512)
    print("| widths | build only: s, peak MiB | build + one step: s, peak MiB |")
    print("|---|---|---|")
    for name, (hidden, heads, ffn) in WIDTHS.items():
        cfg = load_config(REPO / f"config/baichuan2_{name}_910b.yaml")
        config_json = hf_config(hidden, 32 if name == "7b" else 40, heads, ffn, 4096, 125696,
                                "alibi" if name == "13b" else None)
        par = cfg["parallel"]
        rendered = render_mindformers_config(
            config_json, tokenizer=work / "tokenizer.model", base_ckpt_dir="ckpt", train_data=data,
            seq_length=cfg["data"]["seq_length"], name=name, lora=cfg["lora"], train=cfg["train"],
            parallel={k: par[k] for k in ("data_parallel", "model_parallel", "pipeline_stage", "max_device_memory")},
            device_target=cfg["device_target"], position_embedding="alibi" if name == "13b" else "rope")
        yaml_path = work / f"{name}.yaml"
        yaml_path.write_text(yaml.safe_dump(rendered))
        cells = [measure([sys.executable, "-c", CHILD, str(yaml_path), str(data), what]) for what in ("build", "step")]
        print(f"| Baichuan2-{name.upper()} ({hidden}, {heads} heads, {ffn}), seq 512, micro-batch "
              f"{cfg['train']['batch_size']} | " + " | ".join(f"{s:.1f} s, {rss:.0f}" for s, rss in cells) + " |")


if __name__ == "__main__":
    main()
