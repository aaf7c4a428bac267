"""The parameters of a generate request, and the parsing of its HTTP body: pure, no torch, every error names the
field."""

from __future__ import annotations

import json
from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_MAX_PROMPT_TOKENS = 8192
DEFAULT_PREFILL_CHUNK_TOKENS = 512  # prompt tokens per prefill forward: bounds prefill attention and logits memory
FIELDS = frozenset({"prompt", "max_new_tokens", "temperature", "seed", "top_k"})


class RequestError(ValueError):
    """A bad request; the HTTP layer answers 400 with this message."""


@dataclass(frozen=True)
class GenerateParams:
    """How one request decodes: greedy when `temperature` is 0, else sampled with its own generator seeded by
    `seed`, from the `top_k` most likely tokens when set and from the smallest set of tokens whose probability
    reaches `top_p` when set (nucleus sampling)."""

    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    top_k: int | None = None
    top_p: float | None = None


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    params: GenerateParams


def parse_generate(body: bytes, max_new_tokens_limit: int) -> GenerateRequest:
    """`{"prompt": str, "max_new_tokens": int = 16, "temperature": float = 0, "seed": int = 0, "top_k": int}`."""
    try:
        document = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(f"body: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise RequestError("body: expected a JSON object")
    unknown = set(document) - FIELDS
    if unknown:
        raise RequestError(f"body: unknown fields {sorted(unknown)}")
    prompt = document.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt: required, a non-empty string")
    check_text(prompt, "prompt")
    max_new = _integer(document, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, 1, max_new_tokens_limit)
    temperature = document.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 10:
        raise RequestError("temperature: a number in [0, 10]")
    seed = _integer(document, "seed", 0, 0, 2**31 - 1)
    top_k = _integer(document, "top_k", 0, 0, 1_000_000)
    return GenerateRequest(prompt, GenerateParams(max_new, float(temperature), seed, top_k or None))


def check_text(text: str, field: str) -> str:
    """`text`, refused when it is not valid Unicode: JSON's `\\ud800` escape decodes to a lone surrogate, which no
    tokenizer (and no UTF-8 answer) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(f"{field}: not valid Unicode text (a lone surrogate at character {error.start})") from None
    return text


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, max_prompt_tokens: int, max_positions: int) -> None:
    """Refuse a prompt longer than `max_prompt_tokens` tokens (`--max-prompt-tokens`), or one that with its
    `max_new_tokens` would pass the model's `max_position_embeddings`; counted in tokens, after encoding."""
    if prompt_tokens > max_prompt_tokens:
        raise RequestError(f"prompt: {prompt_tokens} tokens, more than --max-prompt-tokens {max_prompt_tokens}")
    if prompt_tokens + max_new_tokens > max_positions:
        raise RequestError(
            f"prompt: {prompt_tokens} tokens + max_new_tokens {max_new_tokens} pass the model's"
            f" max_position_embeddings {max_positions}"
        )


def _integer(document: dict[str, object], field: str, default: int, low: int, high: int) -> int:
    value = document.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{field}: an integer in [{low}, {high}]")
    return value
