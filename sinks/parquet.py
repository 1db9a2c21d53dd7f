"""Parquet output: one row per input image, one declared schema, atomic part files, resume.

Layout of an output folder::

    OUT/data/part-000001-1a2b3c4d.parquet   rows, written whole or not at all (tmp + rename)
    OUT/manifest.json                       schema version, config, versions, counts

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

__all__ = ["SCHEMA", "SCHEMA_VERSION", "ParquetSink", "part_files", "read_rows", "reconcile", "remove_ids", "statuses"]


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
        name = f"part-{seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.data / f".{name}.tmp"
        pq.write_table(rows, tmp)
        os.replace(tmp, self.data / name)  # atomic: a part exists whole or not at all
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
    """image_id -> status of the rows already written (reads two columns only)."""
    table = read_rows(out, ["image_id", "status"])
    return dict(zip(table.column("image_id").to_pylist(), table.column("status").to_pylist()))


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
        tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(table.filter(pa.array(keep)), tmp)
        os.replace(tmp, part)
    return removed
