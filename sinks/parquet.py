"""Parquet output: one row per input image, one declared schema, atomic part files, resume.

Layout of an output folder::

    OUT/data/part-000001-1a2b3c4d.parquet   rows, written whole or not at all (tmp + rename)
    OUT/manifest.json                       schema version, config, versions, counts

Schema ``roiscribe/1`` (plain Arrow types: lists of structs, no extension types, so pandas,
DuckDB, Polars and HF datasets read it without custom code). Boxes are ``[x1, y1, x2, y2]`` in
pixels of the original (EXIF-rotated) image, and normalised by width and height.
Log-probs are the mean and min token log-prob of the answer (higher is more confident).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "roiscribe/1"

ANSWER = pa.struct([
    ("name", pa.string()), ("value", pa.string()), ("raw", pa.string()), ("status", pa.string()),
    ("mean_logprob", pa.float32()), ("min_logprob", pa.float32()),
])
REGION = pa.struct([
    ("region_id", pa.int32()),
    ("box", pa.list_(pa.float32())),
    ("box_norm", pa.list_(pa.float32())),
    ("label", pa.string()),
    ("class_id", pa.int64()),
    ("score", pa.float32()),
    ("caption", pa.string()),
    ("caption_mean_logprob", pa.float32()),
    ("caption_min_logprob", pa.float32()),
    ("answers", pa.list_(ANSWER)),  # every answer of the region: caption, colour, shape...
])
RELATION = pa.struct([
    ("subject", pa.int32()), ("predicate", pa.string()), ("object", pa.int32()), ("raw", pa.string()),
    ("status", pa.string()), ("mean_logprob", pa.float32()), ("min_logprob", pa.float32()),
])
SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", pa.string()),  # ok | error
    ("error", pa.string()),
    ("num_regions", pa.int32()),
    ("regions", pa.list_(REGION)),
    ("relations", pa.list_(RELATION)),
    ("detector", pa.string()),
    ("model", pa.string()),
    ("templates_version", pa.string()),
    ("timings", pa.struct([("decode_s", pa.float64()), ("detect_s", pa.float64()), ("describe_s", pa.float64())])),
    ("dropped", pa.string()),  # JSON: boxes removed by post-processing, by reason
    ("processed_by", pa.string()),  # "in-process" or the Ray node id that described the image
], metadata={"roiscribe.schema": SCHEMA_VERSION})


@dataclass(frozen=True)
class Provenance:
    detector: str
    model: str
    templates_version: str


def result_to_row(result, provenance: Provenance, processed_by: str = "in-process") -> dict:
    """A ``pipeline.ImageResult`` as a row of :data:`SCHEMA` (pure)."""
    regions = []
    r = result.regions
    for i in range(len(r) if result.status == "ok" else 0):
        answers = result.answers[i] if i < len(result.answers) else {}
        caption = answers.get("caption")
        x1, y1, x2, y2 = (float(v) for v in r.boxes[i])
        w, h = max(result.width, 1), max(result.height, 1)
        regions.append({
            "region_id": i, "box": [x1, y1, x2, y2], "box_norm": [x1 / w, y1 / h, x2 / w, y2 / h],
            "label": r.class_names[i], "class_id": int(r.class_ids[i]), "score": float(r.scores[i]),
            "caption": caption.value if caption else None,
            "caption_mean_logprob": caption.mean_logprob if caption else None,
            "caption_min_logprob": caption.min_logprob if caption else None,
            "answers": [{"name": name, "value": a.value, "raw": a.raw, "status": a.status,
                         "mean_logprob": a.mean_logprob, "min_logprob": a.min_logprob} for name, a in answers.items()],
        })
    relations = [{"subject": rel.subject, "predicate": rel.predicate, "object": rel.object, "raw": rel.raw,
                  "status": rel.status, "mean_logprob": rel.mean_logprob, "min_logprob": rel.min_logprob}
                 for rel in (result.relations if result.status == "ok" else [])]
    t = result.timings
    return {
        "image_id": result.image_id, "uri": result.uri, "width": result.width, "height": result.height,
        "status": result.status, "error": result.error, "num_regions": len(regions), "regions": regions,
        "relations": relations, "detector": provenance.detector, "model": provenance.model,
        "templates_version": provenance.templates_version,
        "timings": {"decode_s": t.get("decode"), "detect_s": t.get("detect"), "describe_s": t.get("describe")},
        "dropped": json.dumps(r.dropped if result.status == "ok" else {}),
        "processed_by": processed_by,
    }


class ParquetSink:
    """Writes rows to ``OUT/data`` as part files, each renamed into place once complete."""

    def __init__(self, out: str | Path, rows_per_part: int = 1000):
        self.data = Path(out) / "data"
        self.rows_per_part = rows_per_part
        self._pending: list[dict] = []
        self.written = 0

    def __enter__(self) -> "ParquetSink":
        self.data.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, rows: Iterable[dict]) -> None:
        self._pending.extend(rows)
        while len(self._pending) >= self.rows_per_part:
            self._flush(self._pending[: self.rows_per_part])
            self._pending = self._pending[self.rows_per_part:]

    def flush(self) -> None:
        if self._pending:
            self._flush(self._pending)
            self._pending = []

    def __exit__(self, *exc) -> None:
        self.flush()  # rows handed over are written even when the job stops on an error

    def _flush(self, rows: list[dict]) -> None:
        seq = next_part_number(self.data)
        name = f"part-{seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.data / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        os.replace(tmp, self.data / name)  # atomic: a part exists whole or not at all
        self.written += len(rows)


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
