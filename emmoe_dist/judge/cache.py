"""The judge's reply cache: a paid call is never made twice.

Key: sha256 of the canonical JSON of the full request body (model, messages, temperature,
logprobs, top_logprobs, max_tokens, ...), never the API key or base URL, so the same request to
the same model hits across runs, machines and endpoints serving that model.

Storage: one SQLite file in WAL mode. Chosen over append-only JSONL shards because a commit is
atomic (a crash never leaves half a reply), lookups are indexed instead of loading every shard,
and several judge processes can share one cache through SQLite's own file locking.
`synchronous=NORMAL` keeps commits cheap; in WAL mode it survives a process crash, and a power
loss can only drop the last few replies (paid again, never corrupted).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CACHE_FILE = "judge_cache.sqlite"
_KEY_VERSION = "chat-v1"  # bump if the key's definition changes


def cache_key(body: Mapping[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{_KEY_VERSION}\n{text}".encode()).hexdigest()


class JudgeCache:
    """Replies by request key. Not thread-safe: one event loop per process uses it."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CACHE_FILE
        # autocommit: every put is its own transaction, visible to other processes at once
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies ("
            "key TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL)"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, body: Mapping[str, Any]) -> None:
        # OR IGNORE: a concurrent run that stored the same reply first keeps it
        self._db.execute(
            "INSERT OR IGNORE INTO replies (key, body, created) VALUES (?, ?, ?)",
            (key, json.dumps(body, ensure_ascii=False), time.time()),
        )

    def __contains__(self, key: object) -> bool:
        row = self._db.execute("SELECT 1 FROM replies WHERE key = ?", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def keys(self) -> Iterator[str]:
        for (key,) in self._db.execute("SELECT key FROM replies"):
            yield key

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
