"""Pseudo-labels: a caption output filtered by a policy and exported as training data.

``export(OUT, policy, calibration)`` reads the rows of a caption job's output (``OUT/data``, one
part at a time) and writes ``OUT/exports/``:

* ``conversations.jsonl``: GPT4RoI training conversations in the format ``roiscribe train``
  reads: per image its kept boxes, then for every kept region its brief caption and attribute
  answers (single-region turns) and the kept relations (two-region turns), with the questions the
  pipeline asks (``pipeline.compose.Templates``);
* ``yolo/``: a YOLO dataset ultralytics trains on (``data.yaml``, ``images/{train,val}`` linked to
  the original files, ``labels/{train,val}``), classes numbered by the detector's own class ids (a
  person's labels, which have none: the lowest free numbers; a number nobody kept: ``classN``).
  With ``Policy.mask_rejected`` an image with proposals the policy did not keep is written as a PNG
  copy with those boxes painted out (outside every kept box) in the colours around them: YOLO has no
  "ignore" label, and a rejected proposal is often a real object the teacher was unsure of, which an
  unmasked image would teach the student is background (an image that cannot be masked now,
  unreadable or resized since it was captioned, is left out of the YOLO set and counted);
* ``coco.json``: COCO detection json (boxes ``[x, y, w, h]`` in pixels, each annotation with its
  score, probability and attributes), which ``roiscribe caption`` reads back as a source;
* ``decisions.jsonl``: per image, every proposed region, answer and relation with its probability,
  whether it was accepted and, if not, why;
* ``manifest.json``: the policy, the calibration, and per kind the counts proposed, accepted and
  rejected (accepted + rejected = proposed), with the rejections by reason.

Probabilities come from a :class:`~pipeline.calibrate.Calibration` when one is given (the
probability of being right, fitted on labelled data), else from the rows' own ``probability``
columns (a job run with a calibration), else from the uncalibrated confidence (``exp(mean token
log-prob)``; a region: its detector score).

The policy (:class:`Policy`): a region is kept when its probability reaches the threshold of
``region`` (or of ``region:<its class>`` when the policy has one: ``calibrate --precision
--per-class`` tunes one per class), its area the minimum, and it is among the ``max_per_image`` most probable regions of
its image and the ``max_per_class`` most probable of its class there; the detector exports (YOLO,
COCO) take the kept regions. An answer is kept when its probability reaches its kind's threshold, a
relation likewise, and neither belongs to a region the area or a cap removed. A region below the
``region`` threshold (a box whose class may be wrong) loses its answers too when they are
uncalibrated; a calibrated answer's probability already counts an answer about no object as wrong,
so it is judged on its own: GPT4RoI's conversations keep confident answers about boxes the
detector exports leave out. Thresholds are tuned on labelled validation data, never on the data a
gain is measured on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

KINDS = ("region", "caption", "color", "shape", "material", "relation")
ANSWER_KINDS = ("caption", "color", "shape", "material", "action")


def _default_thresholds() -> dict[str, float]:
    return {k: 0.5 for k in (*KINDS, "action")}


@dataclass(frozen=True)
class Policy:
    min_probability: dict[str, float] = field(default_factory=_default_thresholds)  # per kind
    min_area: float = 0.0  # pixels of the box
    max_per_image: int | None = None  # regions kept per image, the most probable first
    max_per_class: int | None = None  # regions kept per class and image, the most probable first
    val_fraction: float = 0.1  # images of the YOLO export kept for validation: every 1/val_fraction-th, the first included
    mask_rejected: bool = False  # YOLO export: paint out the proposals not kept (see the module docstring)

    def threshold(self, kind: str, label: str | None = None) -> float:
        """The threshold of ``kind``; of a region (or an answer about one) of detector class
        ``label``, that class's own (``"KIND:label"``) when the policy has one."""
        if label is not None and f"{kind}:{label}" in self.min_probability:
            return float(self.min_probability[f"{kind}:{label}"])
        return float(self.min_probability.get(kind, 0.5))


@dataclass
class Counts:
    proposed: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    rejected: dict[str, Counter] = field(default_factory=dict)

    def add(self, kind: str, reason: str | None) -> None:
        self.proposed[kind] += 1
        if reason is None:
            self.accepted[kind] += 1
        else:
            self.rejected.setdefault(kind, Counter())[_reason_key(reason)] += 1

    def as_dict(self) -> dict:
        return {k: {"proposed": self.proposed[k], "accepted": self.accepted[k],
                    "rejected": sum(self.rejected.get(k, Counter()).values()),
                    "rejected_by_reason": dict(self.rejected.get(k, Counter()))} for k in sorted(self.proposed)}


def _reason_key(reason: str) -> str:
    """The kind of a reason, its first word, for counting ("probability 0.31 < 0.50" -> "probability")."""
    return reason.split(" ", 1)[0].rstrip(":")


# Decisions for one row -------------------------------------------------------------------------------

def _probability(calibration, kind: str, features: dict, stored: float | None, baseline: float) -> tuple[float, bool]:
    """The calibration's probability when one is given; else the probability the row holds (the
    job's calibration); else the uncalibrated confidence. With whether it is calibrated."""
    if calibration is not None:
        p = calibration.probability(kind, features)
        if p is not None:
            return p, True
    return (stored, True) if stored is not None else (baseline, False)


def decide(row: dict, policy: Policy, calibration=None) -> dict:
    """Every region, answer and relation of one ``ok`` row with its probability and decision:
    ``{"image_id", "regions": [{"region_id", "probability", "reason", "answers": {name: {...}}}],
    "relations": [...]}``; ``reason`` is None for what is accepted."""
    from pipeline.arrow import row_to_result
    from pipeline.calibrate import region_signals, relation_signals

    result = row_to_result(row)
    regions = []
    calibrated: dict[tuple[int, str], bool] = {}  # (region, answer name) -> its probability is calibrated
    for r in range(len(result.regions)):
        signals = region_signals(result, r)
        x1, y1, x2, y2 = (float(v) for v in result.regions.boxes[r])
        stored = result.region_probabilities[r] if r < len(result.region_probabilities) else None
        region_p, _ = _probability(calibration, "region", signals["region"], stored, float(result.regions.scores[r]))
        answers = {}
        for name, answer in (result.answers[r] if r < len(result.answers) else {}).items():
            if answer.value is None:
                answers[name] = {"value": None, "probability": None, "reason": f"unparsed: {answer.raw!r}"}
                continue
            baseline = math.exp(min(answer.mean_logprob, 0.0))
            p, calibrated[r, name] = (_probability(calibration, name, signals[name], answer.probability, baseline)
                                      if name in signals else _probability(None, name, {}, answer.probability, baseline))
            answers[name] = {"value": answer.value, "said": _said(name, answer), "probability": p, "reason": None}
        regions.append({"region_id": r, "label": result.regions.class_names[r],
                        "class_id": int(result.regions.class_ids[r]), "box": [x1, y1, x2, y2],
                        "area": max(x2 - x1, 0.0) * max(y2 - y1, 0.0), "probability": region_p,
                        "reason": None, "answers": answers})
    _apply_region_policy(regions, policy)

    def region_rejected(region: dict, calibrated: bool) -> bool:  # see the module docstring
        return region["reason"] is not None and (not calibrated or not region["reason"].startswith("probability"))

    for r, region in enumerate(regions):
        for name, a in region["answers"].items():
            threshold = policy.threshold(name, region["label"])
            if a["reason"] is None and region_rejected(region, calibrated[r, name]):
                a["reason"] = "region-rejected"
            elif a["reason"] is None and a["probability"] < threshold:
                a["reason"] = f"probability {a['probability']:.2f} < {threshold:.2f}"
    relations = []
    for rel in result.relations:
        if rel.predicate is None:
            relations.append({"subject": rel.subject, "object": rel.object, "predicate": None, "probability": None,
                              "reason": f"unparsed: {rel.raw!r}"})
            continue
        p, rel_calibrated = _probability(calibration, "relation", relation_signals(result, rel), rel.probability,
                                         math.exp(min(rel.mean_logprob, 0.0)))
        reason = None
        if region_rejected(regions[rel.subject], rel_calibrated) or region_rejected(regions[rel.object], rel_calibrated):
            reason = "region-rejected"
        elif p < policy.threshold("relation"):
            reason = f"probability {p:.2f} < {policy.threshold('relation'):.2f}"
        relations.append({"subject": rel.subject, "object": rel.object, "predicate": rel.predicate,
                          "probability": p, "reason": reason})
    return {"image_id": result.image_id, "uri": result.uri, "width": result.width, "height": result.height,
            "regions": regions, "relations": relations}


def _said(name: str, answer) -> str:
    """What the conversations export teaches for an answer: the model's own words when the whole of
    them is a spelling of the parsed value (the canonical value, e.g. "none" for "nothing", may not be
    how the model was taught), else the parsed value (never the extra words of a run-on answer)."""
    from pipeline.review import vocabulary_value

    raw = answer.raw.strip()
    return raw if raw == answer.value or vocabulary_value(name, raw) == answer.value else answer.value


def _apply_region_policy(regions: list[dict], policy: Policy) -> None:
    for g in regions:
        threshold = policy.threshold("region", g["label"])
        if g["probability"] < threshold:
            g["reason"] = f"probability {g['probability']:.2f} < {threshold:.2f}"
        elif g["area"] < policy.min_area:
            g["reason"] = f"area {g['area']:.0f} px < {policy.min_area:.0f}"
    ranked = sorted((g for g in regions if g["reason"] is None), key=lambda g: -g["probability"])
    per_class: Counter = Counter()
    kept = 0
    for g in ranked:
        if policy.max_per_class is not None and per_class[g["label"]] >= policy.max_per_class:
            g["reason"] = f"class-cap: {g['label']!r} already has {policy.max_per_class} more probable regions"
            continue
        if policy.max_per_image is not None and kept >= policy.max_per_image:
            g["reason"] = f"image-cap: {policy.max_per_image} more probable regions kept"
            continue
        per_class[g["label"]] += 1
        kept += 1


# Exports ----------------------------------------------------------------------------------------------

def _rows(out: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    from sinks.parquet import part_files

    for part in part_files(out):
        yield from pq.read_table(part).to_pylist()


def _local_path(uri: str) -> str | None:
    """The local file a row's uri names (None for a file name that is not valid UTF-8: it cannot
    be written into the exports' JSON)."""
    from pipeline.decode import local_path

    path = local_path(uri)
    if isinstance(path, bytes):
        try:
            path = path.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return os.path.abspath(path)


def export(out: str | Path, policy: Policy = Policy(), calibration=None, calibration_path: str | None = None) -> dict:
    """Write ``OUT/exports/`` from the output's rows (see the module docstring); returns the
    manifest."""
    skipped: Counter = Counter()

    def decisions() -> Iterator[dict]:
        for row in _rows(Path(out)):
            if row["status"] != "ok":
                skipped["error rows"] += 1
                continue
            yield decide(row, policy, calibration)

    extra = {"policy": asdict(policy), "calibration": calibration_path,
             "probability": "calibrated" if calibration is not None else
                            "the rows' calibrated probabilities where they have them, else uncalibrated: "
                            "exp(mean token log-prob); regions: detector score"}
    return write_exports(Path(out) / "exports", decisions(), policy.val_fraction, extra, skipped,
                         policy.mask_rejected)


def write_exports(final: Path, decisions: Iterable[dict], val_fraction: float = 0.1, manifest: dict | None = None,
                  skipped: Counter | None = None, mask_rejected: bool = False) -> dict:
    """The training exports of ``decisions`` (``decide``'s records: what is accepted has no
    ``reason``) under ``final``: built in a sibling folder, then swapped in whole. Returns the
    manifest (``manifest``'s fields, the counts, the images exported and skipped, the classes);
    ``mask_rejected``: the YOLO images with proposals not kept are masked copies (module docstring)."""
    from pipeline.compose import Templates

    dest = final.with_name(final.name + ".partial")
    shutil.rmtree(dest, ignore_errors=True)
    yolo = dest / "yolo"
    for split in ("train", "val"):
        (yolo / "images" / split).mkdir(parents=True, exist_ok=True)
        (yolo / "labels" / split).mkdir(parents=True, exist_ok=True)
    templates = Templates()
    counts = Counts()
    classes: dict[str, int] = {}  # label -> its index in data.yaml (COCO: + 1); see _class_index
    coco_images, coco_annotations = [], []
    skipped = skipped if skipped is not None else Counter()
    every = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    masked = conversations = 0
    with (open(dest / "conversations.jsonl", "w") as conv, open(dest / "decisions.jsonl", "w") as log):
        for d in decisions:
            log.write(json.dumps(d) + "\n")
            for g in d["regions"]:
                counts.add("region", g["reason"])
                for name, a in g["answers"].items():
                    counts.add(name, a["reason"])
            for rel in d["relations"]:
                counts.add("relation", rel["reason"])
            kept = [g for g in d["regions"] if g["reason"] is None]
            in_relations = {i for rel in d["relations"] if rel["reason"] is None for i in (rel["subject"], rel["object"])}
            taught = [g for g in d["regions"] if g["reason"] is None or g["region_id"] in in_relations
                      or any(a["reason"] is None for a in g["answers"].values())]
            path = _local_path(d["uri"])
            if not taught or not path or not os.path.isfile(path):
                skipped["nothing kept" if not taught else "image not a local file"] += 1
                continue
            conv.write(json.dumps(_conversation(d, taught, path, templates)) + "\n")
            conversations += 1
            if not kept:
                continue
            for g in kept:
                _class_index(classes, g["label"], g.get("class_id", -1))
            image_id = len(coco_images) + 1
            coco_images.append({"id": image_id, "file_name": path, "width": d["width"], "height": d["height"],
                                "roiscribe_image_id": d["image_id"]})
            for g in kept:
                x1, y1, x2, y2 = g["box"]
                coco_annotations.append({
                    "id": len(coco_annotations) + 1, "image_id": image_id, "category_id": classes[g["label"]] + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": g["area"], "iscrowd": 0,
                    "score": g["probability"],
                    "attributes": {n: a["value"] for n, a in g["answers"].items() if a["reason"] is None}})
            split = "val" if every and (image_id - 1) % every == 0 else "train"  # the first image is val
            outcome = _yolo_item(yolo, split, d, kept, path, image_id, classes, mask_rejected)
            if outcome == "masked":
                masked += 1
            elif outcome != "linked":  # the image cannot be masked now: left out of the YOLO set, counted
                skipped[f"yolo: {outcome}"] += 1
    by_index = {i: c for c, i in classes.items()}
    names = [by_index.get(i, f"class{i}") for i in range(max(by_index, default=-1) + 1)]
    (yolo / "data.yaml").write_text("# no path: ultralytics roots the dataset at this file's folder, so the export can be moved\n"
                                    "train: images/train\nval: images/val\nnames:\n"
                                    + "".join(f"  {i}: {json.dumps(c)}\n" for i, c in enumerate(names)))
    coco = {"images": coco_images, "annotations": coco_annotations,
            "categories": [{"id": i + 1, "name": c} for i, c in sorted(by_index.items())]}
    (dest / "coco.json").write_text(json.dumps(coco))
    manifest = {**(manifest or {}), "counts": counts.as_dict(), "images_exported": len(coco_images),
                "conversations": conversations,
                "images_skipped": dict(skipped), "classes": names}
    if mask_rejected:
        manifest["yolo_images_masked"] = masked
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(final, ignore_errors=True)  # the previous export (another policy) goes
    dest.rename(final)
    return manifest


def _class_index(classes: dict[str, int], label: str, class_id: int) -> int:
    """A label's index in the YOLO and COCO exports: the detector's own class id when it has one
    (so that the export fine-tunes the detector that made it without scrambling its head, and sits
    beside data labelled in the detector's classes), else (a person's label) the lowest free one."""
    if label not in classes:
        used = set(classes.values())
        classes[label] = class_id if class_id >= 0 and class_id not in used else min(set(range(len(used) + 1)) - used)
    return classes[label]


def _conversation(d: dict, kept: list[dict], path: str, templates) -> dict:
    number = {g["region_id"]: k for k, g in enumerate(kept)}
    turns = []

    def ask(question: str, regions: list[int], answer: str) -> None:
        turns.extend([{"from": "human", "value": question, "regions": regions}, {"from": "gpt", "value": answer}])

    for g in kept:
        k = number[g["region_id"]]
        for name, a in g["answers"].items():
            if a["reason"] is not None:
                continue
            if name == "caption":
                ask(templates.caption_brief, [k], a.get("said") or a["value"])
            elif name in templates.attributes:
                ask(templates.attributes[name], [k], a.get("said") or a["value"])
    for rel in d["relations"]:
        if rel["reason"] is None:
            ask(templates.relation, [number[rel["subject"]], number[rel["object"]]],
                f"region1 is {rel['predicate']} region2")
    return {"image": path, "width": d["width"], "height": d["height"], "boxes": [g["box"] for g in kept],
            "conversations": turns, "roiscribe_image_id": d["image_id"]}


def _yolo_item(yolo: Path, split: str, d: dict, kept: list[dict], path: str, n: int, classes: dict,
               mask_rejected: bool = False) -> str:
    """One image of the YOLO export (a link to the original, or with ``mask_rejected`` and proposals
    not kept, a masked PNG copy) and its labels: "linked", "masked", or why the image was left out
    (it cannot be decoded now, or its size is no longer the one the boxes were drawn on)."""
    rejected = [g["box"] for g in d["regions"] if g["reason"] is not None] if mask_rejected else []
    name = f"{n:08d}{'.png' if rejected else Path(path).suffix.lower() or '.png'}"
    target = yolo / "images" / split / name
    if target.is_symlink() or target.exists():
        target.unlink()
    if rejected:
        from PIL import Image

        from pipeline.decode import ImageDecodeError, ImageSource, decode_image

        try:
            array = decode_image(ImageSource(path)).array  # the pixels the boxes were drawn on (EXIF-rotated)
        except ImageDecodeError:
            return "not masked: the image cannot be decoded now"
        if array.shape[:2] != (d["height"], d["width"]):
            return "not masked: the image changed size since it was captioned"
        Image.fromarray(mask_boxes(array, rejected, [g["box"] for g in kept], seed=n)).save(target)
    else:
        target.symlink_to(os.path.abspath(path))
    w, h = d["width"], d["height"]
    lines = []
    for g in kept:
        x1, y1, x2, y2 = g["box"]
        lines.append(f"{classes[g['label']]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                     f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    (yolo / "labels" / split / (Path(name).stem + ".txt")).write_text("\n".join(lines) + "\n")
    return "masked" if rejected else "linked"


def mask_boxes(array, boxes: list, keep: list, seed: int = 0, ring: int = 3, pad: float = 0.1):
    """A copy of ``array`` (H, W, 3 uint8) with every box of ``boxes`` (grown by ``pad`` of its size
    on each side: a loose box leaves less of its object showing) painted out, except where a box of
    ``keep`` covers it. The paint is the background around the box: the median colour of a
    ``ring``-pixel band outside it (and outside the kept boxes) with noise of the band's robust
    spread, so that neither an object the band crosses nor a flat patch stands out (deterministic
    for a ``seed``)."""
    import numpy as np

    out = array.copy()
    h, w = out.shape[:2]
    protected = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in keep:
        protected[max(int(y1), 0):max(int(np.ceil(y2)), 0), max(int(x1), 0):max(int(np.ceil(x2)), 0)] = True
    rng = np.random.default_rng(seed)
    for x1, y1, x2, y2 in boxes:
        dx, dy = pad * max(x2 - x1, 0), pad * max(y2 - y1, 0)
        a, b = min(max(int(x1 - dx), 0), w), min(max(int(np.ceil(x2 + dx)), 0), w)
        c, e = min(max(int(y1 - dy), 0), h), min(max(int(np.ceil(y2 + dy)), 0), h)
        if a >= b or c >= e:
            continue
        inside = np.zeros((h, w), bool)
        inside[c:e, a:b] = True
        band = np.zeros((h, w), bool)
        band[max(c - ring, 0):min(e + ring, h), max(a - ring, 0):min(b + ring, w)] = True
        band &= ~inside & ~protected
        pixels = (array[band] if band.any() else array.reshape(-1, array.shape[-1])).astype(float)
        middle = np.median(pixels, 0)
        spread = 1.4826 * np.median(np.abs(pixels - middle), 0)  # robust: objects in the band do not count
        paint = inside & ~protected
        fill = middle + rng.standard_normal((int(paint.sum()), array.shape[-1])) * spread
        out[paint] = np.clip(np.rint(fill), 0, 255).astype(out.dtype)
    return out
