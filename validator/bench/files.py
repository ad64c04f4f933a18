"""Durable files of a bench run: append-only JSONL logs and atomic rewrites."""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlLog:
    """An append-only JSONL file of objects keyed by `key` (the last line of a key wins).
    Each append is flushed and fsync'd before it returns. A torn last line (the process
    was killed mid-write) is cut off when the file is opened again."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        self.torn = 0
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                self.torn = 1
                with path.open("r+b") as fh:
                    fh.truncate(end)
                    fh.flush()
                    os.fsync(fh.fileno())
            for line in data[:end].splitlines():
                try:
                    row = json.loads(line)
                    self.rows[row["key"]] = row
                except (ValueError, KeyError, TypeError):
                    self.torn += 1
        self._fh = path.open("ab")

    def append(self, row: dict) -> None:
        self._fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows[row["key"]] = row

    def close(self) -> None:
        self._fh.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
