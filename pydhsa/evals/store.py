"""Resumable result storage: every finished case (or speed run) is one fsync'ed JSON line, keyed by its
parameters, so that an interrupted suite continues where it stopped."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union


def case_key(params: Dict[str, Any]) -> str:
    """Stable key of a case from its parameters (order-independent).

    Floats are rounded to 6 decimals so 0.1 and 0.10000000001 coincide.
    """

    def norm(v):
        if isinstance(v, float):
            return round(v, 6)
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    blob = json.dumps(norm(params), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


class ResultStore:
    """Append-only JSONL store of finished cases, for resumable benchmarks.

    Each record is a JSON object on its own line with a ``"key"`` field.  The
    key is ``case["key"]`` if present, else ``case_key`` of the ``key_fields``
    of the case (all fields if ``key_fields`` is None).  Every ``add`` is
    flushed and fsync'ed.  On load, unparsable lines are skipped and a torn
    (partial) last line left by an interruption is truncated away so later
    appends stay well-formed.  If a key is added twice, the last record wins.
    """

    def __init__(self, path: Union[str, Path], key_fields: Optional[Sequence[str]] = None):
        self.path = Path(path)
        self.key_fields = list(key_fields) if key_fields is not None else None
        self._records: Dict[str, Dict[str, Any]] = {}
        self.skipped_lines = 0
        self.load()

    def key_of(self, case: Union[str, Dict[str, Any]]) -> str:
        if isinstance(case, str):
            return case
        if "key" in case:
            return str(case["key"])
        if self.key_fields is not None:
            return case_key({k: case.get(k) for k in self.key_fields})
        return case_key(case)

    def load(self) -> List[Dict[str, Any]]:
        """(Re)read the file; returns the records (last one per key wins)."""
        self._records = {}
        self.skipped_lines = 0
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        body, sep, last = data.rpartition(b"\n")
        if not sep:  # no newline at all: the whole file is the last line
            body, last = b"", data
        for raw in body.split(b"\n") if body else []:
            rec = self._parse(raw)
            if rec is not None:
                self._records[str(rec["key"])] = rec
            elif raw.strip():
                self.skipped_lines += 1
        if last:
            # Line without a terminating newline: an interrupted write.
            rec = self._parse(last)
            with open(self.path, "r+b") as f:
                if rec is not None:  # complete record, only the newline is missing
                    self._records[str(rec["key"])] = rec
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:  # torn record: cut it off
                    if last.strip():
                        self.skipped_lines += 1
                    f.truncate(len(data) - len(last))
                f.flush()
                os.fsync(f.fileno())
        return list(self._records.values())

    @staticmethod
    def _parse(raw: bytes) -> Optional[Dict[str, Any]]:
        if not raw.strip():
            return None
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(rec, dict) or "key" not in rec:
            return None
        return rec

    def done(self, key: Union[str, Dict[str, Any]]) -> bool:
        return self.key_of(key) in self._records

    def get(self, key: Union[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        return self._records.get(self.key_of(key))

    def add(self, case: Dict[str, Any]) -> str:
        rec = dict(case)
        rec["key"] = self.key_of(case)
        line = json.dumps(rec, sort_keys=True, ensure_ascii=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self._records[rec["key"]] = rec
        return rec["key"]

    def records(self) -> List[Dict[str, Any]]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key) -> bool:
        return self.done(key)


def record_done(store: ResultStore, key: Union[str, Dict[str, Any]]) -> bool:
    """A case counts as done once it has a record without an error (failed cases are retried)."""
    rec = store.get(key)
    return rec is not None and not rec.get("error")
