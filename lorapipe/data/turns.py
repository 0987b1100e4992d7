"""The turn rules: a record of one of four layouts -> its turns, and the kinds of questionable record it is.

Input: JSON or JSON Lines files in one of four layouts (FORMATS), detected per file or named:
  belle, sharegpt  {"conversations": [{"from", "value"}...], optional "system"}: one layout under the two
                   names users know it by
  alpaca           {"instruction", "input", "output", optional "history": [[q, a]...], optional "system"};
                   the user turn is instruction, plus "\\n" + input when input is not empty
  messages         {"messages": [{"role": "system"|"user"|"assistant", "content"}...]} (OpenAI)

Turns. A record becomes a list of turns, each a user or an assistant turn, in the record's order; the
row is built from each turn's own role, whatever the order (nothing assumes that turns alternate).
In the BELLE layout `from` is read as r1.0 reads it, "human" a user turn and anything else an assistant
turn ("gpt", "assistant", and names r1.0 did not know either: kind "unknown role"), with two exceptions,
both for roles whose r1.0 row would train the model to say what it must not:
  "user"    a user turn (kind "user role"). ShareGPT- and OpenAI-style files name the user so; r1.0 made
            it an assistant turn, training the model on the user's words with no user turn in the row.
  "system"  and a "system" key: system text (kind "system prompt"). r1.0 ignored the key and made the
            turn an assistant turn, training the model to produce the system prompt.
In the messages layout a role other than user/assistant/system is malformed.
System text: Baichuan2's template has no system token, so the "system" key, then each system turn, is
joined with "\\n" in front of the text of the next turn when that is a user turn, and is otherwise a user
turn of its own (the text is context, never a target). An empty system text adds nothing.

Literal `</s>`, `<s>`, `<unk>` and the role markers in the text are encoded as text, never as control or
marker ids (docs/data.md, "Control tokens in the text are text"); records containing them are counted.

Kinds of record (docs/data.md, "Which rule applies to which record"):
  malformed     what r1.0 crashes on or cannot read: not an object, no `conversations` list, a turn that
                is not an object or lacks from/value, a value that is not a string, a JSON Lines line
                that is not JSON (and the same for the other layouts). It fails the run naming file and
                index, or with on_bad_record "skip" is dropped.
  questionable  (KINDS) r1.0 trains on it as it is: an empty conversation, no assistant turn, a bad role
                order (an assistant turn first, or one role twice in a row), a trailing user turn, an
                empty or whitespace-only turn, and the role rules above. Its row is built by the rules
                above, it is counted in the stats, the first few are logged with file and index, and it
                is dropped only when data.drop names one of its kinds.
  over length   longer than a row: truncated, as r1.0 does, or dropped when data.drop names "over length".
"""

import re
from dataclasses import dataclass

from lorapipe.data.readers import InvalidLine
from lorapipe.model.tokenizer import ASSISTANT_PIECE, USER_PIECE

CONTROL_TEXTS = ("</s>", "<s>", "<unk>", USER_PIECE, ASSISTANT_PIECE)


MALFORMED = "malformed"


EMPTY_CONVERSATION, NO_ASSISTANT, BAD_ORDER, TRAILING_USER, EMPTY_TURN, UNKNOWN_ROLE, USER_ROLE, SYSTEM_PROMPT = (
    "empty conversation", "no assistant turn", "bad role order", "trailing user turn", "empty turn",
    "unknown role", "user role", "system prompt")


KINDS = (EMPTY_CONVERSATION, NO_ASSISTANT, BAD_ORDER, TRAILING_USER, EMPTY_TURN, UNKNOWN_ROLE, USER_ROLE,
         SYSTEM_PROMPT)  # questionable records; a record's drop reason is the first of its kinds data.drop names


OVER_LENGTH = "over length"


DROPPABLE = (*KINDS, OVER_LENGTH)  # what data.drop may name


DROP_REASONS = (MALFORMED, *DROPPABLE)


@dataclass(slots=True)
class Conversation:
    """One readable record: its turns (is_user[t], texts[t], system text already placed), the kinds of
    questionable record it is ({kind: detail} in KINDS order), `key` for the held-out split, and where
    it is (`file`, `index`)."""
    is_user: list
    texts: list
    kinds: dict
    key: object
    file: str
    index: int


class BadRecord(Exception):
    """Why a record is malformed: `reason` (MALFORMED) and the detail."""

    def __init__(self, reason, problem):
        super().__init__(problem)
        self.reason = reason


# A lone UTF-16 surrogate: valid JSON ("\ud800"), and Python decodes it, but it is no character, UTF-8 cannot
# encode it, and the tokenizer fails on it (sentencepiece: "List elements must be str or bytes").
_SURROGATE = re.compile("[\ud800-\udfff]")


def _string(value, where):
    if not isinstance(value, str):
        raise BadRecord(MALFORMED, f"{where} must be a string, found {type(value).__name__}")
    surrogate = _SURROGATE.search(value)
    if surrogate:
        raise BadRecord(MALFORMED, f"{where} holds an unpaired surrogate {surrogate.group()!r} at character "
                                   f"{surrogate.start()}: not text (it cannot be encoded as UTF-8)")
    return value


def _list(record, key):
    value = record.get(key)
    if value is None:
        raise BadRecord(MALFORMED, f"no '{key}' list")
    if not isinstance(value, list):
        raise BadRecord(MALFORMED, f"'{key}' must be a list, found {type(value).__name__}")
    return value


def _system(record):
    return _string(record.get("system") or "", "'system'")


# The BELLE layout's role names: r1.0 reads "human" as the user and anything else as the assistant.
BELLE_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


MESSAGES_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


_BELLE_IS_USER = {"human": True, "gpt": False, "assistant": False}  # the roles r1.0's BELLE data has


_ALTERNATING = [True, False] * 256


def _belle(record, kinds):
    roles, texts = [], []
    for j, message in enumerate(_list(record, "conversations")):
        if not isinstance(message, dict):
            raise BadRecord(MALFORMED, f"conversations[{j}] is not an object")
        for key in ("from", "value"):
            if key not in message:
                raise BadRecord(MALFORMED, f"conversations[{j}] has no '{key}'")
        role, text = message["from"], _string(message["value"], f"conversations[{j}].value")
        name = BELLE_ROLES.get(role, "assistant") if isinstance(role, str) else "assistant"
        if name == "assistant" and role not in ("gpt", "assistant") and UNKNOWN_ROLE not in kinds:
            kinds[UNKNOWN_ROLE] = f"conversations[{j}].from {role!r} is an assistant turn, as r1.0 reads it"
        elif role == "user" and USER_ROLE not in kinds:
            kinds[USER_ROLE] = f"conversations[{j}].from 'user' is a user turn (r1.0: an assistant turn)"
        elif role == "system" and SYSTEM_PROMPT not in kinds:
            kinds[SYSTEM_PROMPT] = f"conversations[{j}] is system text (r1.0: an assistant turn)"
        roles.append(name)
        texts.append(text)
    system = _system(record)
    if system and SYSTEM_PROMPT not in kinds:
        kinds[SYSTEM_PROMPT] = "a 'system' key, system text (r1.0 ignored it)"
    return roles, texts, system


def _messages(record, kinds):
    roles, texts = [], []
    for j, message in enumerate(_list(record, "messages")):
        if not isinstance(message, dict):
            raise BadRecord(MALFORMED, f"messages[{j}] is not an object")
        for key in ("role", "content"):
            if key not in message:
                raise BadRecord(MALFORMED, f"messages[{j}] has no '{key}'")
            _string(message[key], f"messages[{j}].{key}")
        if message["role"] not in MESSAGES_ROLES:
            raise BadRecord(MALFORMED, f"messages[{j}].role {message['role']!r} is not a role "
                                       f"(expected {', '.join(MESSAGES_ROLES)})")
        roles.append(message["role"])
        texts.append(message["content"])
    return roles, texts, ""


def _alpaca(record, kinds):
    for key in ("instruction", "output"):
        if key not in record:
            raise BadRecord(MALFORMED, f"no '{key}'")
    instruction = _string(record["instruction"], "'instruction'")
    extra = _string(record.get("input") or "", "'input'")
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(MALFORMED, "'history' must be a list of [question, answer] pairs")
    texts = []
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord(MALFORMED, f"history[{j}] is not a [question, answer] pair")
        texts += [_string(pair[0], f"history[{j}][0]"), _string(pair[1], f"history[{j}][1]")]
    texts += [f"{instruction}\n{extra}" if extra else instruction, _string(record["output"], "'output'")]
    return ["user", "assistant"] * (len(texts) // 2), texts, _system(record)


LAYOUTS = {"belle": _belle, "sharegpt": _belle, "alpaca": _alpaca, "messages": _messages}


def _place_system(roles, texts, system):
    """(is_user, texts) of the turns: system text (the key, then each system turn) joined with "\\n" in
    front of the next turn's text when that is a user turn, else a user turn of its own."""
    if not system and "system" not in roles:
        return [role == "user" for role in roles], texts
    pending = [system] if system else []
    is_user, out = [], []
    for role, text in zip(roles, texts):
        if role == "system":
            if text:
                pending.append(text)
            continue
        if pending:
            if role == "user":
                text = "\n".join([*pending, text])
            else:
                is_user.append(True)
                out.append("\n".join(pending))
            pending = []
        is_user.append(role == "user")
        out.append(text)
    if pending:
        is_user.append(True)
        out.append("\n".join(pending))
    return is_user, out


def _questionable(is_user, texts, kinds):
    """Add the kinds the turns make the record (KINDS; {kind: detail}); return them in KINDS order."""
    if not is_user:
        kinds[EMPTY_CONVERSATION] = "no turns: r1.0 writes an eos-only row"
    else:
        if all(is_user):
            kinds[NO_ASSISTANT] = "no assistant turn: nothing to learn but the markers and eos"
        if not is_user[0]:
            kinds[BAD_ORDER] = "turn 0 is an assistant turn"
        else:
            for j in range(1, len(is_user)):
                if is_user[j] == is_user[j - 1]:
                    kinds[BAD_ORDER] = f"turns {j - 1} and {j} are both {'user' if is_user[j] else 'assistant'} turns"
                    break
        if is_user[-1]:
            kinds[TRAILING_USER] = f"the last turn, {len(is_user) - 1}, is a user turn with no answer"
        for j, text in enumerate(texts):
            if not text.strip():
                kinds[EMPTY_TURN] = f"turn {j} ({'user' if is_user[j] else 'assistant'}) is " + (
                    "whitespace only" if text else "empty")
                break
    return {kind: kinds[kind] for kind in KINDS if kind in kinds} if kinds else kinds


def to_turns(record, data_format):
    """(is_user, texts, kinds) of one record in `data_format`: its turns, system text placed, and the
    kinds of questionable record it is ({kind: detail}, empty for most); BadRecord when malformed."""
    if type(record) is dict and data_format in ("belle", "sharegpt") and not record.get("system"):
        # the common case, fast: human/gpt/assistant turns whose values are strings
        messages = record.get("conversations")
        if type(messages) is list:
            try:
                is_user = [_BELLE_IS_USER[m["from"]] for m in messages]
                texts = [m["value"] for m in messages]
                filled = all(map(str.strip, texts))  # (TypeError for a value that is not a string)
            except (KeyError, TypeError):
                pass
            else:
                n = len(is_user)
                if not any(map(_SURROGATE.search, texts)):  # (else the full rules below say where)
                    if filled and n and not n % 2 and is_user == _ALTERNATING[:n]:
                        return is_user, texts, {}  # user first, alternating, assistant last: most records
                    return is_user, texts, _questionable(is_user, texts, {})
    if isinstance(record, InvalidLine):
        raise BadRecord(MALFORMED, record.problem)
    if not isinstance(record, dict):
        raise BadRecord(MALFORMED, f"expected an object, found a {type(record).__name__}")
    kinds = {}
    roles, texts, system = LAYOUTS[data_format](record, kinds)
    is_user, texts = _place_system(roles, texts, system)
    return is_user, texts, _questionable(is_user, texts, kinds)


def has_control_text(texts):
    joined = "\0".join(texts)
    return "<" in joined and any(t in joined for t in CONTROL_TEXTS)
