"""Training examples: a fixed-seed held-out split, encoding with the chat template, packing.

The held-out part is a control: its prompts are never trained on, and it does not depend on
`limit`, so runs that train on different amounts of data share one control set.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from emmoe_dist.catalog import DATASETS, FileCheck, file_blob_sha1
from emmoe_dist.data.chat import (
    ChatExample,
    EncodedChat,
    assistant_spans,
    read_chat_jsonl,
    tokenize_rendered,
    truncate,
)
from emmoe_dist.data.datadir import resolve_data_dir, verified_dataset
from emmoe_dist.errors import EmmoeError, InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TrainingSplit:
    name: str  # the catalog name, or the file stem of a user's file
    source: Path
    source_hash: str  # git blob sha1 of `source`
    train: list[ChatExample]
    heldout: list[ChatExample]
    # Rows left out of `train` because they repeat a held-out prompt (the data has duplicates).
    excluded: int = 0
    expected_hash: str | None = None  # the catalog's hash; None for a file of the user's own
    verified: bool | None = None  # source_hash == expected_hash; None: nothing to check


def training_file(
    name_or_path: str, data_dir: Path | None, *, allow_unverified: bool = False
) -> tuple[str, Path]:
    """(name, path) of a catalog training set (checked against its catalog hash) or a chat
    JSONL file."""
    name, check = training_source(name_or_path, data_dir, allow_unverified=allow_unverified)
    return name, check.path


def training_source(
    name_or_path: str, data_dir: Path | None, *, allow_unverified: bool = False
) -> tuple[str, FileCheck]:
    """`training_file` with the file's check: its hash and, for catalog sets, the catalog's."""
    if name_or_path in DATASETS:
        spec = DATASETS[name_or_path]
        if spec.format != "chat_jsonl":
            raise EmmoeError(f"dataset {name_or_path!r} is {spec.format}, not chat JSONL")
        check = verified_dataset(
            name_or_path, resolve_data_dir(data_dir), allow_unverified=allow_unverified
        )
        return name_or_path, check
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        trainable = ", ".join(n for n, s in DATASETS.items() if s.role == "train")
        raise EmmoeError(f"{name_or_path!r} is neither a training set ({trainable}) nor a file")
    return path.stem, FileCheck(path.stem, path, None, file_blob_sha1(path))


def load_training_split(
    name_or_path: str,
    data_dir: Path | None,
    *,
    heldout: int,
    seed: int,
    limit: int | None = None,
    allow_unverified: bool = False,
) -> TrainingSplit:
    """Read a chat dataset and hold out `heldout` distinct prompts, chosen with `seed`.

    Prompts are shuffled once with `seed`; the first `heldout` become the control and every
    row that repeats one of them leaves the training part (counted in `excluded`). Training
    rows keep the shuffled order and `limit` takes the first ones, so the held-out set is the
    same for every `limit`.
    """
    if heldout < 0:
        raise EmmoeError(f"heldout must be >= 0, got {heldout}")
    name, check = training_source(name_or_path, data_dir, allow_unverified=allow_unverified)
    path = check.path
    examples = read_chat_jsonl(path)
    by_prompt: dict[tuple[tuple[str, str], ...], list[ChatExample]] = {}
    for ex in examples:
        by_prompt.setdefault(ex.prompt_key, []).append(ex)
    prompts = list(by_prompt)  # first-occurrence order: stable for a given file
    if heldout >= len(prompts):
        raise InputError(
            f"cannot hold out {heldout} prompts: the file has {len(prompts)} "
            "distinct prompts and training needs some",
            file=str(path),
        )
    random.Random(seed).shuffle(prompts)
    held_groups = [by_prompt[p] for p in prompts[:heldout]]
    train = [ex for p in prompts[heldout:] for ex in by_prompt[p]]
    if limit is not None:
        train = train[:limit]
    return TrainingSplit(
        name=name,
        source=path,
        source_hash=check.actual,
        train=train,
        heldout=[group[0] for group in held_groups],
        excluded=sum(len(group) - 1 for group in held_groups),
        expected_hash=check.expected,
        verified=check.verified,
    )


_ENCODE_CHUNK = 512  # conversations per tokenizer call: parallel enough, and a live progress bar


@dataclass(frozen=True)
class EncodedDataset:
    items: list[EncodedChat]
    dropped: int = 0  # examples with no assistant token left after truncation
    truncated: int = 0  # examples longer than max_length, cut (dropped ones included)


def encode_dataset(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ChatExample],
    max_length: int,
    pack: bool = False,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
) -> EncodedDataset:
    """Encode every example; with `pack`, combine them into sequences of at most `max_length`."""
    items: list[EncodedChat] = []
    dropped = truncated = 0
    bar = tqdm(total=len(examples), desc="encode", unit="ex", disable=None)
    for first in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[first : first + _ENCODE_CHUNK]
        rendered = []
        for ex in chunk:
            try:
                rendered.append(assistant_spans(tokenizer, ex.messages, template_kwargs))
            except EmmoeError as e:
                raise InputError(str(e), file=ex.source, line=ex.line) from None
        for full in tokenize_rendered(tokenizer, rendered):
            enc = truncate(full, max_length)
            truncated += len(full) > max_length
            if enc is None:
                dropped += 1
            else:
                items.append(enc)
        bar.update(len(chunk))
    bar.close()
    if pack:
        items = pack_encoded(items, max_length)
    return EncodedDataset(items=items, dropped=dropped, truncated=truncated)


def pack_encoded(items: Sequence[EncodedChat], max_length: int) -> list[EncodedChat]:
    """Pack examples into sequences of at most `max_length` tokens (best fit, longest first).

    No example is split. Each packed sequence carries `position_ids` that restart at 0 per
    example. Attention crosses the examples of a sequence unless the trainer passes those
    position ids with no attention mask and `use_cache=False`: transformers 5 then builds a
    block-diagonal causal mask from the restarts (`masking_utils.find_packed_sequence_indices`;
    it skips that when a cache object exists, which `use_cache` creates even in training).
    Sequences come out longest-first; the trainer's sampler shuffles them.
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        n = len(items[i])
        if n > max_length:
            raise EmmoeError(f"example of {n} tokens exceeds max_length {max_length}")
        k = bisect.bisect_left(free, (n, -1))  # the tightest bin that still fits
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    packed: list[EncodedChat] = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ids += items[i].input_ids
            labels += items[i].labels
            positions += range(len(items[i]))
        packed.append(EncodedChat(input_ids=ids, labels=labels, position_ids=positions))
    return packed
