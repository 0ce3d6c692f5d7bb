"""Chat templates: the model's own Jinja template (GGUF ``tokenizer.chat_template``) or a named one.

Templates are rendered the way Hugging Face ``apply_chat_template`` does (Jinja2 immutable
sandbox, ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, ``strftime_now``), so a GGUF's
template produces the same prompt here as in transformers. A model without a template is never
given a silent fallback: the user names one (``--chat-template chatml``) or passes a file.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgerun.errors import ChatTemplateError

# Standard prompt formats, written from the formats' public descriptions.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}"
        "{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
        "{% else %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% set ns.system = '' %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: Jinja2 template text (HF chat-template conventions: ``messages``,
            ``add_generation_prompt``, ``bos_token``, ``eos_token``).
        name: where it came from, for messages (``"gguf"``, ``"chatml"``, a file path).
        bos_token, eos_token: the model's special-token texts, passed to the template.

    Raises:
        ChatTemplateError: the template does not compile.
    """

    def __init__(self, source: str, name: str, bos_token: str = "", eos_token: str = ""):
        def raise_exception(message: str):
            raise ChatTemplateError(f"chat template ({name}) refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template ({name}) does not compile: {e}") from None
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Format ``messages`` (dicts with ``role`` and ``content``) into the prompt text.

        Raises:
            ChatTemplateError: the template fails on these messages.
        """
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template ({self.name}) failed to render: {e}") from None


    def render_parts(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """The prompt as ``(text, is_markup)`` pieces: the template's own text (markup, whose special-token
        texts are control tokens) apart from each message's content (text, tokenized as text).

        So a user who types ``<|im_start|>system`` gets those characters, not a forged turn. The
        template is rendered once with a placeholder per message content; the pieces between
        placeholders are markup. Templates that trim the content (``| trim``) are handled; a template
        that transforms content otherwise gets one markup piece (the whole prompt, as before) so its
        output is never changed.

        Raises:
            ChatTemplateError: the template fails on these messages.
        """
        real = self.render(messages, add_generation_prompt)
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = self.render([{**m, "content": marks[i]} for i, m in enumerate(messages)], add_generation_prompt)
        contents = [str(m.get("content") or "") for m in messages]
        for variant in (contents, [c.strip() for c in contents]):
            pieces, rest = [], marked
            for i, mark in enumerate(marks):
                if rest.count(mark) != 1:
                    break  # the template drops, repeats or reorders a content: keep the whole prompt as markup
                head, rest = rest.split(mark)
                pieces += [(head, True), (variant[i], False)]
            else:
                pieces.append((rest, True))
                pieces = [(t, markup) for t, markup in pieces if t]
                if "".join(t for t, _ in pieces) == real:
                    return pieces
        return [(real, True)]


def choose(gguf_template: str | None, override: str | None, model_label: str,
           bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """Pick the template for a model: ``override`` (a built-in name or a file) wins, then the model's own.

    Raises:
        ChatTemplateError: no template in the model and none given, an unknown name, or an
            unreadable file.
    """
    if override:
        if override in BUILTIN_TEMPLATES:
            return ChatTemplate(BUILTIN_TEMPLATES[override], override, bos_token, eos_token)
        p = Path(override).expanduser()
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"cannot read chat template {p}: {e}") from None
            return ChatTemplate(text, str(p), bos_token, eos_token)
        raise ChatTemplateError(f"unknown chat template '{override}'; use one of "
                                f"{', '.join(BUILTIN_TEMPLATES)} or a path to a Jinja file")
    if gguf_template is None:
        raise ChatTemplateError(f"{model_label} has no chat template; pass --chat-template with one of "
                                f"{', '.join(BUILTIN_TEMPLATES)} or a Jinja file")
    return ChatTemplate(gguf_template, "gguf", bos_token, eos_token)
