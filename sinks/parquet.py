"""Parquet output: one row per input image, one declared schema, atomic part files, resume.

Layout of an output folder::

    OUT/data/part-000001-1a2b3c4d5e6f7a8b.parquet   rows, written whole or not at all (tmp, fsync, rename)
    OUT/manifest.json                               schema version, config, versions, counts (written atomically)
    OUT/.lock                                       held by the one job writing the folder (who, since when)
    OUT/corrupt/                                    parts found unreadable (e.g. 0 bytes after a power loss), set aside

A part is its own commit record: its footer holds the counts of its rows (``roiscribe.commit``:
rows, ok, error, regions, who wrote it), written in the same atomic rename as the rows, so a
manifest's counts come from footers alone and a crash never leaves a record without its rows.
A part's name is ``part-SEQ-DIGEST``: ``SEQ`` orders the writes (a later part wins when an image
has rows in two), ``DIGEST`` is a hash of its image ids, so a writer that is retried on the same
rows (a Ray task whose worker died after the rename) replaces its own part instead of adding one.

Resume never loads the rows: :func:`scan` reads the ``image_id`` and ``status`` columns one part
at a time into an :class:`OutputIndex`, two sorted arrays of 64-bit id hashes (8 bytes per image),
which a job filters its source against block by block (in a Ray worker: the index travels through
the object store, never through the driver).

The schema and the record <-> row conversion live beside the records, in ``pipeline.arrow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.arrow import SCHEMA, SCHEMA_VERSION

__all__ = ["SCHEMA", "SCHEMA_VERSION", "OutputIndex", "OutputLock", "OutputLockedError", "ParquetSink",
           "commit_part", "committed_counts", "id_hashes", "part_files", "read_commit", "read_rows", "reconcile",
           "remove_ids", "scan", "set_aside_corrupt_parts", "statuses", "write_atomic"]
LOCK_FILE = ".lock"
CORRUPT_DIR = "corrupt"
COMMIT_KEY = b"roiscribe.commit"


class OutputLockedError(RuntimeError):
    """Another job is writing the same output folder."""


class OutputLock:
    """An exclusive lock on an output folder for the life of a job (``fcntl.flock`` on ``OUT/.lock``,
    released by the kernel if the process dies). The file says who holds it, so a second job is
    refused with the holder's pid, host, command and start time."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl
        import socket
        import sys
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(f"{self.path.parent} is being written by another job ({holder}); wait for it "
                                    "to finish or choose another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or keeps its old content: a unique tmp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_record(table: pa.Table, written_by: str) -> dict:
    ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
    regions = pc.sum(table.column("num_regions")).as_py() or 0
    return {"rows": table.num_rows, "ok": ok, "error": table.num_rows - ok, "regions": regions,
            "written_by": written_by}


def _write_part(table: pa.Table, target: Path, written_by: str = "") -> dict:
    """A part file whole or not at all, durable once renamed (fsync of the file, then the folder),
    its commit record in its footer. Returns the record."""
    record = _commit_record(table, written_by)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), COMMIT_KEY: json.dumps(record).encode()})
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return {**record, "part": target.name}


def part_name(seq: int, image_ids: list[str]) -> str:
    """``part-SEQ-DIGEST.parquet``: the digest names the rows' ids, so rewriting the same rows
    (a retried writer) lands on the same file."""
    digest = hashlib.blake2b("\n".join(image_ids).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"part-{seq:06d}-{digest}.parquet"


def commit_part(data: str | Path, seq: int, rows: pa.Table, written_by: str = "") -> dict:
    """Write ``rows`` (of :data:`SCHEMA`; extra columns left out) as one committed part of write
    sequence ``seq`` in the folder ``data``; returns its commit record (part, rows, ok, error, regions,
    written_by). Safe to repeat: the same rows give the same file."""
    rows = rows.select(SCHEMA.names).cast(SCHEMA)
    return _write_part(rows, Path(data) / part_name(seq, rows.column("image_id").to_pylist()), written_by)


class ParquetSink:
    """Writes rows to ``OUT/data`` as committed parts of ``rows_per_part`` rows, each renamed into
    place once complete (each a later write sequence than every part already there)."""

    def __init__(self, out: str | Path, rows_per_part: int = 1000, on_commit=None):
        self.data = Path(out) / "data"
        self.rows_per_part = rows_per_part
        self.on_commit = on_commit  # called with each part's commit record once the part is in place
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._seq = 0
        self.written = 0

    def __enter__(self) -> "ParquetSink":
        self.data.mkdir(parents=True, exist_ok=True)
        self._seq = next_part_number(self.data)
        return self

    def write(self, rows: pa.Table | Iterable[dict]) -> None:
        """Rows of :data:`SCHEMA`: a table (extra columns, such as in-flight pixels, are left out) or
        row dicts (missing columns are null)."""
        if isinstance(rows, pa.Table):
            rows = rows.select(SCHEMA.names).cast(SCHEMA)
        else:
            rows = pa.Table.from_pylist(list(rows), schema=SCHEMA)
        self._pending.append(rows)
        self._pending_rows += rows.num_rows
        while self._pending_rows >= self.rows_per_part:
            table = pa.concat_tables(self._pending)
            self._flush(table.slice(0, self.rows_per_part))
            rest = table.slice(self.rows_per_part)
            self._pending, self._pending_rows = [rest], rest.num_rows

    def flush(self) -> None:
        if self._pending_rows:
            self._flush(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def __exit__(self, *exc) -> None:
        self.flush()  # rows handed over are written even when the job stops on an error

    def _flush(self, rows: pa.Table) -> None:
        record = commit_part(self.data, self._seq, rows)
        self._seq += 1
        self.written += rows.num_rows
        if self.on_commit is not None:
            self.on_commit(record)


def part_files(out: str | Path) -> list[Path]:
    """The parts of an output folder, oldest write first."""
    data = Path(out) / "data"
    return sorted(data.glob("part-*.parquet")) if data.is_dir() else []


def next_part_number(data: Path) -> int:
    numbers = [int(p.name.split("-")[1]) for p in data.glob("part-*.parquet")]
    return max(numbers, default=0) + 1


def read_rows(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of an output folder (an empty table of the schema when there are none). Holds them
    all in memory: for tests, previews and small outputs; a job reads through :func:`scan`."""
    parts = part_files(out)
    if not parts:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables([pq.read_table(p, columns=columns, schema=SCHEMA) for p in parts])


def statuses(out: str | Path) -> dict[str, str]:
    """image_id -> status of the rows already written (where an id has several rows, the newest
    part's). A dict of every image: for tests and small outputs."""
    table = read_rows(out, ["image_id", "status"])
    return dict(zip(table.column("image_id").to_pylist(), table.column("status").to_pylist()))


def row_count(out: str | Path) -> int:
    """Rows in the output folder's parts (from the footers, nothing else read)."""
    return sum(pq.read_metadata(p).num_rows for p in part_files(out))


def read_commit(part: Path) -> dict:
    """A part's commit record (from its footer; counted from its status column for parts written
    before parts carried one)."""
    meta = pq.read_metadata(part)
    raw = (meta.metadata or {}).get(COMMIT_KEY)
    if raw is not None:
        return json.loads(raw)
    return _commit_record(pq.read_table(part, columns=["status", "num_regions"]), "")


def committed_counts(out: str | Path) -> dict:
    """Rows, ok, error and regions of an output folder, summed over its parts' commit records
    (footers only: a few KB read per part)."""
    total = {"rows": 0, "ok": 0, "error": 0, "regions": 0}
    for part in part_files(out):
        record = read_commit(part)
        for key in total:
            total[key] += record.get(key, 0)
    return total


def set_aside_corrupt_parts(out: str | Path) -> list[Path]:
    """Move parts whose footer or schema cannot be read (a 0-byte file after a power loss, a
    truncated copy) to ``OUT/corrupt/``; their images count as not done. Returns the new paths."""
    moved = []
    for part in part_files(out):
        try:
            names = pq.read_metadata(part).schema.names
            if "image_id" not in names or "status" not in names:
                raise ValueError("not a roiscribe part")
        except Exception:  # noqa: BLE001 -- whatever pyarrow raises for a broken file
            target = Path(out) / CORRUPT_DIR / part.name
            target.parent.mkdir(exist_ok=True)
            os.replace(part, target)
            moved.append(target)
    return moved


# The compact index of what an output holds -----------------------------------------------------------

def id_hashes(image_ids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """A stable 64-bit hash per image id (the same in every process and on every node)."""
    import pandas as pd  # a dependency of Ray Data; its hash_array is vectorised and seeded by a fixed key

    if isinstance(image_ids, (pa.Array, pa.ChunkedArray)):
        values = image_ids.to_numpy(zero_copy_only=False)
    else:
        values = np.asarray(image_ids, dtype=object)
    if not len(values):
        return np.empty(0, np.uint64)
    return pd.util.hash_array(values.astype(object), categorize=False)


@dataclass
class OutputIndex:
    """Which images an output already holds, as sorted, unique 64-bit id hashes (8 bytes per image):
    ``ok`` of rows with status ok, ``error`` of error rows. Two different ids share a hash with a
    probability of about n_new * n_done / 2**64 (1e-9 for a billion checks against 10M rows); such
    an image would be taken as done."""

    ok: np.ndarray
    error: np.ndarray
    rows: int = 0
    duplicates_removed: int = 0

    @classmethod
    def empty(cls) -> "OutputIndex":
        return cls(np.empty(0, np.uint64), np.empty(0, np.uint64))

    def classify(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(in ok rows, in error rows), one bool per hash."""
        return _member(self.ok, hashes), _member(self.error, hashes)


def _member(sorted_values: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    if not len(sorted_values):
        return np.zeros(len(hashes), bool)
    at = np.minimum(np.searchsorted(sorted_values, hashes), len(sorted_values) - 1)
    return sorted_values[at] == hashes


def scan(out: str | Path, repair: bool = True) -> OutputIndex:
    """Index an output folder, one part at a time (two columns read), after making every image
    appear once: where an id has rows in several parts (an error row replaced by a retry, a writer
    that died after its rename and was redone elsewhere, an id listed twice), the newest part's
    row is kept and the older parts are rewritten without it. ``repair=False`` (a dry run) writes
    nothing and skips unreadable parts. Memory: ~20 bytes per row."""
    removed = 0
    while True:
        parts = part_files(out)
        hashes, ok, owner = _index_columns(parts, skip_unreadable=not repair)
        order = np.argsort(hashes, kind="stable")  # stable: within a hash, parts oldest first
        hashes, ok, owner = hashes[order], ok[order], owner[order]
        repeated = hashes[1:] == hashes[:-1]
        if not repeated.any() or not repair:
            return OutputIndex(np.unique(hashes[ok]), np.unique(hashes[~ok]), len(hashes), removed)
        candidates = set(hashes[1:][repeated].tolist())
        suspects = sorted(set(owner[np.isin(hashes, list(candidates))].tolist()))
        dropped = _drop_older_copies([parts[i] for i in suspects], candidates)
        if not dropped:  # only different ids that share a hash: nothing to remove
            return OutputIndex(np.unique(hashes[ok]), np.unique(hashes[~ok]), len(hashes), removed)
        removed += dropped


def _index_columns(parts: list[Path], skip_unreadable: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hashes, ok, owner = [np.empty(0, np.uint64)], [np.empty(0, bool)], [np.empty(0, np.int32)]
    for n, part in enumerate(parts):
        try:
            table = pq.read_table(part, columns=["image_id", "status"])
        except Exception:  # noqa: BLE001 -- whatever pyarrow raises for a broken file (a job sets it aside first)
            if skip_unreadable:
                continue
            raise
        hashes.append(id_hashes(table.column("image_id")))
        ok.append(pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False).astype(bool))
        owner.append(np.full(table.num_rows, n, np.int32))
    return np.concatenate(hashes), np.concatenate(ok), np.concatenate(owner)


def _drop_older_copies(parts: list[Path], candidates: set[int]) -> int:
    """Among ``parts`` (oldest first), keep each candidate id's row in the newest part that has it
    (and its last row there); compares the ids themselves, so a shared hash removes nothing."""
    newest: dict[str, tuple[int, int]] = {}
    for n, part in enumerate(parts):
        ids = pq.read_table(part, columns=["image_id"]).column("image_id")
        for row in np.flatnonzero(np.isin(id_hashes(ids), list(candidates))):
            newest[ids[int(row)].as_py()] = (n, int(row))
    removed = 0
    for n, part in enumerate(parts):
        table = pq.read_table(part, schema=SCHEMA)
        ids = table.column("image_id").to_pylist()
        keep = [newest.get(i, (n, r)) == (n, r) for r, i in enumerate(ids)]
        if not all(keep):
            removed += keep.count(False)
            _rewrite(part, table.filter(pa.array(keep)))
    return removed


def _rewrite(part: Path, table: pa.Table) -> None:
    """A part with some rows removed (atomically; its commit record recounted; a part left empty goes)."""
    if table.num_rows:
        record = read_commit(part)
        _write_part(table, part, record.get("written_by", ""))
    else:
        os.remove(part)
        _fsync_dir(part.parent)


def reconcile(out: str | Path) -> int:
    """Make every image_id appear once (the newest part's row kept); returns the rows removed."""
    return scan(out).duplicates_removed


def remove_ids(out: str | Path, image_ids: set[str]) -> int:
    """Rewrite the parts holding rows of ``image_ids`` without them (each part atomically)."""
    removed = 0
    for part in part_files(out):
        table = pq.read_table(part, schema=SCHEMA)
        keep = [i not in image_ids for i in table.column("image_id").to_pylist()]
        if not all(keep):
            removed += keep.count(False)
            _rewrite(part, table.filter(pa.array(keep)))
    return removed
