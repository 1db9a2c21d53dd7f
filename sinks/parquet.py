"""Parquet output: one row per input image, one declared schema, atomic part files, resume.

Layout of an output folder::

    OUT/data/part-000001-1a2b3c4d.parquet   rows, written whole or not at all (tmp, fsync, rename)
    OUT/manifest.json                       schema version, config, versions, counts (written atomically)
    OUT/.lock                               held by the one job writing the folder (who, since when)
    OUT/corrupt/                            parts found unreadable (e.g. 0 bytes after a power loss), set aside

The schema and the record <-> row conversion live beside the records, in ``pipeline.arrow``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.arrow import SCHEMA, SCHEMA_VERSION

__all__ = ["SCHEMA", "SCHEMA_VERSION", "OutputLock", "OutputLockedError", "ParquetSink", "part_files", "read_rows",
           "reconcile", "remove_ids", "set_aside_corrupt_parts", "statuses", "write_atomic"]
LOCK_FILE = ".lock"
CORRUPT_DIR = "corrupt"


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
        import json
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


def _write_part(table: pa.Table, target: Path) -> None:
    """A part file whole or not at all, durable once renamed (fsync of the file, then the folder)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


class ParquetSink:
    """Writes rows to ``OUT/data`` as part files, each renamed into place once complete."""

    def __init__(self, out: str | Path, rows_per_part: int = 1000):
        self.data = Path(out) / "data"
        self.rows_per_part = rows_per_part
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.written = 0

    def __enter__(self) -> "ParquetSink":
        self.data.mkdir(parents=True, exist_ok=True)
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
        seq = next_part_number(self.data)
        _write_part(rows, self.data / f"part-{seq:06d}-{uuid.uuid4().hex[:8]}.parquet")
        self.written += rows.num_rows


def part_files(out: str | Path) -> list[Path]:
    data = Path(out) / "data"
    return sorted(data.glob("part-*.parquet")) if data.is_dir() else []


def next_part_number(data: Path) -> int:
    numbers = [int(p.name.split("-")[1]) for p in data.glob("part-*.parquet")]
    return max(numbers, default=0) + 1


def read_rows(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All rows of an output folder (an empty table of the schema when there are none)."""
    parts = part_files(out)
    if not parts:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables([pq.read_table(p, columns=columns, schema=SCHEMA) for p in parts])


def statuses(out: str | Path) -> dict[str, str]:
    """image_id -> status of the rows already written (reads two columns only; where an id has
    several rows, the newest part's)."""
    table = read_rows(out, ["image_id", "status"])
    return dict(zip(table.column("image_id").to_pylist(), table.column("status").to_pylist()))


def row_count(out: str | Path) -> int:
    """Rows in the output folder's parts (from the footers, nothing else read)."""
    return sum(pq.read_metadata(p).num_rows for p in part_files(out))


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


def reconcile(out: str | Path) -> int:
    """Make every image_id appear once: where an id is in several parts (a retried image whose
    old row was not yet removed when a job stopped), keep the row in the newest part and rewrite
    the older parts without it. Returns the number of rows removed."""
    newest: dict[str, Path] = {}
    for part in part_files(out):  # sorted by part number: later parts win
        for image_id in pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist():
            newest[image_id] = part
    return _rewrite_parts(out, lambda image_id, part: newest[image_id] == part)


def remove_ids(out: str | Path, image_ids: set[str]) -> int:
    """Rewrite the parts holding rows of ``image_ids`` without them (each part atomically)."""
    return _rewrite_parts(out, lambda image_id, part: image_id not in image_ids)


def _rewrite_parts(out: str | Path, keep_row) -> int:
    """Rewrite, atomically, each part that holds rows ``keep_row(image_id, part)`` rejects."""
    removed = 0
    for part in part_files(out):
        table = pq.read_table(part, schema=SCHEMA)
        keep = [keep_row(i, part) for i in table.column("image_id").to_pylist()]
        if all(keep):
            continue
        removed += keep.count(False)
        _write_part(table.filter(pa.array(keep)), part)
    return removed
