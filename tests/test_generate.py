"""Chat template, decoding, held-out evaluation and the chat CLI."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from lorapipe.data import ChatTokenizer
from lorapipe.generate import chat_ids, next_token


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return ChatTokenizer(tiny_base_dir / "tokenizer.model")


def test_chat_template_matches_training_rows(tok):
    q1, a1, q2 = (tok.encode([t])[0] for t in ("Hi", "Hello!", "2+2?"))
    assert chat_ids(tok, "2+2?", [("Hi", "Hello!")]) == [tok.user, *q1, tok.assistant, *a1, tok.user, *q2,
                                                          tok.assistant]


def test_next_token_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    assert next_token(logits, [], rng) == 1
    assert next_token(logits, [1], rng, repetition_penalty=2.0) == 2  # 3/2 < 2
    assert next_token(np.array([-1.0, -1.5]), [0], rng, repetition_penalty=2.0) == 1  # -2 < -1.5
    assert {next_token(logits, [], rng, do_sample=True, top_k=1) for _ in range(20)} == {1}
    assert {next_token(logits, [], rng, do_sample=True, top_p=0.5) for _ in range(20)} == {1}
    draws = {next_token(logits, [], rng, do_sample=True, top_k=2) for _ in range(200)}
    assert draws == {1, 2}
    same = [next_token(logits, [], np.random.default_rng(7), do_sample=True) for _ in range(2)]
    assert same[0] == same[1]


@pytest.fixture(scope="module")
def tiny_model(tiny_base_dir, tmp_path_factory):
    import json

    from lorapipe.generate import load_model
    from lorapipe.spec import llama_config
    from lorapipe.weights import convert_hf_to_mindspore

    ckpt = convert_hf_to_mindspore(tiny_base_dir, tmp_path_factory.mktemp("gen") / "base.ckpt")
    model_config = llama_config(json.loads((tiny_base_dir / "config.json").read_text()), 128)
    return load_model(model_config, ckpt), model_config, ckpt


def test_greedy_generation_is_deterministic_and_greedy(tiny_model, tok):
    from lorapipe.generate import generate
    from lorapipe.model import logits

    net = tiny_model[0]
    prompt = chat_ids(tok, "What is the capital of France?")
    first = generate(net, prompt, tok.eos, max_new_tokens=8)
    assert first == generate(net, prompt, tok.eos, max_new_tokens=8) and len(first) > 0
    ids = list(prompt)
    for token in first:  # each token is the argmax of the model's logits at that point
        assert token == int(np.argmax(logits(net, np.array([ids], np.int32))[0, -1]))
        ids.append(token)


def test_heldout_loss_matches_a_direct_computation(tiny_model, tiny_base_dir, tmp_path):
    from conftest import SAMPLE_DATA
    from lorapipe.data import preprocess_belle
    from lorapipe.generate import heldout_loss
    from lorapipe.model import logits
    import mindspore.dataset as ds

    net = tiny_model[0]
    rec = tmp_path / "e.mindrecord"
    preprocess_belle(SAMPLE_DATA, tiny_base_dir / "tokenizer.model", rec, 32)
    got = heldout_loss(net, rec, batch_size=16)
    row = next(ds.MindDataset(str(rec), shuffle=False).create_dict_iterator(output_numpy=True))
    assert got["samples"] == 324 and got["tokens"] > 0 and np.isclose(got["perplexity"], np.exp(got["loss"]))
    # One row by hand: -log p(label[t+1] | input[:t+1]) over unmasked positions.
    out = logits(net, row["input_ids"][None, :-1])[0].astype(np.float64)
    nll = [np.log(np.exp(out[t] - out[t].max()).sum()) + out[t].max() - out[t, row["labels"][t + 1]]
           for t in range(32) if row["labels"][t + 1] != -100 and row["input_ids"][t] != 0]
    single = heldout_loss(net, _one_row(rec, tmp_path), batch_size=1)
    assert np.isclose(single["loss"], np.mean(nll)) and single["tokens"] == len(nll)


def _one_row(rec, tmp_path):
    import mindspore.dataset as ds
    from lorapipe.data import write_mindrecord

    row = next(ds.MindDataset(str(rec), shuffle=False).create_dict_iterator(output_numpy=True))
    write_mindrecord(tmp_path / "one.mindrecord", [(row["input_ids"], row["labels"], 0)])
    return tmp_path / "one.mindrecord"


def test_chat_cli(tiny_model, tiny_base_dir, tmp_path):
    import yaml

    _, model_config, ckpt = tiny_model
    (tmp_path / "mf.yaml").write_text(yaml.safe_dump({"model": {"model_config": model_config}}))
    proc = subprocess.run([sys.executable, str(REPO / "scripts/chat.py"), "--config", str(tmp_path / "mf.yaml"),
                           "--load_checkpoint", str(ckpt), "--tokenizer", str(tiny_base_dir / "tokenizer.model"),
                           "--max_new_tokens", "4"], input="Hello\n/reset\nHi again\n/quit\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant> ") == 2 and "(conversation reset)" in proc.stdout
