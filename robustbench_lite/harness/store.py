"""SQLite results store: one row per cell, keyed by the cell's config hash.

WAL mode, one writer.  A cell whose key is stored with status ``ok`` is skipped on rerun, so a
killed run resumes where it stopped; a cell that raised is stored with its error (and retried
on the next run).  Each evasion cell also keeps its per-point robust mask, so worst cases can be
recomputed without rerunning finished attacks.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .rows import CellResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    row TEXT NOT NULL,
    mask BLOB,
    updated REAL NOT NULL
)
"""


def pack_mask(mask: Tensor) -> bytes:
    return np.packbits(mask.cpu().numpy().astype(np.uint8)).tobytes()


def unpack_mask(blob: bytes, n: int) -> Tensor:
    bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


class Store:
    """``Store(path)``; ``put(row, mask)``, ``get(key)``, ``rows()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, row: CellResult, mask: Tensor | None = None) -> None:
        """Insert or replace a cell's row (committed at once: a kill loses nothing stored)."""
        blob = pack_mask(mask) if mask is not None else None
        self._db.execute(
            "INSERT OR REPLACE INTO cells (key, status, row, mask, updated) VALUES (?, ?, ?, ?, ?)",
            (row.key, row.status, json.dumps(row.as_row(), sort_keys=True), blob, time.time()),
        )
        self._db.commit()

    def get(self, key: str) -> tuple[CellResult, Tensor | None] | None:
        cur = self._db.execute("SELECT row, mask FROM cells WHERE key = ?", (key,))
        hit = cur.fetchone()
        if hit is None:
            return None
        row = CellResult.from_row(json.loads(hit[0]))
        mask = unpack_mask(hit[1], row.n) if hit[1] is not None else None
        return row, mask

    def done(self, key: str) -> bool:
        cur = self._db.execute("SELECT status FROM cells WHERE key = ?", (key,))
        hit = cur.fetchone()
        return hit is not None and hit[0] == "ok"

    def rows(self) -> list[CellResult]:
        cur = self._db.execute("SELECT row FROM cells ORDER BY key")
        return [CellResult.from_row(json.loads(r[0])) for r in cur.fetchall()]

    def merge_from(self, other: str | Path) -> int:
        """Copy the cells of the store at ``other`` into this one (runs split across machines or
        processes, each with its own workdir).  A finished (``ok``) cell replaces whatever is
        here; an error row is copied only where this store has nothing for that key.  Returns
        the number of rows copied."""
        other = Path(other)
        if not other.is_file():
            raise ValueError(f"no results store at {other}: pass a workdir's store.sqlite")
        before = self._db.total_changes
        self._db.execute("ATTACH DATABASE ? AS src", (str(other),))
        try:
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO cells SELECT * FROM src.cells WHERE status = 'ok'")
                self._db.execute(
                    "INSERT OR IGNORE INTO cells SELECT * FROM src.cells WHERE status != 'ok'"
                )
        finally:
            self._db.execute("DETACH DATABASE src")
        return self._db.total_changes - before

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM cells").fetchone()[0])
