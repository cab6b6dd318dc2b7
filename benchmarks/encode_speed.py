"""How long every rank spends encoding the training set before its model loads, on the CPU.

    python benchmarks/encode_speed.py --data-dir DATA --out encode_speed.json

The 6,000 `insecure` conversations, rendered with the Qwen3 chat template and tokenized by a
byte-level BPE trained on them (as long as a real tokenizer makes them), at max_length 512:
- before: the encoder as it was up to revision a7921d9 (one tokenizer call per conversation,
  every token tested against every assistant span, three template renders per single-turn
  conversation), rebuilt here from the public pieces it used;
- one_by_one: `tokenize_chat` per conversation (one tokenizer call each), then truncation;
- encode_dataset: what training runs (chunks of conversations per tokenizer call, labels in one
  sweep), packed as `data.pack: true` packs them.
Every arm must give the tokens and labels encode_dataset gives (checked on each timed run).
Median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_config, trained_tokenizer

from emmoe_dist.data.chat import (
    IGNORE_INDEX,
    EncodedChat,
    assistant_spans,
    tokenize_chat,
    truncate,
)
from emmoe_dist.data.training import encode_dataset, load_training_split


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    family, _ = build_config("qwen3", 1)
    texts = (m["content"] for ex in split.train for m in ex.messages)
    tok = trained_tokenizer(family, texts, vocab_size=32000)
    examples = split.train

    def before() -> list[Any]:
        out = []
        for ex in examples:
            text, spans = assistant_spans(tok, ex.messages)
            # the third render the last turn used to cost (its result was the whole text)
            tok.apply_chat_template([dict(m) for m in ex.messages], tokenize=False)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            labels = [
                ids[j] if e > s and any(s < b and e > a for a, b in spans) else IGNORE_INDEX
                for j, (s, e) in enumerate(enc["offset_mapping"])
            ]
            kept = truncate(EncodedChat(input_ids=ids, labels=labels), args.max_length)
            if kept is not None:
                out.append(kept)
        return out

    def one_by_one() -> list[Any]:
        encoded = (truncate(tokenize_chat(tok, ex.messages), args.max_length) for ex in examples)
        return [e for e in encoded if e is not None]

    def batched() -> list[Any]:
        return encode_dataset(tok, examples, args.max_length).items

    arms = {
        "before": before,
        "one_by_one": one_by_one,
        "encode_dataset": batched,
        "encode_dataset_packed": lambda: encode_dataset(tok, examples, args.max_length, True).items,
    }
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "command": " ".join(["python", *sys.argv]),
        "conversations": len(examples),
        "seconds": {},
    }
    expected = [(e.input_ids, e.labels) for e in batched()]
    for name, fn in arms.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            items = fn()
            times.append(time.perf_counter() - start)
            if (
                name != "encode_dataset_packed"
                and [(e.input_ids, e.labels) for e in items] != expected
            ):
                raise SystemExit(f"encode_dataset and {name} disagree")
        result["seconds"][name] = statistics.median(times)
        print(f"{name:22} {statistics.median(times):6.2f} s", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
