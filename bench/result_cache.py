"""Bench results kept on disk by key, so that a rerun only computes what changed (the anchors' k-means with
one cluster per label dominates a cold run).

A key holds everything a result depends on that the bench controls: the data file's hash, the split, the
budget, the seed, the strategy's resolved settings. It does not hold the code: ``--fresh`` recomputes all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


class ResultCache:
    def __init__(self, path: Path, fresh: bool = False):
        self.path = path
        self._rows: dict[str, Any] = {}
        if path.is_file() and not fresh:
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self._rows[row["key"]] = row["value"]

    def get(self, key: str) -> Optional[Any]:
        return self._rows.get(key)

    def put(self, key: str, value: Any) -> None:
        self._rows[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"key": key, "value": value}) + "\n")
