#!/usr/bin/env python
"""Chat with the finetuned model in the terminal. /reset forgets the conversation, /quit leaves.

    python scripts/chat.py --config results/tiny/finetune/run_baichuan2_lora.yaml \
        --load_checkpoint results/tiny/merged_lora/rank_0/merged_lora.ckpt \
        --tokenizer results/tiny/tiny_base/tokenizer.model
"""

import argparse
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="rendered MindFormers YAML (model settings)")
    p.add_argument("--load_checkpoint", required=True, help="complete checkpoint (LoRA folded)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--top_p", type=float, default=0.85)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.05)
    args = p.parse_args()

    from lorapipe.data import ChatTokenizer
    from lorapipe.generate import chat_ids, generate, load_model, read_model_config

    model_config = read_model_config(args.config)
    tok = ChatTokenizer(args.tokenizer)
    net = load_model(model_config, args.load_checkpoint)
    sampling = {k: getattr(args, k) for k in ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty")}
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
        new = generate(net, chat_ids(tok, question, history), tok.eos, args.max_new_tokens, seed=turn, **sampling)
        answer = tok.sp.decode(new)
        history.append((question, answer))
        turn += 1
        print(f"assistant> {answer}", flush=True)


if __name__ == "__main__":
    main()
