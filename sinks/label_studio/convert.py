"""roiscribe rows <-> Label Studio results: pure functions, no server, nothing heavy imported.

Coordinates: a roiscribe box is pixel ``[x1, y1, x2, y2]`` of the original image. A Label Studio
rectangle is ``x``, ``y``, ``width``, ``height`` in percent of the original image
(``original_width`` / ``original_height``), rotated by ``rotation`` degrees clockwise about its
top-left corner. ``pixels_to_percent`` and ``percent_box_to_pixels`` are the only two places that
convert between them.

Region ``k`` of a row is Label Studio region id ``r{k}`` (shown as number k + 1): its rectangle,
caption text area, attribute choices and flags share the id, and relations link ids.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import parse_qs, quote, urlsplit

from sinks.label_studio.errors import TaskError
from sinks.label_studio.labeling import (
    CAPTION, CAPTION_ANSWERS, FLAGS, IMAGE, REGION, RELATION_LIST, ConfigSpec, flag_value,
)

IMAGE_MODES = ("local-files", "upload", "url")
LOCAL_FILES_PATH = "/data/local-files/"  # the server serves local files here, ?d=PATH under its document root
BOX_TOLERANCE = 0.5  # pixels a box may pass the image border by (float slack); it is then clipped


# Coordinates --------------------------------------------------------------------------------------

def pixels_to_percent(box: Sequence[float], width: float, height: float) -> dict:
    """A pixel ``[x1, y1, x2, y2]`` box as Label Studio geometry (percent of the image, unrotated)."""
    x1, y1, x2, y2 = box
    return {"x": 100.0 * x1 / width, "y": 100.0 * y1 / height, "width": 100.0 * (x2 - x1) / width,
            "height": 100.0 * (y2 - y1) / height, "rotation": 0}


def percent_box_to_pixels(result: dict, task_id=None) -> list[float]:
    """The pixel ``[x1, y1, x2, y2]`` envelope of one Label Studio rectangle result (percent
    units, rotated about its top-left corner); ``task_id`` only names the task in the error."""
    if "original_width" not in result or "original_height" not in result:
        where = f"Label Studio task {task_id}: a" if task_id is not None else "A Label Studio"
        raise ValueError(f"{where} rectangle result has no original_width/original_height, so its percent "
                         "coordinates cannot become pixels; export the project again as JSON")
    v, w_img, h_img = result["value"], float(result["original_width"]), float(result["original_height"])
    x, y = v["x"] / 100.0 * w_img, v["y"] / 100.0 * h_img
    w, h = v["width"] / 100.0 * w_img, v["height"] / 100.0 * h_img
    angle = math.radians(v.get("rotation", 0.0) or 0.0)
    if angle == 0.0:
        return [x, y, x + w, y + h]
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]  # relative to the top-left corner, y down
    xs = [x + cx * cos - cy * sin for cx, cy in corners]
    ys = [y + cx * sin + cy * cos for cx, cy in corners]
    return [min(xs), min(ys), max(xs), max(ys)]


# Rows -> prediction results -----------------------------------------------------------------------

def row_to_result(row: dict, spec: ConfigSpec, max_relations: int | None = None,
                  calibration=None) -> tuple[list[dict], float | None]:
    """The prediction ``result`` list and score of one ``ok`` row; raises ``TaskError`` for a row
    that would make an invalid prediction (a box outside the image, a relation to a missing
    region, a value the labeling config does not offer).

    Each region gives its rectangle (scored by the detector), caption and attribute choices (scored
    by the answer's confidence) and, when its box label disagrees with a compared answer, a flag
    (``pipeline.review``). At most ``max_relations`` relations (None: all), the most confident
    first, become Label Studio relations, and the same ones the image's read-only relation list
    when the config has it (``ConfigSpec.relation_list``).

    With a ``calibration`` (``pipeline.calibrate.Calibration``), or for a row a calibrated job
    wrote (its ``probability`` columns), every score is a calibrated probability of being right: a box's that it is a real object of its class, a caption's
    and a choice's that the answer is right, and the prediction's that the whole pre-annotation is
    right (the product over its boxes, captions, choices and relations), so that sorting tasks by
    prediction score in Label Studio puts the ones that most need a person first."""
    key = row["image_id"]
    w, h = row.get("width") or 0, row.get("height") or 0
    if w <= 0 or h <= 0:
        raise TaskError(key, f"image size {w}x{h} is not positive")
    result, labels, scores = [], {}, []
    for region in row.get("regions") or []:
        result += _region_results(key, region, spec, w, h)
        labels[f"r{region['region_id']}"] = region.get("label") or ""
        if region.get("score") is not None:
            scores.append(float(region["score"]))
    result += _relation_results(key, row.get("relations") or [], labels, spec, max_relations)
    if calibration is not None or _holds_probabilities(row):
        return _calibrated(row, result, calibration)
    return result, (sum(scores) / len(scores) if scores else None)


def _holds_probabilities(row: dict) -> bool:
    """Whether the row was written by a job run with a calibration (its regions have probabilities)."""
    return any(g.get("probability") is not None for g in row.get("regions") or [])


def _calibrated(row: dict, result: list[dict], calibration) -> tuple[list[dict], float]:
    """``result`` with each item's score the calibrated probability (``sinks.exports.decide``), and
    the probability that every item is right (their product)."""
    from sinks.exports import Policy, decide

    d = decide(row, Policy(min_probability={}), calibration)
    region = {f"r{g['region_id']}": g for g in d["regions"]}
    relation = {(f"r{x['subject']}", f"r{x['object']}", x["predicate"]): x["probability"] for x in d["relations"]}
    whole, out = 1.0, []
    for item in result:
        p = None
        if item["type"] == "relation":
            p = relation.get((item["from_id"], item["to_id"], item["labels"][0]))
        elif item.get("id") in region and item["from_name"] == REGION:
            p = region[item["id"]]["probability"]
        elif item.get("id") in region and item["from_name"] != FLAGS:
            name = "caption" if item["from_name"] == CAPTION else item["from_name"]
            p = (region[item["id"]]["answers"].get(name) or {}).get("probability")
        if p is not None:
            whole *= p
            if item["type"] != "relation":  # Label Studio's relations carry no score
                item = {**item, "score": p}
        out.append(item)
    return out, whole


def _region_results(key: str, region: dict, spec: ConfigSpec, w: int, h: int) -> list[dict]:
    """A region's rectangle, caption, attribute choices and flags, all under its id ``r{k}``."""
    from pipeline.review import confidence, label_disagreements

    rid = f"r{region['region_id']}"
    x1, y1, x2, y2 = region["box"]
    tol = BOX_TOLERANCE
    if not (-tol <= x1 < x2 <= w + tol and -tol <= y1 < y2 <= h + tol):
        raise TaskError(key, f"region {region['region_id']} box {[round(v, 1) for v in region['box']]} "
                             f"lies outside the {w}x{h} image")
    geometry = pixels_to_percent([max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))], w, h)
    base = {"id": rid, "to_name": IMAGE, "original_width": int(w), "original_height": int(h), "image_rotation": 0}
    label = region.get("label") or ""
    if label not in spec.classes:
        raise TaskError(key, f"region {region['region_id']} label {label!r} is not in the labeling config")
    rect = {**base, "from_name": REGION, "type": "rectanglelabels", "value": {**geometry, "rectanglelabels": [label]}}
    if region.get("score") is not None:
        rect["score"] = float(region["score"])
    out = [rect]
    if region.get("caption"):
        caption = {**base, "from_name": CAPTION, "type": "textarea", "value": {**geometry, "text": [region["caption"]]}}
        out.append(_scored(caption, confidence(region.get("caption_mean_logprob"), region.get("caption_min_logprob"))))
    said = {}
    for a in region.get("answers") or []:
        if a["name"] in CAPTION_ANSWERS or not a.get("value") or a["name"] not in spec.attributes:
            continue
        if a["value"] not in spec.attributes[a["name"]]:
            raise TaskError(key, f"region {region['region_id']} {a['name']} {a['value']!r} is not in the "
                                 "labeling config")
        said[a["name"]] = a["value"]
        choice = {**base, "from_name": a["name"], "type": "choices", "value": {**geometry, "choices": [a["value"]]}}
        out.append(_scored(choice, confidence(a.get("mean_logprob"), a.get("min_logprob"))))
    flags = [flag_value(a) for a in label_disagreements(label, said, spec.label_attributes)]
    if flags:
        out.append({**base, "from_name": FLAGS, "type": "choices", "value": {**geometry, "choices": flags}})
    return out


def _relation_results(key: str, relations: list[dict], labels: dict[str, str], spec: ConfigSpec,
                      max_relations: int | None) -> list[dict]:
    """The most confident ``max_relations`` parsed relations as Label Studio relations, plus the
    read-only list of them in words ("1 circle left of 3 star (0.98)": Label Studio numbers region
    ``r{k}`` as k + 1)."""
    from pipeline.review import confidence, top_relations

    parsed = [r for r in relations if r.get("predicate")]  # an unparsed answer stays in Parquet only
    for rel in parsed:
        a, b = f"r{rel['subject']}", f"r{rel['object']}"
        if a not in labels or b not in labels:
            raise TaskError(key, f"relation {rel['subject']} -{rel['predicate']}-> {rel['object']} names a region "
                                 f"the row does not have (regions {sorted(int(i[1:]) for i in labels)})")
        if rel["predicate"] not in spec.predicates:
            raise TaskError(key, f"relation predicate {rel['predicate']!r} is not in the labeling config")
    confidences = [confidence(r.get("mean_logprob"), r.get("min_logprob")) for r in parsed]
    kept = top_relations(list(zip(parsed, confidences)), confidences, max_relations)
    out, lines = [], []
    for rel, conf in kept:
        a, b = f"r{rel['subject']}", f"r{rel['object']}"
        out.append({"type": "relation", "from_id": a, "to_id": b, "direction": "right", "labels": [rel["predicate"]]})
        lines.append(relation_line(rel["subject"], labels[a], rel["predicate"], rel["object"], labels[b], conf))
    if lines and spec.relation_list:  # image-level, read-only: one line per relation
        out.append({"id": RELATION_LIST, "from_name": RELATION_LIST, "to_name": IMAGE, "type": "textarea",
                    "readonly": True, "value": {"text": lines}})
    return out


def relation_line(subject: int, subject_label: str, predicate: str, obj: int, object_label: str,
                  conf: float | None) -> str:
    """A relation in words with the region numbers annotators see (region k is number k + 1)."""
    text = " ".join(f"{subject + 1} {subject_label} {predicate} {obj + 1} {object_label}".split())
    return text + (f" ({conf:.2f})" if conf is not None else "")


def _scored(item: dict, score: float | None) -> dict:
    return {**item, "score": score} if score is not None else item


def model_version_of(rows: Sequence[dict]) -> str:
    """A model version from the rows' provenance, for an output whose manifest has no fingerprints
    (``model_version_from_manifest``): the model's and the detector's readable names, the question
    templates' version and a short hash of the three specs (two models with the same file names in
    other folders are two versions), e.g. ``roiscribe model-gpt4roi detector-yolo-best templates-v1
    @1a2b3c4d``."""
    if not rows:
        return "roiscribe"
    r = rows[0]
    model, detector, templates = (str(r.get(k) or "") for k in ("model", "detector", "templates_version"))
    if not (model or detector or templates):
        return "roiscribe"
    digest = hashlib.sha256(f"{model}\n{detector}\n{templates}".encode()).hexdigest()[:VERSION_HASH_CHARS]
    parts = ["roiscribe", f"model-{_spec_name(model or 'unknown')}", f"detector-{_spec_name(detector or 'unknown')}"]
    if templates:
        parts.append("templates-" + "-".join(templates.replace(",", " ").split())[:VERSION_NAME_CHARS])
    return " ".join(parts) + f" @{digest}"


VERSION_NAME_CHARS = 32  # a spec's readable name in a model version is cut to this
VERSION_HASH_CHARS = 8  # fingerprint hex digits a model version shows


def model_version_from_manifest(manifest: dict | None) -> str | None:
    """The default model version of a caption output, from its ``manifest.json``: readable names
    and content fingerprints, e.g. ``roiscribe-0.1.0 model-demo@f7585f5f detector-yolo-best@b7e747e5
    cfg@f9d86028``. A retrained model with the same file names is a new version; the same weights
    and answering config are the same version wherever the job ran. None without fingerprints."""
    fingerprints = (manifest or {}).get("fingerprints") or {}
    if not all(isinstance(fingerprints.get(k), str) for k in ("model", "detector", "config")):
        return None
    config = manifest.get("config") or {}
    release = (manifest.get("versions") or {}).get("roiscribe")
    parts = [f"roiscribe-{release}" if release else "roiscribe"]
    for role in ("model", "detector"):
        spec = str(((config.get(role) or {}).get("spec")) or role)
        parts.append(f"{role}-{_spec_name(spec)}@{fingerprints[role][:VERSION_HASH_CHARS]}")
    parts.append(f"cfg@{fingerprints['config'][:VERSION_HASH_CHARS]}")
    return " ".join(parts)


def _spec_name(spec: str) -> str:
    """A short readable name for a model or detector spec: ``demo``, ``random-tiny``,
    ``yolo-best`` (``yolo:/w/best.pt``), ``checkpoint-1500`` (a directory). No spaces or commas
    (Label Studio splits model versions on commas)."""
    kind, sep, rest = spec.partition(":")
    last = Path(rest.rsplit(":", 1)[-1]).stem if sep else ""
    if sep and kind.isidentifier():
        name = f"{kind}-{last}" if last and last != kind else kind
    else:
        name = Path(spec.rstrip("/")).name or spec
    return "-".join(name.replace(",", " ").split())[:VERSION_NAME_CHARS] or "unnamed"


def row_path(uri: str) -> Path:
    """The local file a row's ``uri`` names (a path, or a ``file:`` URI for names that are not UTF-8)."""
    from pipeline.decode import local_path  # imported here: pipeline.decode imports numpy

    return Path(os.fsdecode(local_path(uri)))


# Images -------------------------------------------------------------------------------------------

def local_files_path(url: str) -> str | None:
    """The path under the server's document root that a local-files image URL names (relative
    ``/data/local-files/?d=...`` or absolute on the server); None for any other URL."""
    parts = urlsplit(url)
    if not parts.path.startswith(LOCAL_FILES_PATH):
        return None
    return parse_qs(parts.query).get("d", [""])[0]


@dataclass(frozen=True)
class ImageRefs:
    """How a task points at its image: ``local-files`` (a path under ``document_root``, served by
    Label Studio's local-files storage), ``upload`` (the file is uploaded to the project) or
    ``url`` (the row's http(s) uri, or ``url_prefix`` + the path under ``document_root``)."""

    mode: str = "local-files"
    document_root: str | None = None
    url_prefix: str | None = None

    def __post_init__(self):
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"image mode {self.mode!r}: expected one of {', '.join(IMAGE_MODES)}")
        if self.mode == "local-files" and not self.document_root:
            raise ValueError("local-files images need the document root the server serves "
                             "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT); pass --document-root")

    def relative(self, row: dict) -> str:
        root = Path(self.document_root).resolve()
        path = row_path(str(row["uri"])).resolve()
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise TaskError(row["image_id"], f"image {row['uri']} is not under the document root {root}") from None
        if self.mode == "local-files" and len(rel.parts) < 2:
            raise TaskError(row["image_id"], f"image {row['uri']} lies directly in the document root; Label Studio "
                                             "serves local files only from its subfolders")
        return rel.as_posix()

    def storage_dirs(self, relative_paths: Iterable[str]) -> set[str]:
        """The document-root subfolders that local-files tasks read from (each needs a Label Studio
        local storage on the project, or the server answers 404 for its images)."""
        root = Path(self.document_root).resolve()
        return {str(root / rel.split("/", 1)[0]) for rel in relative_paths}

    def url(self, row: dict) -> str:
        uri = str(row["uri"])
        if self.mode == "local-files":
            return f"{LOCAL_FILES_PATH}?d=" + quote(self.relative(row))
        if uri.startswith(("http://", "https://")):
            return uri
        if self.url_prefix and self.document_root:
            return self.url_prefix.rstrip("/") + "/" + quote(self.relative(row))
        raise TaskError(row["image_id"], f"image {uri} has no URL: give --url-prefix with --document-root, "
                                         "or use --images local-files / upload")
