"""Chat template, decoding, held-out evaluation and the chat CLI."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from lorapipe.errors import InputError
from lorapipe.infer.generate import next_token
from lorapipe.model.chat_template import chat_ids
from lorapipe.model.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return ChatTokenizer(tiny_base_dir / "tokenizer.model")


def test_chat_template_matches_training_rows(tok):
    q1, a1, q2 = (tok.encode([t])[0] for t in ("Hi", "Hello!", "2+2?"))
    assert chat_ids(tok, "2+2?", [("Hi", "Hello!")]) == [tok.user, *q1, tok.assistant, *a1, tok.user, *q2,
                                                          tok.assistant]
    # The recipe's --predict_data is already in the template: used as it is, not wrapped twice.
    assert chat_ids(tok, "<reserved_106>2+2?<reserved_107>") == chat_ids(tok, "2+2?")
    assert chat_ids(tok, "<reserved_106>Hi<reserved_107>Hello!<reserved_106>2+2?<reserved_107>") == \
        chat_ids(tok, "2+2?", [("Hi", "Hello!")])
    with pytest.raises(InputError, match="must start with <reserved_106> and end with <reserved_107>"):
        chat_ids(tok, "<reserved_106>2+2?")


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

    from lorapipe.infer.loader import load_model
    from lorapipe.model.architecture import mindformers_model_config
    from lorapipe.weights.convert import convert_hf_to_mindspore

    ckpt = convert_hf_to_mindspore(tiny_base_dir, tmp_path_factory.mktemp("gen") / "base.ckpt")
    # seq_length 256: room for a prompt and 128 new tokens (rotary tables follow seq_length)
    model_config = mindformers_model_config(json.loads((tiny_base_dir / "config.json").read_text()), 256)
    return load_model(model_config, ckpt), model_config, ckpt


def test_greedy_generation_is_deterministic_and_greedy(tiny_model, tok):
    from lorapipe.infer.generate import generate
    from lorapipe.model.network import logits

    net = tiny_model[0]
    prompt = chat_ids(tok, "What is the capital of France?")
    first = generate(net, prompt, tok.eos, max_new_tokens=8)
    assert first == generate(net, prompt, tok.eos, max_new_tokens=8) and len(first) > 0
    ids = list(prompt)
    for token in first:  # each token is the argmax of the model's logits at that point
        assert token == int(np.argmax(logits(net, np.array([ids], np.int32))[0, -1]))
        ids.append(token)


NO_EOS = -1  # the tiny model is random: compare long answers without stopping at eos


def test_kv_cache_decoder_matches_the_network(tiny_model, tok):
    """The host decoder's logits equal the MindSpore network's, position by position."""
    from lorapipe.infer.loader import load_weights
    from lorapipe.model.decode import KVCacheDecoder
    from lorapipe.model.network import logits

    net, model_config, ckpt = tiny_model
    decoder = KVCacheDecoder(load_weights(model_config, ckpt), model_config)
    ids = chat_ids(tok, "What is the capital of France?") + [0, 17, 0, 5]  # pad ids too: masked as keys
    want = logits(net, np.array([ids], np.int32))[0]
    got = [decoder.forward(ids[:6])] + [decoder.forward([t]) for t in ids[6:]]
    assert np.abs(np.stack(got) - want[5:]).max() < 1e-5


@pytest.mark.parametrize("question", ["What is the capital of France?", "法国的首都是哪里？", "What is 12 plus 7?"])
def test_incremental_greedy_equals_the_full_recompute_loop(tiny_model, tok, question):
    """128 new tokens: each is the argmax of the MindSpore network's logits over everything before it,
    which is what the full-recompute loop computes (checked literally on the first 16 tokens)."""
    from lorapipe.infer.generate import generate
    from lorapipe.infer.loader import load_weights
    from lorapipe.model.decode import KVCacheDecoder
    from lorapipe.model.network import logits

    net, model_config, ckpt = tiny_model
    prompt = chat_ids(tok, question)
    new = generate(KVCacheDecoder(load_weights(model_config, ckpt), model_config), prompt, NO_EOS,
                   max_new_tokens=128)
    assert len(new) == 128
    full = logits(net, np.array([prompt + new[:-1]], np.int32))[0]
    assert [int(t) for t in full[len(prompt) - 1:].argmax(-1)] == new
    assert generate(net, prompt, NO_EOS, max_new_tokens=16) == new[:16]


def test_loading_never_drops_or_guesses_weights(tiny_model, tmp_path):
    from lorapipe.formats.msckpt import iter_checkpoint, write_checkpoint
    from lorapipe.infer.loader import load_weights

    _, model_config, ckpt = tiny_model
    base = dict(iter_checkpoint(ckpt))
    write_checkpoint(tmp_path / "extra.ckpt", [*base.items(), ("global_step", np.array([3], np.int32))])
    with pytest.raises(InputError, match="tensors the model does not have: global_step"):
        load_weights(model_config, tmp_path / "extra.ckpt")
    write_checkpoint(tmp_path / "short.ckpt", [(n, a) for n, a in base.items() if n != "lm_head.weight"])
    with pytest.raises(InputError, match="parameters it lacks: lm_head.weight"):
        load_weights(model_config, tmp_path / "short.ckpt")
    wq = "model.layers.0.attention.wq.weight"
    lora = {f"{wq[:-7]}.mindpet_delta_lora_a": np.ones((2, base[wq].shape[1]), np.float32),
            f"{wq[:-7]}.mindpet_delta_lora_b": np.ones((base[wq].shape[0], 2), np.float32)}
    write_checkpoint(tmp_path / "lora.ckpt", [*base.items(), *lora.items()])
    with pytest.raises(InputError, match="holds LoRA adapters .* pass --adapter_config"):
        load_weights(model_config, tmp_path / "lora.ckpt")
    folded = load_weights(model_config, tmp_path / "lora.ckpt", {"r": 2, "lora_alpha": 4, "scaling": 2.0})
    assert np.allclose(folded[wq], base[wq] + 2.0 * 2)  # B @ A = 2 everywhere, times alpha / r = 2


def test_heldout_loss_matches_a_direct_computation(tiny_model, tiny_base_dir, tmp_path):
    import mindspore.dataset as ds
    from conftest import SAMPLE_DATA

    from lorapipe.data.pipeline import preprocess_conversations
    from lorapipe.infer.evaluate import heldout_loss
    from lorapipe.model.network import logits

    net = tiny_model[0]
    rec = tmp_path / "e.mindrecord"
    preprocess_conversations(SAMPLE_DATA, tiny_base_dir / "tokenizer.model", rec, 32)
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

    from lorapipe.formats.mindrecord import write_mindrecord

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
    # the same incremental path as predict: its first answer is the decoder's greedy answer, streamed
    from lorapipe.infer.generate import generate
    from lorapipe.infer.loader import build_decoder

    tok = ChatTokenizer(tiny_base_dir / "tokenizer.model")
    first = generate(build_decoder(model_config, ckpt), chat_ids(tok, "Hello"), tok.eos, max_new_tokens=4,
                     repetition_penalty=model_config.get("repetition_penalty", 1.0))
    assert f"assistant> {tok.sp.decode(first)}\n" in proc.stdout


def run_recipe_predict(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "scripts/run_baichuan2.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_recipes_predict_command(tiny_model, tiny_base_dir, tmp_path):
    """Section 5.4's command as the recipe writes it: --use_parallel False --auto_trans_ckpt False, the
    tokenizer from the YAML, a prompt in the template, the answer printed."""
    import json

    import yaml

    from lorapipe.train.mindformers_yaml import render_predict_config

    _, _, ckpt = tiny_model
    hf_config = json.loads((tiny_base_dir / "config.json").read_text())
    rendered = render_predict_config(hf_config, tokenizer=tiny_base_dir / "tokenizer.model", name="tiny",
                                     generation={"max_new_tokens": 8, "do_sample": False, "top_k": 5, "top_p": 0.85,
                                                 "temperature": 1.0, "repetition_penalty": 1.05},
                                     device_target="CPU", position_embedding="rope")
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(rendered))
    recipe = ["--config", tmp_path / "predict.yaml", "--run_mode", "predict", "--use_parallel", "False",
              "--load_checkpoint", ckpt, "--auto_trans_ckpt", "False"]
    proc = run_recipe_predict(*recipe, "--predict_data", "<reserved_106>你是谁？<reserved_107>")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    tok = ChatTokenizer(tiny_base_dir / "tokenizer.model")
    assert row["prompt_tokens"] == len(chat_ids(tok, "你是谁？")) and 0 < row["new_tokens"] <= 8
    # sampling settings from the command line, reproducible with the seed
    sampled = [run_recipe_predict(*recipe, "--predict_data", "Hi", "--do_sample", "True", "--top_k", "3").stdout
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0]
    for bad, message in ((["--use_parallel", "maybe"], "invalid True/False value: 'maybe'"),
                         (["--use_parallel", "True"], "prediction runs on one device"),
                         (["--run_mode", "finetune"], "train with `snakemake finetune`")):
        proc = run_recipe_predict(*recipe, "--predict_data", "Hi", *bad)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_recipe_predict(*recipe, "--predict_data", "Hi", "--load_checkpoint", tmp_path / "none.ckpt")
    assert proc.returncode == 1 and "none.ckpt: no such checkpoint file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_system_prompt_joins_the_first_user_turn(tok):
    """The chat template's rule (lorapipe.model.chat_template), as training does with a record's system prompt."""
    from lorapipe.model.chat_template import SYSTEM_SEPARATOR

    assert chat_ids(tok, "2+2?", system="Be brief.") == chat_ids(tok, f"Be brief.{SYSTEM_SEPARATOR}2+2?")
    assert chat_ids(tok, "2+2?", [("Hi", "Hello!")], system="Be brief.") == \
        chat_ids(tok, "2+2?", [(f"Be brief.{SYSTEM_SEPARATOR}Hi", "Hello!")])
