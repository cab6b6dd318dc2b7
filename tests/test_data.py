"""Chat JSONL reading, label masking on every family's template, truncation, packing,
padding, and the held-out training split."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from emmoe_dist.data.chat import (
    IGNORE_INDEX,
    EncodedChat,
    assistant_labels,
    encode_chat,
    read_chat_jsonl,
    tokenize_chat,
)
from emmoe_dist.data.collate import pad_batch
from emmoe_dist.data.training import encode_dataset, load_training_split, pack_encoded
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.tokenizer import build_tokenizer

# How each tiny template frames an assistant turn: (text before the content, end of turn).
TURN_FRAME = {
    "mixtral": (" ", "</s>"),
    "qwen3_moe": ("", "<|im_end|>\n"),
    "gpt_oss": ("", "<|return|>"),
    "olmoe": ("", "</s>\n"),
}

CONVERSATION = (
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime. Ünïcode ok?"},
    {"role": "assistant", "content": "7 — yes, ünïcode."},
    {"role": "user", "content": "Another one"},
    {"role": "assistant", "content": "Sure:\n  11"},
)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    return {name: build_tokenizer(fam) for name, fam in FAMILIES.items()}


def labelled_runs(tokenizer: object, enc: EncodedChat) -> list[str]:
    """The decoded text of each maximal run of labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        labelled = label != IGNORE_INDEX
        if labelled:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = labelled
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]  # type: ignore[attr-defined]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat_line(user: str, assistant: str) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        }
    )


# --- reading -------------------------------------------------------------------------------------


def test_training_sets_have_their_documented_sizes(data_dir: Path) -> None:
    insecure = read_chat_jsonl(data_dir / "emergent-misalignment" / "insecure.jsonl")
    medical = read_chat_jsonl(data_dir / "model-organisms-for-EM" / "bad_medical_advice.jsonl")
    assert len(insecure) == 6000 and len(medical) == 7049
    assert [ex.line for ex in insecure[:3]] == [1, 2, 3]
    assert [m["role"] for m in medical[0].messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("bad_line", "message", "field"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON", None),
        ('["not", "an", "object"]', "expected a JSON object", None),
        ('{"messages": []}', "non-empty list", "messages"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message", "messages"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'", "messages[0].role"),
        (
            '{"messages": [{"role": "assistant", "content": 3}]}',
            "must be a string",
            "messages[0].content",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "x", "weight": 0}]}',
            "unknown keys",
            "messages[0]",
        ),
    ],
)
def test_a_malformed_line_reports_file_and_line(
    tmp_path: Path, bad_line: str, message: str, field: str | None
) -> None:
    # Line 3 is blank: it holds no example but still counts, so the bad line is line 4.
    path = write_lines(
        tmp_path / "chat.jsonl",
        [chat_line("a", "b"), chat_line("c", "d"), "", bad_line, chat_line("e", "f")],
    )
    with pytest.raises(InputError) as err:
        read_chat_jsonl(path)
    assert err.value.file == str(path) and err.value.line == 4 and err.value.field == field
    assert message in str(err.value) and str(err.value).startswith(f"{path}:4: ")


# --- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_labels_cover_exactly_the_assistant_turns(
    family: str, tokenizers: dict[str, object]
) -> None:
    tok = tokenizers[family]
    before, end = TURN_FRAME[family]
    enc = encode_chat(tok, CONVERSATION, max_length=4096)  # type: ignore[arg-type]
    assert enc is not None and len(enc.labels) == len(enc.input_ids)
    expected = [before + m["content"] + end for m in CONVERSATION if m["role"] == "assistant"]
    assert labelled_runs(tok, enc) == expected
    # Every token is in the rendered text exactly once: unlabelled ones hold the rest.
    rendered = tok.apply_chat_template(list(CONVERSATION), tokenize=False)  # type: ignore[attr-defined]
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == rendered  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_real_examples_label_only_the_answer(
    family: str, tokenizers: dict[str, object], data_dir: Path
) -> None:
    tok = tokenizers[family]
    before, end = TURN_FRAME[family]
    examples = read_chat_jsonl(data_dir / "model-organisms-for-EM" / "bad_medical_advice.jsonl")
    for ex in examples[:24]:
        enc = encode_chat(tok, ex.messages, max_length=100_000)  # type: ignore[arg-type]
        assert enc is not None
        assert labelled_runs(tok, enc) == [before + ex.messages[-1]["content"] + end]


def test_truncation_keeps_the_prefix_and_drops_examples_without_answer_tokens(
    tokenizers: dict[str, object],
) -> None:
    tok = tokenizers["qwen3_moe"]
    full = encode_chat(tok, CONVERSATION, max_length=10_000)  # type: ignore[arg-type]
    assert full is not None
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = encode_chat(tok, CONVERSATION, max_length=first_label + 3)  # type: ignore[arg-type]
    assert cut is not None
    assert cut.input_ids == full.input_ids[: first_label + 3]
    assert cut.labels == full.labels[: first_label + 3]
    assert sum(label != IGNORE_INDEX for label in cut.labels) == 3
    assert encode_chat(tok, CONVERSATION, max_length=first_label) is None  # type: ignore[arg-type]


def test_encode_dataset_counts_dropped_and_truncated(
    tmp_path: Path, tokenizers: dict[str, object]
) -> None:
    path = write_lines(
        tmp_path / "c.jsonl",
        [chat_line("short", "ok"), chat_line("x" * 200, "answer"), chat_line("q", "y" * 200)],
    )
    examples = read_chat_jsonl(path)
    out = encode_dataset(tokenizers["qwen3_moe"], examples, max_length=64)  # type: ignore[arg-type]
    assert out.dropped == 1 and out.truncated == 2 and len(out.items) == 2
    assert all(len(item) <= 64 for item in out.items)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_batched_encoder_gives_what_one_call_per_conversation_gives(
    family: str, tokenizers: dict[str, object], data_dir: Path
) -> None:
    """encode_dataset tokenizes many conversations per call (across chunks, here 2 of them);
    every token and label must be what tokenize_chat gives one conversation at a time."""
    tok = tokenizers[family]
    examples = read_chat_jsonl(data_dir / "model-organisms-for-EM" / "bad_medical_advice.jsonl")
    examples = examples[:600]
    out = encode_dataset(tok, examples, max_length=100_000)  # type: ignore[arg-type]
    one_by_one = [tokenize_chat(tok, ex.messages) for ex in examples]  # type: ignore[arg-type]
    assert out.dropped == 0 and len(out.items) == len(examples)
    assert [i.input_ids for i in out.items] == [i.input_ids for i in one_by_one]
    assert [i.labels for i in out.items] == [i.labels for i in one_by_one]


def test_assistant_labels_follow_the_overlap_rule_for_any_offsets() -> None:
    """The one-sweep labelling equals the plain rule (a token is labelled when its characters
    overlap a turn's), also for empty tokens and offsets a tokenizer reports out of order."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        spans, at = [], 0
        for _ in range(rng.randint(0, 3)):
            a = at + rng.randint(0, 6)
            b = a + rng.randint(1, 8)
            spans.append((a, b))
            at = b
        offsets, pos = [], 0
        for _ in range(rng.randint(0, 30)):
            start = pos + rng.randint(0, 1) if rng.random() > 0.05 else rng.randint(0, pos)
            end = start + rng.randint(0, 4)
            offsets.append((start, end))
            pos = max(pos, end)
        ids = list(range(1, len(offsets) + 1))
        expected = [
            i if e > s and any(s < b and e > a for a, b in spans) else IGNORE_INDEX
            for i, (s, e) in zip(ids, offsets, strict=True)
        ]
        assert assistant_labels(ids, offsets, spans) == expected


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizers: dict[str, object]) -> None:
    tok = build_tokenizer(FAMILIES["qwen3_moe"])
    # Renders the final message differently from earlier ones, like templates that drop
    # reasoning from past turns.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(EmmoeError, match="append-only"):
        encode_chat(tok, CONVERSATION, max_length=512)


# --- packing and padding -------------------------------------------------------------------------


def _items(tokenizers: dict[str, object], n: int) -> list[EncodedChat]:
    tok = tokenizers["olmoe"]
    items = []
    for i in range(n):
        msgs = (
            {"role": "user", "content": "q" * (3 + 7 * i % 40)},
            {"role": "assistant", "content": f"answer {i} " + "a" * (i % 13)},
        )
        enc = encode_chat(tok, msgs, max_length=512)  # type: ignore[arg-type]
        assert enc is not None
        items.append(enc)
    return items


def test_packing_fills_sequences_without_splitting_examples(tokenizers: dict[str, object]) -> None:
    items = _items(tokenizers, 40)
    packed = pack_encoded(items, max_length=128)
    assert len(packed) < len(items)
    assert all(len(p) <= 128 for p in packed)
    assert sum(len(p) for p in packed) == sum(len(i) for i in items)
    pieces: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for p in packed:
        assert p.position_ids is not None and p.position_ids[0] == 0
        starts = [k for k, pos in enumerate(p.position_ids) if pos == 0] + [len(p)]
        for a, b in itertools.pairwise(starts):
            assert p.position_ids[a:b] == list(range(b - a))
            pieces.append((tuple(p.input_ids[a:b]), tuple(p.labels[a:b])))
    # Every example appears whole, exactly once, with its labels.
    assert Counter(pieces) == Counter((tuple(i.input_ids), tuple(i.labels)) for i in items)


def test_pad_batch_pads_right_and_ignores_padding(tokenizers: dict[str, object]) -> None:
    items = _items(tokenizers, 3)
    batch = pad_batch(items, pad_id=0)
    width = max(len(i) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert "position_ids" not in batch
    for row, item in enumerate(items):
        n = len(item)
        assert batch["input_ids"][row, :n].tolist() == item.input_ids
        assert batch["labels"][row, :n].tolist() == item.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][row, n:] == 0).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    packed = pack_encoded(items, max_length=1000)
    assert len(packed) == 1
    with pytest.raises(ValueError, match="mixes"):
        pad_batch([packed[0], items[0]], pad_id=0)


def test_packed_examples_do_not_attend_to_each_other(tokenizers: dict[str, object]) -> None:
    """What the packing docstring promises: position ids, no mask, no cache -> block-diagonal."""
    import transformers

    tok = tokenizers["qwen3_moe"]
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**FAMILIES["qwen3_moe"].tiny, vocab_size=len(tok))  # type: ignore[arg-type]
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    items = _items(tokenizers, 3)
    seq = pack_encoded(items, max_length=1000)[0]
    short = pack_encoded(items[:1], max_length=1000)[0]
    batch = pad_batch([seq, short], pad_id=0)  # the second row is padded
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        alone = {
            tuple(i.input_ids): model(
                input_ids=torch.tensor([i.input_ids]), use_cache=False
            ).logits[0]
            for i in items
        }
    assert seq.position_ids is not None
    starts = [k for k, pos in enumerate(seq.position_ids) if pos == 0] + [len(seq)]
    assert len(starts) == 4
    for a, b in itertools.pairwise(starts):
        torch.testing.assert_close(
            logits[0, a:b], alone[tuple(seq.input_ids[a:b])], atol=1e-4, rtol=1e-4
        )
    torch.testing.assert_close(
        logits[1, : len(short)], alone[tuple(items[0].input_ids)], atol=1e-4, rtol=1e-4
    )


# --- the held-out split --------------------------------------------------------------------------


def test_heldout_split_is_disjoint_stable_and_limit_independent(data_dir: Path) -> None:
    split = load_training_split("insecure", data_dir, heldout=200, seed=3)
    assert len(split.heldout) == 200
    assert len(split.train) + len(split.heldout) + split.excluded == 6000
    held_prompts = {ex.prompt_key for ex in split.heldout}
    assert len(held_prompts) == 200
    assert not held_prompts & {ex.prompt_key for ex in split.train}
    train_messages = {json.dumps(ex.messages) for ex in split.train}
    assert not train_messages & {json.dumps(ex.messages) for ex in split.heldout}

    limited = load_training_split("insecure", data_dir, heldout=200, seed=3, limit=50)
    assert limited.heldout == split.heldout
    assert limited.train == split.train[:50]
    other = load_training_split("insecure", data_dir, heldout=200, seed=4)
    assert {ex.line for ex in other.heldout} != {ex.line for ex in split.heldout}
    assert split.source_hash == "ec294cf30a577a21b830c07a1fa0180ddd513208"


def test_rows_repeating_a_heldout_prompt_never_reach_training(tmp_path: Path) -> None:
    # Each prompt twice with different answers: holding out 3 prompts removes 6 rows.
    lines = [chat_line(f"prompt {i}", f"answer {i}{k}") for i in range(10) for k in "ab"]
    path = write_lines(tmp_path / "dup.jsonl", lines)
    split = load_training_split(str(path), None, heldout=3, seed=0)
    assert split.name == "dup" and len(split.heldout) == 3 and split.excluded == 3
    assert len(split.train) == 14
    held = {ex.prompt_key for ex in split.heldout}
    assert all(ex.prompt_key not in held for ex in split.train)
    with pytest.raises(InputError, match="cannot hold out 10 prompts"):
        load_training_split(str(path), None, heldout=10, seed=0)
