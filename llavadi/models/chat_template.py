"""The Jinja chat template saved with every llavadi model: llavadi's own prompt, for transformers users.

`processor.apply_chat_template(messages)` (and the tokenizer's) then renders exactly the text
llavadi trains and evaluates with (`llavadi.data.templates`: template + the run's system prompt),
so transformers pipelines, vLLM's chat API or lmms-eval's `llava_hf` prompt a student as it was
trained. Messages follow transformers' form: `content` is a string (which may hold `<image>`) or
a list of `{"type": "image"}` / `{"type": "text", "text": ...}` items, joined by a newline (an
image then a question renders LLaVA's `<image>\\n{question}`). A `system` message replaces the
run's system prompt. Assistant text is wrapped in `{% generation %}`, so
`return_assistant_tokens_mask=True` marks the tokens llavadi trains on.
"""

from __future__ import annotations

from llavadi.data.templates import IMAGE_PLACEHOLDER, LLAVA_SYSTEM

_CONTENT_MACRO = (
    "{%- macro llavadi_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- elif item['type'] == 'image' -%}{{- IMAGE -}}"
    "{%- else -%}{{- raise_exception('this model reads text and image content only, got ' ~ item['type']) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

_VICUNA_V1 = (
    "{{- BOS -}}"
    "{%- set ns = namespace(system=SYSTEM, start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = llavadi_content(messages[0]['content']) -%}{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{%- if ns.system -%}{{- ns.system ~ ' ' -}}{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user (after an optional system)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' ~ llavadi_content(message['content']) -}}"
    "{%- if not loop.last or add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
    "{%- else -%}"
    "{%- generation -%}{{- ' ' ~ llavadi_content(message['content']) ~ EOS -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA's projector-pretraining form: the image (if the user turn has one), then the caption + eos
_PLAIN = (
    "{{- BOS -}}"
    "{%- if not messages or messages|length > 2 or messages[0]['role'] != 'user' "
    "or (messages|length == 2 and messages[1]['role'] != 'assistant') -%}"
    "{{- raise_exception('the plain template takes one user message, then optionally one assistant message') -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(image=false) -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.image = IMAGE in messages[0]['content'] -%}"
    "{%- else -%}{%- for item in messages[0]['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.image = true -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if ns.image -%}{{- IMAGE -}}{%- endif -%}"
    "{%- if messages|length == 2 -%}"
    "{%- generation -%}{{- llavadi_content(messages[1]['content']) ~ EOS -}}{%- endgeneration -%}"
    "{%- endif -%}"
)

_BODIES = {"vicuna_v1": _VICUNA_V1, "plain": _PLAIN}


class ChatTemplateError(ValueError):
    """No chat template can render llavadi's prompt for this tokenizer exactly."""


def jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal (any character, escaped)."""
    out = []
    for ch in text:
        if ch in "\\'":
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "'" + "".join(out) + "'"


def _leading_special_text(tokenizer) -> str:
    """The text of what the tokenizer adds before every text ('' or its BOS), which a template must write."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None:
        raise ChatTemplateError("the tokenizer's special tokens change how plain text is tokenized")
    prefix, suffix = full[:start], full[start + len(plain):]
    if suffix or (prefix and prefix != [tokenizer.bos_token_id]):
        added = tokenizer.convert_ids_to_tokens(prefix + suffix)
        raise ChatTemplateError(
            f"the tokenizer adds {added} around every text; llavadi writes chat templates for tokenizers "
            "that add at most a BOS token in front")
    return tokenizer.bos_token if prefix else ""


def llavadi_chat_template(template: str, system: str | None, tokenizer) -> str | None:
    """The Jinja chat template that renders llavadi's `template` (with `system`; None = the template's default).

    `chat_template` (the tokenizer's own) is returned as it is (None when the tokenizer has none).
    """
    if template == "chat_template":
        return getattr(tokenizer, "chat_template", None)
    if template not in _BODIES:
        raise ChatTemplateError(f"no chat template for conversation template {template!r}")
    constants = {
        "BOS": jinja_literal(_leading_special_text(tokenizer)),
        "EOS": jinja_literal(tokenizer.eos_token or "</s>"),
        "IMAGE": jinja_literal(IMAGE_PLACEHOLDER),
        "SYSTEM": jinja_literal(LLAVA_SYSTEM if system is None else system),
    }
    header = "".join(f"{{%- set {name} = {value} -%}}" for name, value in constants.items())
    return header + _CONTENT_MACRO + _BODIES[template]
