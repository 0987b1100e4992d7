#!/usr/bin/env python
"""Chat with the finetuned model in the terminal, the answer streamed token by token.
/reset forgets the conversation, /quit leaves (the recipe's run_baichuan2_chat.py).

    python scripts/chat.py --config results/tiny/predict/run_baichuan2.yaml \\
        --load_checkpoint results/tiny/merged_lora/rank_0/merged_lora.ckpt
"""

import argparse
import sys

from lorapipe import cli
from lorapipe.infer.generate import TextStreamer, generate, generation_settings
from lorapipe.infer.loader import build_decoder, trained_model, use_device
from lorapipe.model.chat_template import chat_ids
from lorapipe.model.tokenizer import ChatTokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="rendered MindFormers YAML (model and generation settings)")
    p.add_argument("--load_checkpoint", required=True, help="complete checkpoint (or a folder with rank_0/)")
    p.add_argument("--vocab_file", "--tokenizer", default=None, help="tokenizer.model (default: the YAML's)")
    p.add_argument("--adapter_config", default=None,
                   help="adapter_config.json of the run that trained LoRA tensors in the checkpoint")
    p.add_argument("--use_parallel", default="False", choices=["False"], help="one device")
    p.add_argument("--auto_trans_ckpt", default="False", choices=["False", "True"],
                   help="nothing to transform for a complete checkpoint on one device")
    cli.add_generation_flags(p.add_argument_group("generation (default: the YAML's)"))
    args = p.parse_args()

    model = trained_model(args.config, args.load_checkpoint, adapter_config=args.adapter_config,
                          vocab_file=args.vocab_file)
    generation = generation_settings(model.model_config, vars(args))
    tok = ChatTokenizer(model.tokenizer)
    # the same incremental path as predict: the KV-cache decoder on the host, use_past on Ascend
    net = build_decoder(model.model_config, model.checkpoints["finetuned"], model.adapter, use_past=True,
                        device_target=use_device(model.rendered))
    history, turn = [], 0
    print("lorapipe chat: /reset forgets the conversation, /quit leaves.", flush=True)
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            break
        question = line.strip()
        if question == "/reset":
            history = []
            print("(conversation reset)", flush=True)
            continue
        if not question:
            continue
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tok, lambda text: print(text, end="", flush=True))
        new = generate(net, chat_ids(tok, question, history), tok.eos, seed=turn, on_token=streamer, **generation)
        streamer.end(new)
        print(flush=True)
        history.append((question, tok.sp.decode(new)))
        turn += 1


if __name__ == "__main__":
    cli.main_guard(main)
