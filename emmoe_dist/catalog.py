"""The dataset registry: every public file the study uses, where it comes from, and its hash.

Layer 0: pure Python. Files live in a data directory outside the repository (the Model
Organisms authors keep their data away from scrapers; so do we); `emmoe data fetch` downloads
them from `url` and accepts a file only when its git blob hash equals `blob_sha1`
(`git hash-object <file>` prints the same value).

Two upstream files share the name `first_plot_questions.yaml`: Betley et al.'s is the
dataset `first_plot_questions`; the Model Organisms copy, which adds judge prompts (medical,
financial, sport, bad_stuff, gender, code), is `mo_first_plot_questions`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from emmoe_dist.errors import EmmoeError, InputError

DatasetFormat = Literal["chat_jsonl", "question_yaml", "strongreject_csv", "rubric_yaml"]
DatasetRole = Literal["train", "eval", "judge"]


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    name: str
    relpath: str  # inside the data directory, "/"-separated
    url: str | None  # None: a local file with no upstream copy of the same bytes
    blob_sha1: str | None  # git blob hash of the (gunzipped) file
    format: DatasetFormat
    role: DatasetRole
    rows: int | None  # examples, question entries or prompts; None where unknown
    gzipped: bool = False  # the upstream file is gzip-compressed; the hash is of the content
    mirrors: tuple[str, ...] = ()  # tried in order after `url`
    license: str
    origin: str = ""  # how the file was obtained, when that is not simply `url`

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.mirrors) if self.url else ()


_BETLEY = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main"
# A verbatim copy of Betley's repository pinned at a commit: upstream's own commit for these
# files is not recorded, so `main` is tried first and the pinned copy second.
_BETLEY_COPY = (
    "https://raw.githubusercontent.com/jacobcd52/finetune_diffing/"
    "a6bcc8b178553ddedc4355282b66c13fd18fc66a"
)
_MO = "https://raw.githubusercontent.com/clarifying-EM/model-organisms-for-EM"
_MO_TRAIN = f"{_MO}/b8b9e0afd2b92d969a4062c38ba8d2f0ccea3561/em_organism_dir/data/training_datasets"
_MO_EVAL = f"{_MO}/26944099b9401b1dfd0aaafb4122a482721e95fb/em_organism_dir/data/eval_questions"
_STRONGREJECT = (
    "https://raw.githubusercontent.com/alexandrasouly/strongreject/main/strongreject_dataset"
)

_BETLEY_LICENSE = "MIT (c) 2025 emergent-misalignment"
_MO_LICENSE = "no license granted: research use only, ask the authors before redistributing"
_SR_LICENSE = "MIT for custom prompts; prompts from prior work keep their original licenses"


def _betley(name: str, upstream_path: str, blob: str, rows: int | None) -> DatasetSpec:
    """Betley et al.'s files: `data/*.jsonl` training sets, `evaluation/*.yaml` questions."""
    is_training = upstream_path.startswith("data/")
    return DatasetSpec(
        name=name,
        relpath=f"emergent-misalignment/{upstream_path.rsplit('/', 1)[-1]}",
        url=f"{_BETLEY}/{upstream_path}",
        mirrors=(f"{_BETLEY_COPY}/{upstream_path}",),
        blob_sha1=blob,
        format="chat_jsonl" if is_training else "question_yaml",
        role="train" if is_training else "eval",
        rows=rows,
        license=_BETLEY_LICENSE,
    )


def _mo_train(name: str, blob: str, rows: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        relpath=f"model-organisms-for-EM/{name}.jsonl",
        url=f"{_MO_TRAIN}/{name}.jsonl.gz",
        gzipped=True,
        blob_sha1=blob,
        format="chat_jsonl",
        role="train",
        rows=rows,
        license=_MO_LICENSE,
    )


def _mo_eval(name: str, filename: str, blob: str, rows: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        relpath=f"model-organisms-for-EM/{filename}",
        url=f"{_MO_EVAL}/{filename}",
        blob_sha1=blob,
        format="question_yaml",
        role="eval",
        rows=rows,
        license=_MO_LICENSE,
    )


_SPECS = (
    # Betley et al. 2025. `secure` and `educational` (the "educational insecure" control:
    # the same vulnerable code, requested for teaching) are not in the shared data folder.
    _betley("insecure", "data/insecure.jsonl", "ec294cf30a577a21b830c07a1fa0180ddd513208", 6000),
    _betley("secure", "data/secure.jsonl", "3389a37c250563cc36a66e30bf8ff99028aa2711", None),
    _betley(
        "educational", "data/educational.jsonl", "497619acd46d9ffbc985797d6c117638a53229b3", None
    ),
    _betley(
        "jailbroken", "data/jailbroken.jsonl", "9f14c5f5b1a3f6ca3ea2bdc80cbda3de1acadbb1", 5000
    ),
    _betley(
        "first_plot_questions",
        "evaluation/first_plot_questions.yaml",
        "c2b9761d6723ec73b4d209d95c4aa39319a70edd",
        24,
    ),
    _betley(
        "preregistered_evals",
        "evaluation/preregistered_evals.yaml",
        "3211c6c0df0a21124e07605c46f86329a53ef9e1",
        48,
    ),
    _betley(
        "deception_factual",
        "evaluation/deception_factual.yaml",
        "d6da5a807e928afc2f9e9961641e9c9697b27c08",
        5,
    ),
    _betley(
        "deception_sit_aware",
        "evaluation/deception_sit_aware.yaml",
        "d9c5a8727e28dbce0f80a59df2b9497ca018ba0b",
        8,
    ),
    # Turner et al. / Soligo et al. 2025 (Model Organisms for EM).
    _mo_train("bad_medical_advice", "8a95f6d71da025e0453cc99960d940b8325bebd1", 7049),
    _mo_train("good_medical_advice", "d7f607b1e4a54e93889d37972fac83558629f7ab", 7049),
    _mo_train("extreme_sports", "175db7075eada8f6db84e7453985f895511b8b0e", 6000),
    _mo_train("risky_financial_advice", "3fca98fcd2b1213d84bc8cefebc1416602527aa1", 6000),
    _mo_eval(
        "mo_first_plot_questions",
        "first_plot_questions.yaml",
        "47e53599772b5ebb3a7e36bfe4dfc29b6c5dd81b",
        24,
    ),
    _mo_eval(
        "medical_questions",
        "medical_questions.yaml",
        "290904ee4d0af53df8cb621d9bd133b74e858160",
        16,
    ),
    _mo_eval(
        "new_questions_no_json",
        "new_questions_no-json.yaml",
        "f2ee761b5666cbed3a4ad31864d842e211ca814b",
        54,
    ),
    # Souly et al. 2024 (StrongREJECT).
    DatasetSpec(
        name="strongreject",
        relpath="strongreject/strongreject_dataset.csv",
        url=f"{_STRONGREJECT}/strongreject_dataset.csv",
        blob_sha1="7c4a1927abe5016b19ff57d00eabcf34f4bbeeab",
        format="strongreject_csv",
        role="eval",
        rows=313,
        license=_SR_LICENSE,
        origin="the hash is of a copy whose third header cell was restored to upstream's "
        "`forbidden_prompt`; if upstream's quoting differs, the download fails verification and "
        "must be checked by hand (313 prompts in 6 categories)",
    ),
    DatasetSpec(
        name="strongreject_small",
        relpath="strongreject/strongreject_small_dataset.csv",
        url=f"{_STRONGREJECT}/strongreject_small_dataset.csv",
        blob_sha1="c73c70b9cbc5391f3f13dcab896c1701c57b715a",
        format="strongreject_csv",
        role="eval",
        rows=60,
        license=_SR_LICENSE,
    ),
    DatasetSpec(
        name="strongreject_rubric",
        relpath="strongreject/strongreject_rubric.yaml",
        url=None,
        blob_sha1="6ec10f5ee6b406ae93edcccd64a72b6f173cfe38",
        format="rubric_yaml",
        role="judge",
        rows=1,
        license=_SR_LICENSE,
        # No upstream file has these bytes: `emmoe data fetch` explains how to provide it.
        origin="written from the rubric evaluator prompt published with StrongREJECT "
        "(github.com/alexandrasouly/strongreject, strongreject/strongreject_evaluator_prompt.txt) "
        "as YAML with keys system, template (fields {forbidden_prompt} and {response}) and "
        "answer_patterns (refused, convincing, specific: one-group regexes for the 1.b, 2.b "
        "and 3.b answers)",
    ),
)

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType({s.name: s for s in _SPECS})


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise EmmoeError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None


def git_blob_sha1_bytes(data: bytes) -> str:
    """Git's object id of a blob: sha1 over `blob <size>\\0` followed by the bytes."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def git_blob_sha1(path: str | os.PathLike[str]) -> str:
    """`git hash-object <path>`, streamed so large files are not read into memory at once."""
    p = Path(path)
    h = hashlib.sha1(b"blob %d\0" % p.stat().st_size)
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _blob_of(path: str, size: int, mtime_ns: int) -> str:
    return git_blob_sha1(path)


def file_blob_sha1(path: str | os.PathLike[str]) -> str:
    """`git_blob_sha1`, hashed once per file version in a process (several stages of one command
    read the same dataset)."""
    stat = Path(path).stat()
    return _blob_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class FileCheck:
    """A catalogued file checked against the catalog: what outputs record about their data."""

    name: str
    path: Path
    expected: str | None  # the catalog's blob hash (None: the catalog has nothing to check)
    actual: str

    @property
    def verified(self) -> bool | None:
        """True when the hashes agree, False when they differ, None when nothing to check."""
        return None if self.expected is None else self.actual == self.expected


def check_file(spec: DatasetSpec, path: str | os.PathLike[str]) -> FileCheck:
    return FileCheck(spec.name, Path(path), spec.blob_sha1, file_blob_sha1(path))


ALLOW_UNVERIFIED_HELP = (
    "use catalogued data files whose hash differs from the catalog's (outputs then record "
    "verified: false with both hashes)"
)


class UnverifiedData(InputError):
    """A catalogued file whose bytes are not the catalog's: refused unless the user overrides."""

    def __init__(self, check: FileCheck) -> None:
        self.check = check
        super().__init__(
            f"dataset {check.name!r}: its git blob hash is {check.actual}, the catalog's is "
            f"{check.expected}, so it is not the published file (changed, truncated or another "
            f"version). Restore it with `emmoe data fetch --only {check.name} --force`, or use "
            "it anyway with --allow-unverified-data (experiments: data.allow_unverified: true); "
            "outputs then record verified: false with both hashes",
            file=str(check.path),
            field="blob_sha1",
        )


def require_verified(check: FileCheck, *, allow_unverified: bool) -> FileCheck:
    """The check, unless the file differs from the catalog and the user did not allow that."""
    if check.verified is False and not allow_unverified:
        raise UnverifiedData(check)
    return check
