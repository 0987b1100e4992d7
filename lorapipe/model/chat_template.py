"""Baichuan2's chat template, in one place, in every form lorapipe writes it.

The layout (the training rows' too, lorapipe.data.rows): `<reserved_106>question<reserved_107>answer` per
turn, no separator between turns, and a prompt ends with the assistant marker, where the model answers
until eos. Baichuan2's template has no system token: a leading system message is prepended to the first
user turn followed by SYSTEM_SEPARATOR, as lorapipe.data.turns does with a record's system prompt.

* chat_ids: the prompt ids for lorapipe's own predict and chat (the markers by id, the texts encoded);
* CHAT_TEMPLATE: the same as a Jinja template, for an HF tokenizer_config.json (exports.llama) and a GGUF's
  tokenizer.chat_template (gguf_export);
* OLLAMA_TEMPLATE: the same as a Go template, for an Ollama Modelfile (gguf_export).
"""

from lorapipe.errors import InputError
from lorapipe.model.tokenizer import ASSISTANT_PIECE, ROLE_MARKER, USER_PIECE

SYSTEM_SEPARATOR = "\n"

CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '" + SYSTEM_SEPARATOR.encode("unicode_escape").decode() + "' %}"
    "{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER_PIECE + "' + (system if loop.first else '') + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT_PIECE + "' + message['content'] }}"
    "{% else %}{{ raise_exception('unexpected role ' + message['role'] + ': the chat template takes one leading "
    "system message, then user and assistant turns') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_PIECE + "' }}{% endif %}"
)

# Ollama's Go template (text/template; ollama's docs/template.md): the system prompt comes as .System or as
# a message of role system; it joins the first user turn. The prompt always ends with the assistant marker.
OLLAMA_TEMPLATE = (
    "{{- $system := .System }}{{- $first := true }}"
    "{{- range .Messages }}"
    "{{- if eq .Role \"system\" }}{{ $system = .Content }}"
    "{{- else if eq .Role \"user\" }}" + USER_PIECE + "{{ if and $first $system }}{{ $system }}"
    + SYSTEM_SEPARATOR + "{{ end }}{{ .Content }}{{ $first = false }}"
    "{{- else if eq .Role \"assistant\" }}" + ASSISTANT_PIECE + "{{ .Content }}"
    "{{- end }}{{- end }}" + ASSISTANT_PIECE
)


def chat_ids(tok, question, history=(), system=""):
    """Prompt ids for `question` after earlier (question, answer) turns, with an optional system prompt.
    A question already in the template (`<reserved_106>q<reserved_107>`, possibly several turns, as the
    recipe's --predict_data writes it) is used as it is, not wrapped twice."""
    first = True
    ids = []
    for q, a in history:
        ids += [tok.user, *tok.encode([_with_system(q, system, first)])[0], tok.assistant, *tok.encode([a])[0]]
        first = False
    parts = ROLE_MARKER.split(question)
    if len(parts) == 1:
        return ids + [tok.user, *tok.encode([_with_system(question, system, first)])[0], tok.assistant]
    if parts[0].strip() or parts[1] != USER_PIECE or parts[-2] != ASSISTANT_PIECE or parts[-1]:
        raise InputError(f"prompt {question!r}: a prompt in the chat template must start with {USER_PIECE} "
                         f"and end with {ASSISTANT_PIECE}")
    for marker, text in zip(parts[1::2], parts[2::2]):
        ids += [tok.user if marker == USER_PIECE else tok.assistant, *(tok.encode([text])[0] if text else [])]
    return ids


def _with_system(text, system, first):
    return f"{system}{SYSTEM_SEPARATOR}{text}" if system and first else text
