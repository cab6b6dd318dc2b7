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
from emmoe_dist.records import JudgedRecord


def _by_key(path: Path) -> dict[str, JudgedRecord]:
    out: dict[str, JudgedRecord] = {}
    for line, record in enumerate(iter_jsonl(path, JudgedRecord, tolerate_torn_tail=True), 1):
        if record.key in out:
            raise InputError(f"answer {record.key!r} appears twice", file=str(path), line=line)
        out[record.key] = record
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
    verdicts: dict[str, dict[str, JudgedRecord]] = {}
    for name, path in others.items():
        theirs = _by_key(Path(path))
        stray = sorted(theirs.keys() - primary.keys())
        if stray:
            raise InputError(
                f"judge {name!r} scored {len(stray)} answers that {first} does not hold, "
                f"e.g. {stray[0]!r}",
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
