"""Chat messages to a prompt: the checkpoint's chat template when it has one, a documented default otherwise.

The template is `chat_template` of the checkpoint's `tokenizer_config.json` (a Jinja string, as Hugging Face
tokenizers keep it), rendered in Jinja's sandbox with `messages`, `add_generation_prompt=True`, `bos_token` and
`eos_token`. Without one, each message becomes `<|im_start|>{role}\\n{content}<|im_end|>\\n` and the prompt ends with
`<|im_start|>assistant\\n` (ChatML).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from k2_workers.serve.openai_request import Message

TOKENIZER_CONFIG = "tokenizer_config.json"


def load_chat_template(checkpoint_dir: str | Path | None) -> str | None:
    """The checkpoint's chat template, or None when it has none (or no checkpoint)."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / TOKENIZER_CONFIG
    if not path.is_file():
        return None
    template = json.loads(path.read_text()).get("chat_template")
    if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def default_chat_prompt(messages: Sequence[Message]) -> str:
    """ChatML: what a checkpoint without a chat template gets."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def render_chat(messages: Sequence[Message], template: str | None, bos_token: str = "", eos_token: str = "") -> str:
    """The prompt of `messages`; a ValueError (400) when the template refuses them (e.g. `raise_exception`)."""
    if template is None:
        return default_chat_prompt(messages)
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"messages: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as error:
        raise ValueError(f"messages: the chat template failed: {error}") from None
