import json
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import REPO, SAMPLE_DATA

from lorapipe.digests import sha256_file
from lorapipe.errors import InputError
from lorapipe.provenance import Run, trace, verify
from lorapipe.weights.tiny_base import FILES, build_tiny_base

DIMS = dict(seed=0, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, vocab_size=600, init_std=0.02)


@pytest.fixture
def built(tmp_path):
    base = build_tiny_base(SAMPLE_DATA, tmp_path / "base", run=Run("tiny_base", DIMS), **DIMS)
    return base, base / "pytorch_model.bin.manifest.json"


def test_manifest_records_what_made_the_artifact(built):
    base, manifest_path = built
    m = json.loads(manifest_path.read_text())
    assert m["rule"] == "tiny_base" and m["params"] == DIMS
    assert set(m["outputs"]) == set(FILES)
    for name, entry in m["outputs"].items():
        assert entry["sha256"] == sha256_file(base / name)
        assert entry["bytes"] == (base / name).stat().st_size
    (data_rel, data_entry), = m["inputs"].items()
    assert (manifest_path.parent / data_rel).resolve() == SAMPLE_DATA.resolve()
    assert data_entry["sha256"] == sha256_file(SAMPLE_DATA) and "manifest" not in data_entry
    assert set(m["packages"]) >= {"mindspore", "mindformers", "torch", "transformers", "snakemake"}
    # the installed pair (envs/requirements*.txt), whichever it is
    assert m["packages"]["mindspore"] == metadata.version("mindspore")
    assert m["packages"]["mindformers"] == metadata.version("mindformers")
    assert len(m["git"]["commit"]) == 40 and isinstance(m["git"]["dirty"], bool)
    assert m["device_target"] == "CPU" and m["peak_rss_mb"] > 0 and m["wall_seconds"] > 0


def test_a_changed_input_stops_the_step_that_reads_it(built, tmp_path):
    """An artifact that no longer holds the bytes its manifest records (bit rot keeps its size and
    mtime) is refused by the next step, which writes nothing."""
    import os

    base, _ = built
    weights = base / "pytorch_model.bin"
    before = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    step = ("import sys; from lorapipe.outputs import atomic_outputs; from lorapipe.provenance import Run\n"
            "with atomic_outputs([sys.argv[1]], run=Run('next', {}), inputs=[sys.argv[2]]) as (tmp,):\n"
            "    tmp.write_text('made from a corrupt input')")
    proc = subprocess.run([sys.executable, "-c", step, str(tmp_path / "out.txt"), str(weights)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "pytorch_model.bin: changed since the tiny_base step wrote it" in proc.stderr
    assert not (tmp_path / "out.txt").exists() and not list(tmp_path.glob(".lorapipe-tmp-*"))


def test_trace_and_verify_catch_a_modified_file(built):
    base, manifest_path = built
    steps = trace(base / "tokenizer.model")
    assert [(d, p, m["rule"]) for d, p, m in steps] == [(0, manifest_path, "tiny_base")]
    assert verify(steps) == []
    with open(base / "pytorch_model.bin", "r+b") as f:
        f.write(b"X")
    assert verify(steps) == [(base / "pytorch_model.bin", "changed since tiny_base recorded it")]
    cli = subprocess.run([sys.executable, str(REPO / "scripts/provenance.py"), str(base / "config.json"),
                          "--verify"], capture_output=True, text=True)
    assert cli.returncode == 1 and "CHANGED" in cli.stdout and "pytorch_model.bin" in cli.stdout


def test_trace_of_a_file_no_step_made(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(InputError, match="no lorapipe manifest lists this file"):
        trace(tmp_path / "x")


def test_same_config_same_bytes_in_two_folders(tmp_path):
    """tiny base, tokenizer, converted checkpoint and MindRecords are byte-identical across runs."""
    from conftest import default_config, snakemake, write_config

    runs = []
    for name in ("one", "two"):
        workdir = tmp_path / name
        workdir.mkdir()
        snakemake(workdir, "--cores", "2", "ckpt", "mindrecord",
                  configfile=write_config(workdir / "c.yaml", default_config()))
        runs.append(workdir / "results/tiny")
    artifacts = ["tiny_base/pytorch_model.bin", "tiny_base/tokenizer.model", "tiny_base/config.json",
                 "ckpt/rank_0/baichuan2_tiny.ckpt", "data/belle_64.mindrecord", "data/belle_64.mindrecord.db",
                 "data/belle_64_heldout.mindrecord", "data/belle_64_heldout.mindrecord.db",
                 "data/belle_64.stats.json"]
    for artifact in artifacts:
        assert (runs[0] / artifact).read_bytes() == (runs[1] / artifact).read_bytes(), artifact
        manifest = json.loads(next((runs[0] / artifact).parent.glob("*.manifest.json")).read_text())
        assert manifest["deterministic"] is True
