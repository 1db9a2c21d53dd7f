"""Scoring against the synthetic world's exact ground truth.

* detector: precision and recall at IoU 0.5 (after post-processing), and mAP50 (all-point
  interpolated AP per class, averaged over classes present in the ground truth);
* model: per-attribute accuracy (colour, shape, material, size from the caption) and relation
  accuracy on regions matched to ground truth (IoU >= 0.5) — with the detector's boxes, and with
  the ground-truth boxes (the model alone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.records import Regions

from .world import SIZES

ATTRIBUTES = ("color", "shape", "material", "size")


@dataclass
class GroundTruth:
    image: str  # path
    width: int
    height: int
    objects: list[dict]
    relations: dict[str, str]  # "i,j" -> predicate of object i relative to object j

    @property
    def regions(self) -> Regions:
        return Regions.from_boxes([o["box"] for o in self.objects], [o["shape"] for o in self.objects],
                                  detector="ground-truth")


def read_ground_truth(folder: str | Path, limit: int | None = None) -> list[GroundTruth]:
    """``ground_truth.jsonl`` files under ``folder`` (a world directory or one of its parts)."""
    folder = Path(folder)
    files = sorted(folder.rglob("ground_truth.jsonl"))
    if not files:
        raise FileNotFoundError(f"no ground_truth.jsonl under {folder}; generate one with `roiscribe world`")
    out = []
    for f in files:
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.append(GroundTruth(str(f.parent / rec["image"]), rec["width"], rec["height"], rec["objects"],
                                   rec["relations"]))
            if limit and len(out) >= limit:
                return out
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def match(pred: Regions, gt_boxes: np.ndarray, iou: float = 0.5) -> dict[int, int]:
    """Greedy matching by descending score: prediction index -> ground-truth index."""
    if len(pred) == 0 or len(gt_boxes) == 0:
        return {}
    ious = iou_matrix(pred.boxes.astype(np.float64), np.asarray(gt_boxes, np.float64))
    taken, pairs = set(), {}
    for p in np.argsort(-pred.scores, kind="stable"):
        for g in np.argsort(-ious[p], kind="stable"):
            if ious[p, g] < iou:
                break
            if g not in taken:
                taken.add(int(g))
                pairs[int(p)] = int(g)
                break
    return pairs


def _ap(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> float:
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = tp[order]
    cum_tp = np.cumsum(tp)
    recall = cum_tp / n_gt
    precision = cum_tp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def detection_scores(predictions: list[Regions], truths: list[GroundTruth], score_threshold: float = 0.25) -> dict:
    """Precision/recall at ``score_threshold`` and class-wise mAP50 over all predictions."""
    per_class: dict[str, tuple[list, list, int]] = {}
    tp_at = fp_at = n_gt_all = 0
    for pred, gt in zip(predictions, truths):
        gt_regions = gt.regions
        n_gt_all += len(gt_regions)
        for cls in set(gt_regions.class_names) | set(pred.class_names):
            p_idx = [i for i, c in enumerate(pred.class_names) if c == cls]
            g_idx = [i for i, c in enumerate(gt_regions.class_names) if c == cls]
            sub = pred.select(p_idx)
            pairs = match(sub, gt_regions.boxes[g_idx]) if g_idx else {}
            tps, scores, n = per_class.setdefault(cls, ([], [], 0))
            tps += [i in pairs for i in range(len(sub))]
            scores += sub.scores.tolist()
            per_class[cls] = (tps, scores, n + len(g_idx))
        strong = pred.select(pred.scores >= score_threshold)
        pairs = match(strong, gt_regions.boxes)
        pairs = {p: g for p, g in pairs.items() if strong.class_names[p] == gt_regions.class_names[g]}
        tp_at += len(pairs)
        fp_at += len(strong) - len(pairs)
    aps = {c: _ap(np.array(t, bool), np.array(s, float), n) for c, (t, s, n) in per_class.items() if n}
    return {"precision": tp_at / max(tp_at + fp_at, 1), "recall": tp_at / max(n_gt_all, 1),
            "mAP50": float(np.mean(list(aps.values()))) if aps else float("nan"),
            "AP50_per_class": aps, "images": len(truths), "objects": n_gt_all}


def _size_from(text: str | None) -> str | None:
    words = (text or "").lower().split()
    return next((w for w in words if w in SIZES), None)


@dataclass
class _Tally:
    right: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, ok: bool) -> None:
        self.right[key] = self.right.get(key, 0) + int(ok)
        self.total[key] = self.total.get(key, 0) + 1

    def accuracy(self) -> dict[str, float]:
        return {k: self.right[k] / self.total[k] for k in self.total}


def answer_scores(results, truths: list[GroundTruth]) -> dict:
    """Attribute and relation accuracy of annotate() results on regions matched to ground truth;
    unmatched ground-truth objects count as wrong (so detector misses show up)."""
    tally = _Tally()
    for result, gt in zip(results, truths):
        pairs = match(result.regions, gt.regions.boxes) if result.status == "ok" else {}
        gt_of = pairs
        pred_of = {g: p for p, g in pairs.items()}
        for g, obj in enumerate(gt.objects):
            answers = result.answers[pred_of[g]] if g in pred_of else {}
            for name in ATTRIBUTES[:3]:
                got = answers.get(name)
                tally.add(name, got is not None and got.value == obj[name])
            caption = answers.get("caption")
            tally.add("size", caption is not None and _size_from(caption.value) == obj["size"])
        for rel in result.relations:
            if rel.subject in gt_of and rel.object in gt_of:
                want = gt.relations.get(f"{gt_of[rel.subject]},{gt_of[rel.object]}")
                if want is not None:
                    tally.add("relation", rel.predicate == want)
    return tally.accuracy() | {"counts": tally.total}


def raw_detections(detector, uris: list[str], batch_size: int = 16) -> list[Regions]:
    """Detections for mAP, scored as detectors are: clipped and class-aware NMS, kept down to a very
    low score, no cross-class duplicate suppression (that is the job's choice, not the detector's)."""
    from pipeline.decode import ImageSource, decode_image
    from pipeline.postprocess import PostProcess, postprocess

    keep_all = PostProcess(score_threshold=0.001, max_regions=100, duplicate_iou=None)
    out = []
    for start in range(0, len(uris), batch_size):
        images = [decode_image(ImageSource(u)) for u in uris[start:start + batch_size]]
        out += [postprocess(r, im.width, im.height, keep_all) for im, r in zip(images, detector.detect(images))]
    return out


def evaluate_world(truths: list[GroundTruth], loaded, config, detector=None) -> dict:
    """Every score of ``roiscribe evaluate``: the model on ground-truth boxes; with a detector, its
    mAP50 on its own output, the precision/recall of the boxes the job keeps (``config.postprocess``)
    and the model on those boxes. ``config`` is a ``pipeline.stages.PipelineConfig``."""
    from dataclasses import replace

    from detectors.given import GivenBoxes
    from pipeline.flow import annotate
    from pipeline.postprocess import PostProcess, postprocess

    uris = [t.image for t in truths]
    post = config.postprocess or PostProcess()
    scores: dict = {"images": len(truths)}
    given = GivenBoxes({t.image: t.regions for t in truths})
    scores["ground_truth_boxes"] = answer_scores(annotate(uris, given, loaded, config), truths)
    if detector is None:
        return scores
    raw = raw_detections(detector, uris)
    scores["detector"] = detection_scores(raw, truths, post.score_threshold)
    kept = [postprocess(r, t.width, t.height, post) for r, t in zip(raw, truths)]
    job = detection_scores(kept, truths, post.score_threshold)
    scores["detector"] |= {"precision": job["precision"], "recall": job["recall"],
                           "precision_before_duplicates": scores["detector"]["precision"]}
    scores["detector_boxes"] = answer_scores(annotate(uris, detector, loaded, replace(config, postprocess=post)), truths)
    return scores
