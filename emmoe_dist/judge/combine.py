"""Several judges' scores of the same answers in one records file.

Each judge judges the answers into its own file (`emmoe judge --name NAME`); `combine_judges`
writes the first judge's records with every further judge's scores under its name
(`JudgedRecord.more_judges`). Reports then give the headline per judge and how far the judges
agree (`emmoe_dist.agreement`). An answer a further judge did not score simply lacks its
verdict: agreement is measured on the answers both judges scored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from emmoe_dist.errors import InputError
from emmoe_dist.files import iter_jsonl, write_jsonl_atomic
from emmoe_dist.metrics import model_label
from emmoe_dist.records import JudgedRecord

Answer = tuple[str, str]  # (model label, record key): one answer, whichever file holds it


def _by_key(path: Path) -> dict[Answer, JudgedRecord]:
    out: dict[Answer, JudgedRecord] = {}
    for line, record in enumerate(iter_jsonl(path, JudgedRecord, tolerate_torn_tail=True), 1):
        answer = (model_label(record.generation), record.key)
        if answer in out:
            raise InputError(f"answer {record.key!r} appears twice", file=str(path), line=line)
        out[answer] = record
    return out


def combine_judges(
    first: str | os.PathLike[str],
    others: Mapping[str, str | os.PathLike[str]],
    out: str | os.PathLike[str],
) -> int:
    """Write `first`'s records to `out` (which may be `first`) with each file of `others`
    (name -> judged records of the same answers) stored under its name. Returns the answers
    written. A name already used by the first judge, or an answer the first judge lacks, is an
    error: every further verdict must belong to an answer of the first file."""
    primary = _by_key(Path(first))
    verdicts: dict[str, dict[Answer, JudgedRecord]] = {}
    for name, path in others.items():
        theirs = _by_key(Path(path))
        stray = sorted(
            k
            for k, r in theirs.items()
            if k not in primary or primary[k].generation != r.generation
        )
        if stray:
            raise InputError(
                f"judge {name!r} scored {len(stray)} answers that {first} does not hold, "
                f"e.g. {stray[0][1]!r} of {stray[0][0]!r}",
                file=str(path),
            )
        verdicts[name] = theirs
    combined = []
    for key, record in primary.items():
        more = dict(record.more_judges)
        for name, theirs in verdicts.items():
            if name == record.judge:
                raise InputError(
                    f"{name!r} is the first judge's name; name the further judge otherwise",
                    file=str(others[name]),
                )
            if key in theirs:
                more[name] = theirs[key].verdict()
        combined.append(record.model_copy(update={"more_judges": more}))
    write_jsonl_atomic(Path(out), combined)
    return len(combined)
