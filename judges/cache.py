"""A content-addressed judgment cache on disk.

The key hashes the judge's identity (kind, model, server, template, sampling settings)
with the exact request and its repeat index, so a reply is reused only for the same
question asked the same way. Each reply is committed as it arrives: a crash or a re-run
never pays twice for a reply it already has. Only replies that parsed are stored, so a
malformed reply is asked again rather than served from the cache.

The cache is one SQLite database per judge (WAL journal): a lookup reads one row through
the key's index, so starting a judge costs the same with ten replies cached or ten million,
and memory does not grow with the replies ever paid for. A committed reply survives the
process being killed. Several processes on one host may share it; keep it on a local disk
(NASH_CACHE), not on NFS, whose locks SQLite cannot trust.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


def cache_key(identity: dict, request: object, repeat: int = 0) -> str:
    blob = json.dumps({"judge": identity, "request": request, "repeat": repeat}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def judgment_cache(identity: dict) -> JudgmentCache:
    """The cache of the judge whose replies `identity` determines, under nash's cache directory."""
    from nash.policy import cache_dir

    return JudgmentCache(cache_dir() / "judgments" / f"{cache_key(identity, None)[:16]}.sqlite")


class JudgmentCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit: each reply is its own transaction, durable once put() returns.
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a killed process; fsync at checkpoints
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        self._import_jsonl(self.path.with_suffix(".jsonl"))

    def _import_jsonl(self, old: Path) -> None:
        """Replies cached by nash before the cache moved to SQLite, read once and set aside."""
        if not old.is_file():
            return
        with open(old, encoding="utf-8", errors="replace") as f, self._lock:
            self._db.execute("BEGIN")
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash; its reply is simply asked again
                self._db.execute("INSERT OR IGNORE INTO replies VALUES (?, ?)", (entry["key"], json.dumps(entry["reply"])))
            self._db.execute("COMMIT")
        old.rename(old.with_suffix(".jsonl.imported"))

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, reply: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, json.dumps(reply)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
