"""The reference: MindFormers r1.0's research/baichuan2/belle_preprocess.py `preprocess`, ported line for
line, and a stand-in for the Baichuan2Tokenizer it calls.

The one home of the recipe's algorithm in this repository: tests/test_data.py compares lorapipe's rows
with it, and benchmarks/preprocess.py times it as "the recipe loop". It lives under tests/ because it is
a test oracle, not part of the workflow: pytest puts this folder on sys.path (conftest.py), and the
benchmark adds it.

r1.0's algorithm, per record: every `human` turn gives input [user] + ids and labels [eos] + ignore for
each id; any other `from` gives [assistant] + ids and labels [ignore] + ids; then eos/eos; the row is cut
to `seq_length` or padded (input pad_token_id, labels -100). r1.0's caller passes seq_length + 1. It
reads nothing but `conversations`, `from` and `value`: turn order, empty turns and a trailing user turn
do not matter to it, an empty `conversations` list gives an eos-only row, and a missing `from`/`value`
or a value that is not a string crashes it.
"""

import numpy as np

IGNORE_TOKEN_ID = -100
USER_PIECE, ASSISTANT_PIECE = "<reserved_106>", "<reserved_107>"


def preprocess(sources, tokenizer, seq_length, user_tokens=195, assistant_tokens=196):
    """conversation preprocess (r1.0, verbatim but for this docstring)."""
    input_ids = []
    labels = []
    for example in sources:
        input_id = []
        label = []
        for message in example["conversations"]:
            from_ = message["from"]
            value = message["value"]
            value_ids = tokenizer.encode(value, add_special_tokens=False)

            if from_ == "human":
                input_id += [user_tokens] + value_ids
                label += [tokenizer.eos_token_id] + [IGNORE_TOKEN_ID] * len(value_ids)
            else:
                input_id += [assistant_tokens] + value_ids
                label += [IGNORE_TOKEN_ID] + value_ids

        input_id.append(tokenizer.eos_token_id)
        label.append(tokenizer.eos_token_id)
        if len(input_id) > seq_length:
            input_id = input_id[: seq_length]
            label = label[: seq_length]
        else:
            input_id += [tokenizer.pad_token_id] * (seq_length - len(input_id))
            label += [IGNORE_TOKEN_ID] * (seq_length - len(label))

        input_ids.append(np.array(input_id).astype(np.int32))
        labels.append(np.array(label).astype(np.int32))

    return dict(
        input_ids=input_ids,
        labels=labels
    )


class SentencePieceTokenizer:
    """What preprocess needs of r1.0's Baichuan2Tokenizer, on a sentencepiece model: encode without
    special tokens, eos_token_id and pad_token_id (`<unk>`, id 0, as Baichuan2's tokenizer_config says).

    For text that spells no control token and no role marker this is r1.0's encoding: sentencepiece's.
    Text that does follows lorapipe's documented rule instead (docs/data.md, "Control tokens in the text are
    text"), where r1.0 made control or marker ids: `</s>`, `<s>`, `<unk>` are sentencepiece's characters
    (it never matches control pieces in a text), and each role marker is encoded as its `<` and the rest
    apart, the text between markers on its own."""

    def __init__(self, sp):
        self.sp = sp
        self.eos_token_id = sp.eos_id()
        self.pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        if not isinstance(text, str):
            raise TypeError(f"text input must be of type str, found {type(text).__name__}")  # r1.0 crashes here too
        ids = []
        while True:
            at = [(text.find(m), m) for m in (USER_PIECE, ASSISTANT_PIECE) if m in text]
            if not at:
                return ids + (self.sp.encode(text) if text else [])
            start, marker = min(at)
            if start:
                ids += self.sp.encode(text[:start])
            ids += self.sp.encode(marker[:1]) + self.sp.encode(marker[1:])
            text = text[start + len(marker):]


def recipe_rows(records, sp, seq_length, user_id, assistant_id):
    """[(input_ids, labels)] of r1.0's rows for BELLE records at lorapipe's seq_length (rows of
    seq_length + 1 tokens, as r1.0's tokenize_qa asks for)."""
    rows = preprocess(records, SentencePieceTokenizer(sp), seq_length + 1, user_id, assistant_id)
    return list(zip(rows["input_ids"], rows["labels"]))
