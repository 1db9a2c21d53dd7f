"""The records as Arrow rows: one schema and one conversion pair, for Parquet and for Ray batches.

``to_table(results, provenance)`` and ``from_table(table)`` are the only conversion between
:class:`~pipeline.records.ImageResult` and Arrow. The Parquet sink writes ``to_table``'s output;
the Ray job's stages pass the same tables between actors, with the decoded pixels in two extra
columns (``pixels``, ``pixel_shape``) while an image is between stages.

Schema ``roiscribe/2`` (plain Arrow types: lists of structs, no extension types, so pandas,
DuckDB, Polars and HF datasets read it without custom code). Boxes are ``[x1, y1, x2, y2]`` in
pixels of the original (EXIF-rotated) image, and normalised by width and height. Log-probs are
the mean and min token log-prob of the answer (higher is more confident); ``probability`` the
calibrated probability of being right (``pipeline.calibrate``; null without a calibration).
``roiscribe/2`` added the ``probability`` fields: a ``roiscribe/1`` part read with ``schema=SCHEMA``
has them null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from .records import OK, Answer, DecodedImage, ImageResult, Regions, RelationAnswer

SCHEMA_VERSION = "roiscribe/2"
IN_PROCESS = "in-process"

ANSWER = pa.struct([
    ("name", pa.string()), ("value", pa.string()), ("raw", pa.string()), ("status", pa.string()),
    ("mean_logprob", pa.float32()), ("min_logprob", pa.float32()), ("probability", pa.float32()),
])
REGION = pa.struct([
    ("region_id", pa.int32()),
    ("box", pa.list_(pa.float32())),
    ("box_norm", pa.list_(pa.float32())),
    ("label", pa.string()),
    ("class_id", pa.int64()),
    ("score", pa.float32()),
    ("probability", pa.float32()),  # calibrated: a real object of its class (null without a calibration)
    ("caption", pa.string()),
    ("caption_mean_logprob", pa.float32()),
    ("caption_min_logprob", pa.float32()),
    ("answers", pa.list_(ANSWER)),  # every answer of the region: caption, colour, shape...
])
RELATION = pa.struct([
    ("subject", pa.int32()), ("predicate", pa.string()), ("object", pa.int32()), ("raw", pa.string()),
    ("status", pa.string()), ("mean_logprob", pa.float32()), ("min_logprob", pa.float32()),
    ("probability", pa.float32()),
])
TIMINGS = pa.struct([("decode_s", pa.float64()), ("detect_s", pa.float64()), ("describe_s", pa.float64())])
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
    ("timings", TIMINGS),
    ("dropped", pa.string()),  # JSON: boxes removed by post-processing, by reason
    ("processed_by", pa.string()),  # "in-process" or the Ray node id that described the image
], metadata={"roiscribe.schema": SCHEMA_VERSION})
# Between stages of a Ray job: the decoded RGB pixels, row-major uint8, and their (H, W, 3) shape.
IN_FLIGHT = SCHEMA.append(pa.field("pixels", pa.large_binary())).append(pa.field("pixel_shape", pa.list_(pa.int32())))
_STAGES = ("decode", "detect", "describe")


@dataclass(frozen=True)
class Provenance:
    """What made a row: the detector and model specs and the question templates' version."""

    detector: str = ""
    model: str = ""
    templates_version: str = ""


def to_table(results: Sequence[ImageResult], provenance: Provenance = Provenance(),
             processed_by: str = IN_PROCESS, pixels: bool = False) -> pa.Table:
    """Rows of :data:`SCHEMA` (pure); with ``pixels``, of :data:`IN_FLIGHT` (the decoded images too)."""
    rows = [result_to_row(r, provenance, processed_by) for r in results]
    if not pixels:
        return pa.Table.from_pylist(rows, schema=SCHEMA)
    for row, r in zip(rows, results):
        row["pixels"] = r.image.array.tobytes() if r.image is not None else None
        row["pixel_shape"] = list(r.image.array.shape) if r.image is not None else None
    return pa.Table.from_pylist(rows, schema=IN_FLIGHT)


def from_table(table: pa.Table) -> list[ImageResult]:
    """The records of rows written by :func:`to_table` (pixels restored when present)."""
    return [row_to_result(row) for row in table.to_pylist()]


def result_to_row(result: ImageResult, provenance: Provenance = Provenance(), processed_by: str = IN_PROCESS) -> dict:
    """One record as a row of :data:`SCHEMA` (an error row has no regions or relations)."""
    ok = result.status == OK
    r = result.regions
    w, h = max(result.width, 1), max(result.height, 1)
    regions = []
    for i in range(len(r) if ok else 0):
        answers = result.answers[i] if i < len(result.answers) else {}
        caption = answers.get("caption")
        x1, y1, x2, y2 = (float(v) for v in r.boxes[i])
        regions.append({
            "region_id": i, "box": [x1, y1, x2, y2], "box_norm": [x1 / w, y1 / h, x2 / w, y2 / h],
            "label": r.class_names[i], "class_id": int(r.class_ids[i]), "score": float(r.scores[i]),
            "probability": result.region_probabilities[i] if i < len(result.region_probabilities) else None,
            "caption": caption.value if caption else None,
            "caption_mean_logprob": caption.mean_logprob if caption else None,
            "caption_min_logprob": caption.min_logprob if caption else None,
            "answers": [{"name": name, "value": a.value, "raw": a.raw, "status": a.status,
                         "mean_logprob": a.mean_logprob, "min_logprob": a.min_logprob, "probability": a.probability}
                        for name, a in answers.items()],
        })
    relations = [{"subject": rel.subject, "predicate": rel.predicate, "object": rel.object, "raw": rel.raw,
                  "status": rel.status, "mean_logprob": rel.mean_logprob, "min_logprob": rel.min_logprob,
                  "probability": rel.probability}
                 for rel in (result.relations if ok else [])]
    return {
        "image_id": result.image_id, "uri": result.uri, "width": result.width, "height": result.height,
        "status": result.status, "error": result.error, "num_regions": len(regions), "regions": regions,
        "relations": relations, "detector": provenance.detector, "model": provenance.model,
        "templates_version": provenance.templates_version,
        "timings": {f"{s}_s": result.timings.get(s) for s in _STAGES},
        "dropped": json.dumps(r.dropped if ok else {}),
        "processed_by": processed_by,
    }


def row_to_result(row: dict) -> ImageResult:
    """The record of one row (the inverse of :func:`result_to_row`; floats as Arrow stored them)."""
    regions = row.get("regions") or []
    boxes = np.array([g["box"] for g in regions], np.float32).reshape(-1, 4)
    found = Regions(boxes, [g["score"] for g in regions], [g["class_id"] for g in regions],
                    [g["label"] for g in regions], row.get("detector") or "", json.loads(row.get("dropped") or "{}"))
    answers = [{a["name"]: Answer(a["value"], a["raw"], a["status"], a["mean_logprob"], a["min_logprob"],
                                  a.get("probability")) for a in g["answers"] or []} for g in regions]
    relations = [RelationAnswer(x["subject"], x["predicate"], x["object"], x["raw"], x["status"],
                                x["mean_logprob"], x["min_logprob"], x.get("probability"))
                 for x in row.get("relations") or []]
    timings = {s: t for s in _STAGES if (t := (row.get("timings") or {}).get(f"{s}_s")) is not None}
    result = ImageResult(row["image_id"], row["uri"], row["status"], row["error"] or "", row["width"] or 0,
                         row["height"] or 0, found, answers, relations, timings)
    if any(g.get("probability") is not None for g in regions):
        result.region_probabilities = [g.get("probability") for g in regions]
    if row.get("pixels") is not None:
        array = np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_shape"]).copy()  # writable, owned
        result.image = DecodedImage(result.image_id, result.uri, array)
    return result
