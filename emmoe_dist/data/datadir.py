"""Where the datasets live: a folder outside the repository, named by a flag or the environment.

The EM datasets are never committed (their authors keep them away from scrapers), so every
command takes `--data-dir` and falls back to `$EMMOE_DATA_DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path

from emmoe_dist.catalog import FileCheck, check_file, get_dataset, require_verified
from emmoe_dist.config import DATA_DIR_ENV
from emmoe_dist.errors import EmmoeError


def resolve_data_dir(
    explicit: str | os.PathLike[str] | None = None, *, create: bool = False
) -> Path:
    """The data directory: `explicit` (a flag) first, then `$EMMOE_DATA_DIR`.

    `create=True` makes the folder (for `emmoe data fetch`); otherwise it must exist.
    """
    raw = os.fspath(explicit) if explicit is not None else os.environ.get(DATA_DIR_ENV)
    how = f"pass --data-dir DIR or set {DATA_DIR_ENV}=DIR, then run `emmoe data fetch`"
    if not raw:
        raise EmmoeError(f"no data directory given: {how}")
    path = Path(raw).expanduser()
    source = "--data-dir" if explicit is not None else f"${DATA_DIR_ENV}"
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EmmoeError(f"cannot create the data directory {path} ({source}): {e}") from None
    elif not path.is_dir():
        raise EmmoeError(f"the data directory {path} ({source}) does not exist: {how}")
    return path


def dataset_path(name: str, data_dir: Path, *, allow_unverified: bool = False) -> Path:
    """The file of catalog dataset `name`, checked against the catalog's hash: an error that
    says how to get it when it is absent, and how to restore it (or use it anyway) when its
    bytes are not the catalog's."""
    return verified_dataset(name, data_dir, allow_unverified=allow_unverified).path


def verified_dataset(name: str, data_dir: Path, *, allow_unverified: bool = False) -> FileCheck:
    """`dataset_path` with the check's result (expected and actual hash) for the outputs."""
    spec = get_dataset(name)
    path = data_dir / spec.relpath
    if path.is_file():
        return require_verified(check_file(spec, path), allow_unverified=allow_unverified)
    if spec.url is None:
        raise EmmoeError(
            f"dataset {name!r} is missing: expected {path}; it cannot be downloaded, it is "
            f"{spec.origin}"
        )
    raise EmmoeError(
        f"dataset {name!r} is missing: expected {path}; "
        f"run `emmoe data fetch --only {name} --data-dir {data_dir}`"
    )
