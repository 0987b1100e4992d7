"""The Baichuan2 tokenizer as lorapipe uses it: sentencepiece plus the role markers' ids.

The role markers' ids are looked up by piece. Data, prompts and the exports' tokenizers all go through
it, so the text in a record or a prompt is encoded one way everywhere."""

import os
import re
from pathlib import Path

from lorapipe.errors import InputError

# The chat template's turn markers (looked up by piece in the tokenizer; 195/196 in Baichuan2's).
USER_PIECE = "<reserved_106>"
ASSISTANT_PIECE = "<reserved_107>"

# The role markers are user-defined pieces: sentencepiece matches them anywhere in a text.
ROLE_MARKER = re.compile(f"({re.escape(USER_PIECE)}|{re.escape(ASSISTANT_PIECE)})")


class ChatTokenizer:
    """A sentencepiece model plus the ids the row layout needs, looked up by piece."""

    def __init__(self, model_file):
        import sentencepiece as spm

        if not Path(model_file).is_file():
            raise InputError(f"{model_file}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise InputError(f"{model_file}: not a sentencepiece model ({e})") from None
        self.user, self.assistant = (self._id(model_file, p) for p in (USER_PIECE, ASSISTANT_PIECE))
        self.eos = self.sp.eos_id()
        if self.eos < 0:
            raise InputError(f"{model_file}: the tokenizer has no eos piece")

    def _id(self, model_file, piece):
        token = self.sp.piece_to_id(piece)
        if token == self.sp.unk_id() or self.sp.id_to_piece(token) != piece:
            raise InputError(f"{model_file}: the tokenizer has no piece {piece!r}")
        return token

    def encode(self, texts, num_threads=None):
        """Token ids of each text, without BOS/EOS. sentencepiece encodes `</s>` in a text as the
        characters `<`, `/`, `s`, `>`, never as the eos id; the role markers, which it would match, are
        encoded as their characters too (_with_markers_as_text): data cannot inject control tokens."""
        texts = list(texts)
        ids = self.sp.encode(texts, num_threads=num_threads or os.cpu_count() or 1)
        for i, text in enumerate(texts):
            if USER_PIECE in text or ASSISTANT_PIECE in text:
                ids[i] = self._with_markers_as_text(text)
        return ids

    def _with_markers_as_text(self, text):
        """A marker's `<` and the rest are encoded apart, so that no piece spans them; the text around
        it is encoded as it would be on its own."""
        ids = []
        for part in ROLE_MARKER.split(text):
            if part in (USER_PIECE, ASSISTANT_PIECE):
                ids += self.sp.encode(part[:1]) + self.sp.encode(part[1:])
            elif part:
                ids += self.sp.encode(part)
        return ids
