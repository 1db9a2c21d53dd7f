"""Boxes a person or another tool already drew: captioning them needs no detector at all.

``GivenBoxes`` looks each image up by its ``image_id``, then its ``uri``, then the file name at the
end of the uri, so a COCO file that says ``train/bus.jpg`` matches an image read from
``/data/coco/train/bus.jpg``. A file name that two entries share is left out of the keys rather
than guessed. An image with no entry gets empty ``Regions``: "nobody drew a box here" is an
answer, not an error.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from pipeline.records import DecodedImage, Regions

NAME = "given"
# Label Studio stores an uploaded file as "<8 hex chars>-<original name>".
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")


class GivenBoxes:
    """A detector that returns caller-supplied boxes (pixels of the original image) per image."""

    name = NAME

    def __init__(self, mapping: Mapping[str, "Regions | BadBoxes"] | None = None):
        self.mapping: dict[str, Regions | BadBoxes] = dict(mapping or {})
        for key, regions in self.mapping.items():
            if not isinstance(regions, (Regions, BadBoxes)):
                raise TypeError(f"GivenBoxes: the value for key {key!r} is a {type(regions).__name__}, expected "
                                f"Regions; build one with Regions.from_boxes([[x1, y1, x2, y2], ...])")

    def lookup(self, image_id: str, uri: str = "") -> Regions:
        """The boxes of one image: by id, by uri, then by the uri's file name; empty when none match.
        Raises ``ValueError`` for an image whose given boxes are malformed (its error row says why)."""
        for key in (image_id, uri, *_file_names(uri)):
            if key and key in self.mapping:
                found = self.mapping[key]
                if isinstance(found, BadBoxes):
                    raise ValueError(found.reason)
                return Regions(found.boxes.copy(), found.scores.copy(), found.class_ids.copy(),
                               list(found.class_names), self.name, dict(found.dropped))
        return Regions.empty(self.name)

    def detect(self, images: Sequence[DecodedImage]) -> list[Regions]:
        return [self.lookup(image.image_id, image.uri) for image in images]

    @classmethod
    def from_coco(cls, path: str | Path) -> "GivenBoxes":
        """Boxes from a COCO detection json (``bbox`` is ``[x, y, w, h]`` in pixels).

        Keys: each image's ``file_name``, its file name without folders, and ``str(id)``. An
        annotation's ``score`` is used when present (a results file), else 1.0.
        """
        data = _read_json(path, dict, "a COCO json object with 'images', 'annotations' and 'categories'")
        names = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
        per_image: dict[int, list[dict]] = {}
        for ann in data.get("annotations", []):
            per_image.setdefault(ann["image_id"], []).append(ann)
        entries = []
        for image in data.get("images", []):
            anns = per_image.get(image["id"], [])
            entries.append(([image["file_name"], str(image["id"])], image["file_name"],
                            _coco_regions(anns, names, image["id"])))
        return cls(_index(entries))

    @classmethod
    def from_label_studio(cls, path: str | Path, image_key: str | None = None) -> "GivenBoxes":
        """Boxes from a Label Studio JSON export (a list of tasks) of ``rectanglelabels`` results.

        Label Studio stores a rectangle in percent of the original image, rotated by ``rotation``
        degrees (clockwise, about its top-left corner); the boxes here are the pixel envelopes.
        Each task uses its last annotation that was not cancelled: a task labelled twice would
        otherwise repeat every box. Keys: ``task:ID`` (the key a pulled task's image has: exactly
        that task's boxes), and the task's image (``data[image_key]``, by default ``data["image"]``
        or the only string in ``data``) and its file name when no other task shows the same image
        (tasks sharing an image have different boxes: which ones would be a guess). A bare task id
        is not a key: it could equal another image's id.
        """
        tasks = _read_json(path, list, "a Label Studio JSON export: a list of tasks")
        images = [_task_image(task, image_key) for task in tasks]
        shown = Counter(images)
        entries = []
        for task, image in zip(tasks, images):
            unique = image if shown[image] == 1 else ""
            keys = [f"task:{task['id']}"] if "id" in task else []
            entries.append(([*keys, unique], unique, _label_studio_regions(task)))
        return cls(_index(entries))


def _read_json(path: str | Path, kind: type, expected: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"given boxes: no file at {str(path)!r}; expected {expected}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, kind):
        raise ValueError(f"given boxes: {str(path)!r} holds a JSON {type(data).__name__}, expected {expected}")
    return data


def _file_names(uri: str) -> list[str]:
    """The names an image may be known by besides its full uri (see ``GivenBoxes``)."""
    if not uri:
        return []
    parts = urlsplit(uri)
    path = unquote(parts.path)
    local = parse_qs(parts.query).get("d")  # Label Studio local files: /data/local-files/?d=dir/x.jpg
    names = [local[0], posixpath.basename(local[0])] if local else []
    base = posixpath.basename(path.replace("\\", "/"))
    names.append(base)
    upload = _UPLOAD_PREFIX.match(base)
    if upload:
        names.append(upload.group(1))
    return [n for n in names if n]


def _index(entries: Iterable[tuple[list[str], str, Regions]]) -> dict[str, Regions]:
    """Exact keys for every entry plus file-name keys that name exactly one entry."""
    entries = list(entries)
    exact = {key: regions for keys, _, regions in entries for key in keys if key}
    short = [(name, regions) for _, uri, regions in entries for name in dict.fromkeys(_file_names(uri))]
    counts = Counter(name for name, _ in short)
    unique = {name: regions for name, regions in short if counts[name] == 1 and name not in exact}
    return {**unique, **exact}


@dataclass(frozen=True)
class BadBoxes:
    """The given boxes of one image could not be read; ``reason`` becomes that image's error row."""

    reason: str


def _coco_regions(anns: list[dict], names: dict[int, str], image_id) -> "Regions | BadBoxes":
    if not anns:
        return Regions.empty(NAME)
    for a in anns:
        box = a.get("bbox") if isinstance(a, dict) else None
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            return BadBoxes(f"COCO image {image_id}: annotation {a.get('id') if isinstance(a, dict) else a!r} has "
                            f"bbox {box!r}; expected [x, y, width, height], four numbers in pixels")
        score, category = a.get("score", 1.0), a.get("category_id", -1)
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return BadBoxes(f"COCO image {image_id}: annotation {a.get('id')} has score {score!r}; expected a number")
        if not isinstance(category, int) or isinstance(category, bool):
            return BadBoxes(f"COCO image {image_id}: annotation {a.get('id')} has category_id {category!r}; "
                            "expected an integer")
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # x2 = x1 + w
    ids = [a.get("category_id", -1) for a in anns]
    return Regions(boxes, [a.get("score", 1.0) for a in anns], ids, [names.get(i, "") for i in ids], NAME)


def _task_image(task: dict, image_key: str | None) -> str:
    data = task.get("data", {})
    if image_key is not None or "image" in data:
        key = image_key or "image"
        if key not in data:
            raise ValueError(f"Label Studio task {task.get('id')}: no data[{key!r}]; its data keys are "
                             f"{sorted(data)}; pass image_key= naming the image field")
        return str(data[key])
    strings = [v for v in data.values() if isinstance(v, str)]
    if len(strings) != 1:
        raise ValueError(f"Label Studio task {task.get('id')}: cannot tell which data field is the image "
                         f"(keys {sorted(data)}); pass image_key= naming it")
    return strings[0]


def _label_studio_regions(task: dict) -> "Regions | BadBoxes":
    annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled", False)]
    results = [r for r in (annotations[-1].get("result", []) if annotations else [])
               if isinstance(r, dict) and r.get("type") == "rectanglelabels"]
    if not results:
        return Regions.empty(NAME)
    from sinks.label_studio.convert import percent_box_to_pixels

    try:  # a malformed rectangle (no original_width, a string coordinate...) fails this task only
        boxes = [percent_box_to_pixels(r, task.get("id")) for r in results]
        labels = [str((r["value"].get("rectanglelabels") or [""])[0]) for r in results]
        return Regions(np.array(boxes, dtype=np.float64), np.ones(len(boxes)), np.full(len(boxes), -1), labels, NAME)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return BadBoxes(f"Label Studio task {task.get('id')}: a rectangle cannot be read "
                        f"({type(e).__name__}: {e})")

