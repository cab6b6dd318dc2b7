"""The OpenAI chat-completions wire format: requests read into typed values, replies built
from finished samples. Pure Python (no vLLM, no Ray), so its rules are tested anywhere.

What is honoured: `model` (a served base or adapter name), `messages`, `n`, `temperature`,
`top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `logprobs` + `top_logprobs` (up to
20, raw log-probabilities), and `chat_template_kwargs.enable_thinking` (default off: a judge
wants the answer, not a monologue). Any other field is an error, not silently ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_TOP_LOGPROBS = 20  # vLLM's `max_logprobs` default and the OpenAI API's limit
DEFAULT_MAX_TOKENS = 1024
_ACCEPTED = frozenset(
    {
        "model",
        "messages",
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "logprobs",
        "top_logprobs",
        "chat_template_kwargs",
        "stream",
        "user",
    }
)


class BadRequest(ValueError):
    """A request the route refuses with HTTP 400; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, str], ...]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    logprobs: bool = False  # the chosen tokens' log-probabilities
    top_logprobs: int = 0  # and this many alternatives per position
    thinking: bool = False


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"{name}: must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{name}: must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - _ACCEPTED)
    if unknown:
        raise BadRequest(f"{unknown[0]}: not supported by this endpoint")
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: required")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)):
            raise BadRequest(f"messages[{i}]: needs a role")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}].content: must be a string")
        messages.append({"role": m["role"], "content": m["content"]})
    top = 0
    if body.get("logprobs"):
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs"):
        raise BadRequest("top_logprobs: needs logprobs: true")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping) or set(kwargs) - {"enable_thinking"}:
        raise BadRequest("chat_template_kwargs: only enable_thinking is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed: must be an integer, got {seed!r}")
    return ChatRequest(
        model=model,
        messages=tuple(messages),
        n=_integer(body, "n", 1, 1, 128),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        max_tokens=_integer({"m": max_tokens}, "m", DEFAULT_MAX_TOKENS, 1, 1 << 20),
        seed=seed,
        logprobs=bool(body.get("logprobs")),
        top_logprobs=top,
        thinking=bool(kwargs.get("enable_thinking", False)),
    )


@dataclass(frozen=True, kw_only=True)
class Choice:
    text: str
    finish_reason: str
    n_tokens: int
    # per generated token: (its text, its logprob, the top-k (text, logprob) pairs)
    logprobs: Sequence[tuple[str, float, Sequence[tuple[str, float]]]] | None = None


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_completion(model: str, choices: Sequence[Choice], prompt_tokens: int) -> dict[str, Any]:
    """A `chat.completion` object as the openai client parses it."""
    body_choices = []
    for i, c in enumerate(choices):
        logprobs = None
        if c.logprobs is not None:
            logprobs = {
                "content": [
                    {**_entry(tok, lp), "top_logprobs": [_entry(t, v) for t, v in top]}
                    for tok, lp, top in c.logprobs
                ]
            }
        body_choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": logprobs,
            }
        )
    completion = sum(c.n_tokens for c in choices)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": body_choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
    }


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def model_list(names: Sequence[str]) -> dict[str, Any]:
    now = int(time.time())
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": now, "owned_by": "emmoe"} for n in names],
    }
