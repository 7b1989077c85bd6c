"""A content-addressed judgment cache on disk.

The key hashes the judge's identity (kind, model, server, template, sampling settings)
with the exact request and its repeat index, so a reply is reused only for the same
question asked the same way. Entries are appended as replies arrive: a crash or a re-run
never pays twice for a reply it already has. Only replies that parsed are stored, so a
malformed reply is asked again rather than served from the cache.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from nash.records import repair_jsonl


def cache_key(identity: dict, request: object, repeat: int = 0) -> str:
    blob = json.dumps({"judge": identity, "request": request, "repeat": repeat}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def judgment_cache(identity: dict) -> JudgmentCache:
    """The cache of the judge whose replies `identity` determines, under nash's cache directory."""
    from nash.policy import cache_dir

    return JudgmentCache(cache_dir() / "judgments" / f"{cache_key(identity, None)[:16]}.jsonl")


class JudgmentCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if self.path.is_file():
            repair_jsonl(self.path)  # else the next entry would be appended to a line cut short
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash; its reply is simply asked again
                    self._entries[entry["key"]] = entry["reply"]

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def put(self, key: str, reply: dict) -> None:
        with self._lock:
            self._entries[key] = reply
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}) + "\n")
                f.flush()

    def __len__(self) -> int:
        return len(self._entries)
