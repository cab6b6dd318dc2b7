"""Residual-stream activations of judged answers, per decoder layer, stored on disk.

One forward over prompt + answer gives two things per layer: the layer's output averaged over
the answer tokens (what directions are made of) and its output at the last prompt token, the
state the model was in just before it answered (what early detection reads; causal attention
makes it independent of the answer). Answer tokens are the assistant-turn tokens that
`encode_chat` labels, end-of-turn marker included.

On disk a folder holds `index.json` (what was collected, with which model, and one row per
answer) and shards `shard-NNNNN.safetensors` with `answer_mean` and `last_prompt`, each
[answers, layers, hidden] float32. Shards and the index are written atomically, the index
last, so an interrupted run resumes at the first answer whose shard was not finished.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from emmoe_dist.data.chat import IGNORE_INDEX, EncodedChat, encode_chat
from emmoe_dist.data.collate import pad_batch
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.families import MoEFamily
from emmoe_dist.files import atomic_path, write_text_atomic
from emmoe_dist.interp.labels import question_key
from emmoe_dist.models.anatomy import decoder_layers
from emmoe_dist.models.hooks import ForwardHooks, Hook
from emmoe_dist.records import GenerationRecord, JudgedRecord

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INDEX = "index.json"
ANSWER_MEAN, LAST_PROMPT = "answer_mean", "last_prompt"


# ---------------------------------------------------------------------------------------------
# Answers as token sequences


@dataclass(frozen=True)
class AnswerItem:
    """One judged answer, encoded: labels mark its answer tokens."""

    key: str
    question: str  # suite/question_id
    label: int  # labels.MISALIGNED, ALIGNED_LABEL or UNLABELLED
    encoded: EncodedChat

    @property
    def answer_tokens(self) -> int:
        return sum(1 for v in self.encoded.labels if v != IGNORE_INDEX)


def chat_messages(generation: GenerationRecord) -> list[dict[str, str]]:
    """The conversation the answer came from: system prompt (if any), question, answer."""
    messages = []
    if generation.system_prompt:
        messages.append({"role": "system", "content": generation.system_prompt})
    messages.append({"role": "user", "content": generation.question})
    messages.append({"role": "assistant", "content": generation.answer})
    return messages


def _encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int
) -> EncodedChat | None:
    from jinja2 import TemplateError

    try:
        return encode_chat(tokenizer, messages, max_length)
    except TemplateError:
        # Templates without a system role (Mixtral's) got the system text as the first
        # paragraph of the user turn at generation time; render it the same way here.
        if messages[0]["role"] != "system":
            raise
        system, user, *rest = messages
        folded = {"role": "user", "content": f"{system['content']}\n\n{user['content']}"}
        return encode_chat(tokenizer, [folded, *rest], max_length)


def encode_answers(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[JudgedRecord],
    labels: Sequence[int],
    *,
    max_length: int,
) -> tuple[list[AnswerItem], int]:
    """Encoded answers, and how many were dropped because no answer token fit in
    `max_length` (prompts are kept whole; long answers are cut on the right)."""
    items, dropped = [], 0
    for record, label in zip(records, labels, strict=True):
        enc = _encode(tokenizer, chat_messages(record.generation), max_length)
        if enc is None:
            dropped += 1
            continue
        items.append(AnswerItem(record.key, question_key(record), int(label), enc))
    return items, dropped


# ---------------------------------------------------------------------------------------------
# Hooks


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embeddings' device (layers may span GPUs under device_map)."""
    embeddings = cast(Callable[[], nn.Module], model.get_input_embeddings)()
    return next(embeddings.parameters()).device


def layer_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states: transformers 5 returns the tensor itself, older
    versions and some remote-code models a tuple led by it."""
    return cast(torch.Tensor, output[0] if isinstance(output, tuple) else output)


class ResidualTap(ForwardHooks):
    """Context manager: while open, each forward records, per decoder layer, the mean of the
    layer's output over the answer positions and its output at the last prompt position.

    Reductions run on each layer's own device; results move to the CPU once per batch.
    """

    def __init__(self, model: nn.Module, family: MoEFamily) -> None:
        self._layers = decoder_layers(model, family)
        self._weights: torch.Tensor | None = None  # [B, T] 1/count on answer positions
        self._last: torch.Tensor | None = None  # [B] last prompt position
        self._answer: dict[int, torch.Tensor] = {}
        self._prompt: dict[int, torch.Tensor] = {}
        super().__init__()

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def set_batch(self, answer_mask: torch.Tensor) -> None:
        """`answer_mask` [B, T] marks answer tokens; each row's answer follows its prompt."""
        mask = answer_mask.bool()
        counts = mask.sum(1)
        if bool((counts == 0).any()):
            raise EmmoeError("an answer in the batch has no answer token")
        first = mask.float().argmax(1)  # argmax returns the first of equal maxima
        if bool((first == 0).any()):
            raise EmmoeError("an answer starts at the first token: it has no prompt")
        self._weights = mask.float() / counts[:, None].float()
        self._last = first - 1  # the token before the first answer token
        self._answer.clear()
        self._prompt.clear()

    def hook_targets(self) -> Iterator[tuple[nn.Module, Hook]]:
        return ((layer, self._hook(i)) for i, layer in enumerate(self._layers))

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._weights is None or self._last is None:
                raise EmmoeError("ResidualTap.set_batch must be called before each forward")
            hidden = layer_output(output)
            weights = self._weights.to(hidden.device)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            # Upcast before reducing: a bf16 sum over hundreds of tokens loses the mean's digits.
            self._answer[index] = torch.bmm(weights[:, None, :], hidden.float())[:, 0]
            self._prompt[index] = hidden[rows, self._last.to(hidden.device)].float()

        return hook

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer mean, last prompt token), each [B, layers, hidden] float32 on the CPU."""
        if len(self._answer) != len(self._layers):
            raise EmmoeError(
                f"{len(self._answer)} of {len(self._layers)} decoder layers ran in the forward"
            )
        answer = torch.stack([self._answer[i].cpu() for i in range(len(self._layers))], 1)
        prompt = torch.stack([self._prompt[i].cpu() for i in range(len(self._layers))], 1)
        self._answer.clear()
        self._prompt.clear()
        return answer, prompt


# ---------------------------------------------------------------------------------------------
# The store


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActivationMeta(_Record):
    """What produced the activations; a resumed run must match it exactly."""

    model: str
    adapter: str | None = None
    family: str
    num_layers: int  # decoder layers; activations cover all of them, in order
    hidden_size: int
    max_length: int


class ActivationRow(_Record):
    key: str
    question: str
    label: int
    answer_tokens: int
    shard: str


class ActivationIndex(_Record):
    schema_version: Literal[1] = 1
    meta: ActivationMeta
    rows: tuple[ActivationRow, ...] = ()


def read_index(folder: str | os.PathLike[str]) -> ActivationIndex | None:
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        return ActivationIndex.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(
            str(first["msg"]), file=str(path), field=".".join(map(str, first["loc"])) or None
        ) from None


def _write_index(folder: Path, index: ActivationIndex) -> None:
    write_text_atomic(folder / INDEX, index.model_dump_json(indent=1) + "\n")


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


@dataclass(frozen=True)
class ActivationSet:
    """Activations of N answers: `answer_mean` and `last_prompt` are [N, layers, hidden]."""

    meta: ActivationMeta
    keys: tuple[str, ...]
    questions: tuple[str, ...]
    labels: NDArray[np.int8]
    answer_mean: torch.Tensor
    last_prompt: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.meta.num_layers))

    def select(self, indices: Sequence[int] | NDArray[np.int64]) -> ActivationSet:
        idx = [int(i) for i in indices]
        pick = torch.tensor(idx, dtype=torch.long)
        return replace(
            self,
            keys=tuple(self.keys[i] for i in idx),
            questions=tuple(self.questions[i] for i in idx),
            labels=self.labels[idx],
            answer_mean=self.answer_mean[pick],
            last_prompt=self.last_prompt[pick],
        )

    def by_keys(self, keys: Sequence[str]) -> ActivationSet:
        """The answers `keys`, in that order; all must be present."""
        position = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in position]
        if missing:
            raise EmmoeError(f"{len(missing)} answers have no activations, e.g. {missing[0]!r}")
        return self.select([position[k] for k in keys])


def load_activations(
    folder: str | os.PathLike[str], keys: Sequence[str] | None = None
) -> ActivationSet:
    """Every stored answer in index order, or just `keys` in their order."""
    from safetensors.torch import load_file

    root = Path(folder)
    index = read_index(root)
    if index is None:
        raise InputError("no activations here (index.json is missing)", file=str(root))
    shards = list(dict.fromkeys(r.shard for r in index.rows))
    answer, prompt = [], []
    for name in shards:
        tensors = load_file(str(root / name))
        answer.append(tensors[ANSWER_MEAN])
        prompt.append(tensors[LAST_PROMPT])
    meta, rows = index.meta, index.rows
    empty = torch.zeros((0, meta.num_layers, meta.hidden_size))
    full = ActivationSet(
        meta=meta,
        keys=tuple(r.key for r in rows),
        questions=tuple(r.question for r in rows),
        labels=np.array([r.label for r in rows], dtype=np.int8),
        answer_mean=torch.cat(answer) if answer else empty,
        last_prompt=torch.cat(prompt) if prompt else empty,
    )
    return full if keys is None else full.by_keys(keys)


# ---------------------------------------------------------------------------------------------
# Collection


def _open_store(folder: Path, meta: ActivationMeta, items: Sequence[AnswerItem]) -> ActivationIndex:
    """The folder's index (a new one if absent), labels refreshed from `items`."""
    index = read_index(folder)
    if index is None:
        return ActivationIndex(meta=meta)
    if index.meta != meta:
        raise EmmoeError(
            f"{folder / INDEX} holds activations of {index.meta.model!r} "
            f"(adapter {index.meta.adapter!r}, max_length {index.meta.max_length}), not of "
            f"{meta.model!r} (adapter {meta.adapter!r}, max_length {meta.max_length}); "
            "use another folder"
        )
    # Labels depend on the thresholds, activations do not: relabel without recomputing.
    labels = {it.key: it.label for it in items}
    rows = tuple(
        r.model_copy(update={"label": labels[r.key]}) if r.key in labels else r for r in index.rows
    )
    if rows != index.rows:
        index = index.model_copy(update={"rows": rows})
        _write_index(folder, index)
    return index


@torch.inference_mode()
def collect_activations(
    model: nn.Module,
    family: MoEFamily,
    items: Sequence[AnswerItem],
    folder: str | os.PathLike[str],
    meta: ActivationMeta,
    *,
    batch_size: int = 8,
    shard_size: int = 256,
    pad_id: int = 0,
    progress: bool = True,
) -> ActivationSet:
    """Activations of `items` (the stored ones reused), in the order of `items`."""
    from tqdm.auto import tqdm

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    index = _open_store(root, meta, items)
    done = {r.key for r in index.rows}
    pending = [it for it in dict((it.key, it) for it in items).values() if it.key not in done]
    # Longest first, so similar lengths share a batch and the first batch shows peak memory.
    pending.sort(key=lambda it: -len(it.encoded))
    was_training = model.training
    model.eval()
    device = input_device(model)
    tap = ResidualTap(model, family)
    if tap.num_layers != meta.num_layers:
        raise EmmoeError(
            f"the model has {tap.num_layers} decoder layers, meta says {meta.num_layers}"
        )
    bar = tqdm(
        total=len(pending), desc="activations", unit="answer", disable=not progress or not pending
    )
    try:
        with tap:
            for start in range(0, len(pending), shard_size):
                chunk = pending[start : start + shard_size]
                answer, prompt = [], []
                for b in range(0, len(chunk), batch_size):
                    batch = pad_batch([it.encoded for it in chunk[b : b + batch_size]], pad_id)
                    tap.set_batch(batch["labels"] != IGNORE_INDEX)
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                        logits_to_keep=1,  # the vocabulary projection is not needed
                    )
                    a, p = tap.pop()
                    answer.append(a)
                    prompt.append(p)
                    bar.update(len(batch["input_ids"]))
                shard = f"shard-{len({r.shard for r in index.rows}):05d}.safetensors"
                _save_shard(
                    root / shard, {ANSWER_MEAN: torch.cat(answer), LAST_PROMPT: torch.cat(prompt)}
                )
                rows = tuple(
                    ActivationRow(
                        key=it.key,
                        question=it.question,
                        label=it.label,
                        answer_tokens=it.answer_tokens,
                        shard=shard,
                    )
                    for it in chunk
                )
                index = index.model_copy(update={"rows": index.rows + rows})
                _write_index(root, index)
    finally:
        bar.close()
        model.train(was_training)
    return load_activations(root, [it.key for it in dict((it.key, it) for it in items).values()])
