"""Download catalog datasets from upstream, verify their git blob hashes, and take inventory.

A download is accepted only when its (gunzipped) bytes hash to the catalog's blob; then it
is written atomically, so a failed or mismatched download never leaves a file behind. Files
already present and verified are skipped, so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import gzip
import http.client
import io
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from tqdm import tqdm

from emmoe_dist import __version__, catalog
from emmoe_dist.catalog import DatasetSpec, git_blob_sha1, git_blob_sha1_bytes
from emmoe_dist.config import load_yaml_with_lines
from emmoe_dist.data.chat import read_chat_jsonl
from emmoe_dist.data.suites import read_question_yaml, read_strongreject_csv
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.files import write_bytes_atomic

DEFAULT_TIMEOUT_S = 60.0


def select_datasets(only: Sequence[str] | None = None) -> list[DatasetSpec]:
    """Catalog entries by name (all of them when `only` is None), in catalog order."""
    if not only:
        return list(catalog.DATASETS.values())
    unknown = [n for n in only if n not in catalog.DATASETS]
    if unknown:
        raise EmmoeError(
            f"unknown datasets {', '.join(unknown)}; known: {', '.join(catalog.DATASETS)}"
        )
    return [s for s in catalog.DATASETS.values() if s.name in only]


# --- inventory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetStatus:
    name: str
    role: str
    format: str
    path: Path
    present: bool
    rows: int | None  # counted by parsing; None when absent or unparseable
    blob_sha1: str | None  # of the file on disk
    verified: bool | None  # the hash equals the catalog's; None when absent or nothing to check
    error: str | None = None  # why the file could not be parsed


def count_rows(spec: DatasetSpec, path: Path) -> int:
    """Examples, question entries or prompts in the file, by parsing all of it."""
    if spec.format == "chat_jsonl":
        return len(read_chat_jsonl(path))
    if spec.format == "question_yaml":
        return len(read_question_yaml(path, spec.name))
    if spec.format == "strongreject_csv":
        return len(read_strongreject_csv(path, spec.name))
    # The rubric is the judge's: emmoe_dist.judge.rubric checks its fields when it judges (and
    # the catalog hash vouches for the file); an inventory only needs it to be one mapping.
    rubric, _ = load_yaml_with_lines(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(rubric, dict):
        raise InputError(
            "expected a mapping with system, template, answer_patterns", file=str(path), line=1
        )
    return 1


def dataset_status(spec: DatasetSpec, data_dir: Path) -> DatasetStatus:
    path = data_dir / spec.relpath
    if not path.is_file():
        return DatasetStatus(spec.name, spec.role, spec.format, path, False, None, None, None)
    blob = git_blob_sha1(path)
    rows, error = None, None
    try:
        rows = count_rows(spec, path)
    except EmmoeError as e:
        error = str(e)
    verified = None if spec.blob_sha1 is None else blob == spec.blob_sha1
    return DatasetStatus(spec.name, spec.role, spec.format, path, True, rows, blob, verified, error)


# --- download ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    name: str
    status: Literal["downloaded", "present", "failed"]
    path: Path
    message: str


class _Unreachable(Exception):
    """The host could not be reached (no network, DNS failure, refused, timed out)."""


def download(url: str, *, timeout: float, label: str) -> bytes:
    """The body of `url`; HTTPError for HTTP failures, _Unreachable when there is no answer."""
    request = urllib.request.Request(url, headers={"User-Agent": f"emmoe-dist/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buf = io.BytesIO()
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=label, disable=None, leave=False
            ) as bar:
                while chunk := response.read(1 << 16):
                    buf.write(chunk)
                    bar.update(len(chunk))
            return buf.getvalue()
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as e:
        raise _Unreachable(str(e.reason)) from None
    except TimeoutError:
        raise _Unreachable(f"no answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Unreachable(f"connection failed: {e!r}") from None


def fetch_dataset(
    spec: DatasetSpec,
    data_dir: Path,
    *,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> FetchResult:
    """Make `spec`'s file present and verified in `data_dir`, downloading it when needed."""
    path = data_dir / spec.relpath
    if path.is_file() and not force:
        blob = git_blob_sha1(path)
        if spec.blob_sha1 is None or blob == spec.blob_sha1:
            return FetchResult(
                spec.name,
                "present",
                path,
                "present, hash verified" if spec.blob_sha1 else "present (no hash to check)",
            )
        if spec.url is None:
            return FetchResult(
                spec.name,
                "failed",
                path,
                f"{path} has blob {blob}, not the catalog's {spec.blob_sha1}: "
                "it was edited; the catalog's file is " + spec.origin,
            )
        return FetchResult(
            spec.name,
            "failed",
            path,
            f"{path} exists with blob {blob}, not the catalog's "
            f"{spec.blob_sha1}; pass --force to replace it with a fresh download",
        )
    if spec.url is None:
        return FetchResult(
            spec.name,
            "failed",
            path,
            f"{path} is missing and cannot be downloaded: no upstream file has "
            f"its bytes. It is {spec.origin}. Copy it from another data "
            "directory or write it at that path",
        )

    unreachable: list[str] = []
    failures: list[str] = []
    for url in spec.urls:
        try:
            data = download(url, timeout=timeout, label=spec.name)
        except urllib.error.HTTPError as e:
            failures.append(f"{url}: HTTP {e.code} {e.reason}")
            continue
        except _Unreachable as e:
            unreachable.append(f"{url} ({e})")
            continue
        if spec.gzipped:
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as e:
                failures.append(f"{url}: not a gzip file ({e})")
                continue
        blob = git_blob_sha1_bytes(data)
        if spec.blob_sha1 is not None and blob != spec.blob_sha1:
            failures.append(
                f"{url}: content has blob {blob}, expected {spec.blob_sha1}"
                + (f" ({spec.origin})" if spec.origin else "")
            )
            continue
        try:
            write_bytes_atomic(path, data)
        except OSError as e:
            return FetchResult(spec.name, "failed", path, f"cannot write {path}: {e}")
        return FetchResult(spec.name, "downloaded", path, f"downloaded from {url}, hash verified")

    parts = []
    if unreachable:
        hosts = sorted({urlsplit(u.split(" ", 1)[0]).netloc for u in unreachable})
        parts.append(
            f"cannot reach {'; '.join(unreachable)}: this machine has no network "
            f"access (or {', '.join(hosts)} is unreachable from it)"
        )
    parts.extend(failures)
    return FetchResult(
        spec.name,
        "failed",
        path,
        f"{'; '.join(parts)}. Nothing was written; download the file elsewhere, "
        f"copy it to {path}, and check it with `emmoe data list`",
    )


def fetch_datasets(
    specs: Iterable[DatasetSpec],
    data_dir: Path,
    *,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[FetchResult]:
    """Fetch each dataset in turn; a failure is reported in its result and the rest go on."""
    return [fetch_dataset(s, data_dir, force=force, timeout=timeout) for s in specs]
