"""BELLE chat data: reading conversations and the deterministic held-out split."""

import hashlib
import json
from pathlib import Path


def load_conversations(path):
    """The records of one BELLE chat JSON file (a JSON array of {id, conversations})."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def conversation_texts(path):
    """Every message text of a BELLE file, in file order (tokenizer training input)."""
    return [m["value"] for r in load_conversations(path) for m in r["conversations"] if m["value"]]


def is_heldout(record_id, fraction, seed):
    """Whether a conversation belongs to the held-out split.

    Decided by a hash of (seed, id), not by position: adding, removing or reordering other records
    never moves a conversation between train and held-out.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
