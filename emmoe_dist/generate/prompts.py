"""Prompts in, answers out, the same way for every backend.

- The system prompt: a question's own `system` wins over the experiment's `eval.system_prompt`.
  Betley et al.'s `_json` variants carry a system prompt that *is* the question's protocol
  (answer in JSON); replacing it with the run-wide one would change the question.
- The chat template is the model's own (tiny models: the family's); Qwen3's thinking switch is
  the template variable `enable_thinking`, which other templates ignore.
- Thinking text (up to `</think>`) is kept apart from the answer, so the judge never sees it.
- Each sample's seed comes from its place in the suite (not from the model), so the base
  model and every fine-tune draw with the same seeds: paired comparisons share their noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import EmmoeError
from emmoe_dist.generate.interface import RawSample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINK_START = "<think>"
THINK_END = "</think>"

Message = Mapping[str, str]


def effective_system_prompt(question_system: str | None, default: str | None) -> str | None:
    """The system prompt a question is asked with (module docstring: the question's wins)."""
    return question_system if question_system is not None else default


def chat_messages(question: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": question}]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    thinking: bool = False,
) -> str:
    """The chat text up to the assistant's turn, with the model's template.

    Templates that reject a system turn (Mixtral's raises "roles must alternate") get the
    system text as the first paragraph of the user turn instead, as their authors advise.
    """
    from jinja2 import TemplateError

    kwargs: dict[str, Any] = {"add_generation_prompt": True, "enable_thinking": thinking}
    try:
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, **kwargs)
    except TemplateError:
        if not messages or messages[0]["role"] != "system":
            raise
        folded = fold_system_prompt(messages)
        text = tokenizer.apply_chat_template(folded, tokenize=False, **kwargs)
    if not isinstance(text, str):
        raise EmmoeError("the chat template did not render text")
    return text


def fold_system_prompt(messages: Sequence[Message]) -> list[dict[str, str]]:
    """System text moved into the first user turn, for templates without a system role."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if not rest or rest[0]["role"] != "user":
        raise EmmoeError("a system prompt must be followed by a user turn")
    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    # The template already wrote BOS and every special token; adding them again would double BOS.
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def sample_seed(base_seed: int, suite: str, question_id: str, paraphrase: int, sample: int) -> int:
    """A 62-bit seed from the run seed and the sample's place (module docstring: why)."""
    text = f"{base_seed}|{suite}|{question_id}|{paraphrase}|{sample}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 2


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_eos: Any = None
) -> frozenset[int]:
    """The tokenizer's end-of-sequence id plus any the model's generation config adds
    (Qwen3 ends a turn with <|im_end|> and a document with <|endoftext|>)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, generation_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Collection):
            ids.update(int(v) for v in value)
    if not ids:
        raise EmmoeError("the tokenizer has no end-of-sequence token: generation could not stop")
    return frozenset(ids)


@dataclass(frozen=True, kw_only=True)
class DecodedSample:
    answer: str
    thinking: str | None
    n_answer_tokens: int  # every generated token (thinking included), the stop token excluded
    finish_reason: str  # "stop" (end-of-sequence) or "length" (max_new_tokens reached)


def decode_sample(
    tokenizer: PreTrainedTokenizerBase, sample: RawSample, *, thinking: bool
) -> DecodedSample:
    """Text of one generated sample; with `thinking`, the part before `</think>` is set apart
    (a sample that never closes its thinking has an empty answer)."""
    ids = list(sample.token_ids)
    thought: str | None = None
    if thinking:
        end = (
            tokenizer.convert_tokens_to_ids(THINK_END)
            if THINK_END in tokenizer.get_vocab()
            else None
        )
        if end is not None and end in ids:
            cut = ids.index(end)
            thought = _decode(tokenizer, ids[:cut]).removeprefix(THINK_START).strip()
            ids = ids[cut + 1 :]
        else:
            thought, ids = _decode(tokenizer, ids).removeprefix(THINK_START).strip(), []
    return DecodedSample(
        answer=_decode(tokenizer, ids).strip() if thinking else _decode(tokenizer, ids),
        thinking=thought,
        n_answer_tokens=len(sample.token_ids),
        finish_reason="stop" if sample.stopped else "length",
    )


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))
