"""SQLite results store: one row per cell, keyed by the cell's config hash.

WAL mode.  A cell whose key is stored with status ``ok`` is skipped on rerun, so a killed run
resumes where it stopped; a cell that raised is stored with its error (and retried on the next
run).  Each evasion cell also keeps its per-point robust mask, so worst cases can be recomputed
without rerunning finished attacks.

Two more tables make a group's evaluation resumable as a unit and safe to share:

* ``stages``: what a group's evaluation measured so far (an attack's plain record, a probe's
  flag, an adaptive rerun, an escalation step), so a run killed in the middle recomputes only
  what is missing.  The cells' rows are written together, in one transaction (:meth:`Store.put_many`),
  only once the whole evaluation is done: a cell is ``ok`` only with its flags, adaptive reruns and
  worst case stored.
* ``leases``: which run is working on a group (:meth:`Store.claim`), so two runs on one workdir do
  not compute the same cells; a lease whose holder died (same host, process gone) or that was
  not renewed within its timeout is taken over.

A damaged or unwritable store raises :class:`StoreError` naming the file and the choices.  A
single row that does not hold what a row must (a field of the wrong type, an accuracy outside
[0, 1], see :meth:`~robustbench_lite.harness.rows.CellResult.from_row`) is left out with a warning
and its cell recomputed by the next run, as a damaged model sidecar is retrained.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..training.cache import pid_alive
from .rows import FINISHED, CellResult

log = logging.getLogger(__name__)

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    row TEXT NOT NULL,
    mask BLOB,
    updated REAL NOT NULL
)
""",
    "CREATE TABLE IF NOT EXISTS stages (key TEXT PRIMARY KEY, payload TEXT NOT NULL, mask BLOB, n INTEGER, updated REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases (item TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL)",
)

LEASE_SECONDS = 600.0  # a lease not renewed for this long is taken over (holders renew every third of it)
Stage = tuple[dict[str, Any], Tensor | None]  # a stage's JSON payload and its per-point mask


class StoreError(RuntimeError):
    """The results store cannot be used (damaged, unwritable, not a database); the message
    names the file and what to do."""


def pack_mask(mask: Tensor) -> bytes:
    return np.packbits(mask.cpu().numpy().astype(np.uint8)).tobytes()


def unpack_mask(blob: bytes, n: int, where: str = "the store") -> Tensor:
    """A mask of ``n`` points from its packed bytes; a blob too short for ``n`` is damage."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < (n + 7) // 8:
        got = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else type(blob).__name__
        raise StoreError(
            f"{where}: a per-point mask is damaged ({got} bytes for {n} points). "
            + _CHOICES.format(path=where)
        )
    bits = np.unpackbits(np.frombuffer(bytes(blob), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


_CHOICES = (
    "Either move it aside (mv {path} {path}.bad) and rerun, which recomputes every cell (trained models are "
    "kept in the model cache), or restore it from a backup."
)


def _holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_dead(holder: str) -> bool:
    """A lease holder on this host whose process is gone (a holder elsewhere: unknown, False)."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    return not pid_alive(int(pid_text))


class Store:
    """``Store(path)``; ``put(row, mask)``, ``put_many(rows)``, ``get(key)``, ``rows()``; stages
    and leases (see the module docstring).  ``create=False`` refuses to make a new store (the
    ``leaderboard`` and ``report`` commands read an existing one)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        self.holder = _holder_id()
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._held: set[str] = set()
        self._damaged: set[str] = set()  # keys of damaged rows already warned about
        if not create and not self.path.is_file():
            raise FileNotFoundError(
                f"no results store at {self.path}: check --workdir (the folder a `robustbench-lite run` wrote), "
                "or run one first"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"cannot use {self.path.parent} as the workdir: a file is in the way; pick another --workdir") from None
        except PermissionError:
            raise StoreError(f"cannot create the workdir {self.path.parent}: permission denied; pick another --workdir") from None
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a results store; move it aside or pick another --workdir")
        with self._errors("open"):
            self._db = sqlite3.connect(str(self.path), timeout=30)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                for stmt in _SCHEMA:
                    self._db.execute(stmt)
                self._db.commit()
                self._db.execute("SELECT key, status, row, mask, updated FROM cells LIMIT 1").fetchall()
            except BaseException:
                self._db.close()
                raise

    # -- errors -------------------------------------------------------------------------------
    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """sqlite errors as one :class:`StoreError` naming the file and the way out (and, when
        reading, rows that do not parse)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "readonly" in text or "unable to open" in text or "disk I/O" in text:
                raise StoreError(
                    f"cannot {doing} the results store {self.path}: {text}; make the workdir writable or pick another --workdir"
                ) from None
            if "locked" in text or "busy" in text:
                raise StoreError(
                    f"the results store {self.path} stayed locked by another process for 30 s ({text}); "
                    "wait for it, or stop it"
                ) from None
            raise StoreError(f"the results store {self.path} is damaged ({text}). " + _CHOICES.format(path=self.path)) from None
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            if doing != "read":
                raise
            raise StoreError(
                f"the results store {self.path} holds a damaged row ({type(exc).__name__}: {exc}). "
                + _CHOICES.format(path=self.path)
            ) from None

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        try:
            self.release_all()
        except StoreError:
            pass
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cells --------------------------------------------------------------------------------
    def put(self, row: CellResult, mask: Tensor | None = None) -> None:
        """Insert or replace a cell's row (committed at once: a kill loses nothing stored)."""
        self.put_many([(row, mask)])

    def put_many(self, rows: Iterable[tuple[CellResult, Tensor | None]], drop_stages: str | None = None) -> None:
        """Insert or replace several rows in one transaction (all or none survive a kill);
        ``drop_stages`` also deletes the stages whose key starts with it (the evaluation they
        belonged to is now stored as rows)."""
        values = [
            (row.key, row.status, json.dumps(row.as_row(), sort_keys=True), pack_mask(mask) if mask is not None else None, time.time())
            for row, mask in rows
        ]
        with self._errors("write"), self._db:
            self._db.executemany("INSERT OR REPLACE INTO cells (key, status, row, mask, updated) VALUES (?, ?, ?, ?, ?)", values)
            if drop_stages:
                self._db.execute("DELETE FROM stages WHERE substr(key, 1, ?) = ?", (len(drop_stages), drop_stages))

    def _parse(self, key: str, text: Any) -> CellResult | None:
        """The stored row ``text`` of the cell ``key``, checked field by field
        (:meth:`CellResult.from_row`); a row that fails is left out with a warning (once), so its
        cell counts as not done and the next run recomputes it, as a damaged model sidecar is
        retrained."""
        try:
            row = CellResult.from_row(json.loads(text))
            if row.key != key:
                raise ValueError(f"it holds the row of cell {row.key!r}")
            return row
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            if key not in self._damaged:
                self._damaged.add(key)
                log.warning(
                    "the results store %s holds a damaged row for cell %s (%s); it is left out of the tables, "
                    "and the next run recomputes that cell", self.path, key, exc,
                )
            return None

    def get(self, key: str) -> tuple[CellResult, Tensor | None] | None:
        with self._errors("read"):
            hit = self._db.execute("SELECT row, mask FROM cells WHERE key = ?", (key,)).fetchone()
        if hit is None:
            return None
        row = self._parse(key, hit[0])
        if row is None:
            return None
        mask = unpack_mask(hit[1], row.n, str(self.path)) if hit[1] is not None else None
        return row, mask

    def done(self, key: str) -> bool:
        hit = self.get(key)
        return hit is not None and hit[0].status in FINISHED

    def rows(self) -> list[CellResult]:
        with self._errors("read"):
            found = self._db.execute("SELECT key, row FROM cells ORDER BY key").fetchall()
        return [row for key, text in found if (row := self._parse(key, text)) is not None]

    def merge_from(self, other: str | Path) -> int:
        """Copy the cells of the store at ``other`` into this one (runs split across machines or
        processes, each with its own workdir).  A finished (``ok`` or ``skipped``) cell replaces whatever is
        here; an error row is copied only where this store has nothing for that key.  Returns
        the number of rows copied."""
        other = Path(other)
        if not other.is_file():
            raise ValueError(f"no results store at {other}: pass a workdir's store.sqlite")
        before = self._db.total_changes
        with self._errors("merge into"):
            self._db.execute("ATTACH DATABASE ? AS src", (str(other),))
            try:
                with self._db:
                    done = ", ".join(f"'{s}'" for s in sorted(FINISHED))
                    self._db.execute(f"INSERT OR REPLACE INTO cells SELECT * FROM src.cells WHERE status IN ({done})")
                    self._db.execute(f"INSERT OR IGNORE INTO cells SELECT * FROM src.cells WHERE status NOT IN ({done})")
            finally:
                self._db.execute("DETACH DATABASE src")
        return self._db.total_changes - before

    def __len__(self) -> int:
        with self._errors("read"):
            return int(self._db.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    # -- stages -------------------------------------------------------------------------------
    def put_stage(self, key: str, payload: dict[str, Any], mask: Tensor | None = None) -> None:
        """Store one stage of an evaluation (committed at once)."""
        blob = pack_mask(mask) if mask is not None else None
        n = int(mask.numel()) if mask is not None else None
        with self._errors("write"), self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO stages (key, payload, mask, n, updated) VALUES (?, ?, ?, ?, ?)",
                (key, json.dumps(payload, sort_keys=True), blob, n, time.time()),
            )

    def stages(self, prefix: str) -> dict[str, Stage]:
        """Every stored stage whose key starts with ``prefix``, by key."""
        with self._errors("read"):
            cur = self._db.execute("SELECT key, payload, mask, n FROM stages WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
            found = cur.fetchall()
            out: dict[str, Stage] = {}
            for key, payload, blob, n in found:
                mask = unpack_mask(blob, int(n), str(self.path)) if blob is not None else None
                out[key] = (json.loads(payload), mask)
        return out

    # -- leases -------------------------------------------------------------------------------
    def claim(self, item: str, seconds: float = LEASE_SECONDS) -> bool:
        """Take the lease on ``item`` (a group) unless another live run holds it; renewed by a
        background thread while held.  Returns whether this store's run holds it now."""
        now = time.time()
        with self._errors("lease in"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                hit = self._db.execute("SELECT holder, expires FROM leases WHERE item = ?", (item,)).fetchone()
                free = hit is None or hit[0] == self.holder or hit[1] < now or _holder_dead(hit[0])
                if free:
                    self._db.execute(
                        "INSERT OR REPLACE INTO leases (item, holder, expires) VALUES (?, ?, ?)", (item, self.holder, now + seconds)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if free:
            self._held.add(item)
            self._start_heartbeat(seconds)
        return free

    def holder_of(self, item: str) -> str | None:
        """Who holds the lease on ``item`` now (``None``: nobody alive)."""
        with self._errors("read"):
            hit = self._db.execute("SELECT holder, expires FROM leases WHERE item = ?", (item,)).fetchone()
        if hit is None or hit[1] < time.time() or _holder_dead(hit[0]):
            return None
        return str(hit[0])

    def release(self, item: str) -> None:
        self._held.discard(item)
        with self._errors("lease in"), self._db:
            self._db.execute("DELETE FROM leases WHERE item = ? AND holder = ?", (item, self.holder))

    def release_all(self) -> None:
        for item in list(self._held):
            self.release(item)

    def _start_heartbeat(self, seconds: float) -> None:
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return

        def beat() -> None:  # its own connection: sqlite connections stay in their thread
            db = sqlite3.connect(str(self.path), timeout=30)
            try:
                while not self._stop.wait(seconds / 3):
                    held = list(self._held)
                    if held:
                        with db:
                            db.executemany(
                                "UPDATE leases SET expires = ? WHERE item = ? AND holder = ?",
                                [(time.time() + seconds, item, self.holder) for item in held],
                            )
            except sqlite3.Error:
                pass  # the main connection reports store problems
            finally:
                db.close()

        self._heartbeat = threading.Thread(target=beat, name="rbl-lease", daemon=True)
        self._heartbeat.start()
