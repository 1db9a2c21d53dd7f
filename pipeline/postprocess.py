"""One set of clean-up rules for every detector's raw boxes, with a count of what each rule removed.

Detectors are run with a very low confidence so that the choice of what to keep is made here,
once, by a config a user can read and save next to the output. Every removed box is counted under
the rule that removed it (``Regions.dropped``), so a sink can say why an image has few regions.

Rules, in the order they apply (each sees only what the previous ones kept):

``invalid``        a coordinate or the score is NaN or infinite
``inverted``       ``x2 < x1`` or ``y2 < y1``
``degenerate``     zero width or height, after clipping to the image when ``clip`` is on
                   (a box entirely outside the image clips to zero size)
``low_score``      score below ``score_threshold``
``class_filtered`` class name not in ``allow_classes`` (when given), or in ``deny_classes``
``small``          area below ``min_area_px``, or below ``min_area_frac`` of the image area
``nms``            suppressed by a higher-scoring box of the same class name (IoU > ``nms_iou``)
``duplicate``      suppressed by a higher-scoring box of another class name that covers the same
                   object (IoU > ``duplicate_iou``): a detector unsure between two classes
                   outputs both boxes, and a region-level annotation wants one region per object
``over_max``       beyond the ``max_regions`` highest scores

The output is ordered by score, highest first, ties broken by the original index, so the same
input always yields the same region ids downstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.records import Regions


@dataclass(frozen=True)
class PostProcess:
    """What to keep of a detector's raw boxes (see the module docstring for the rules)."""

    score_threshold: float = 0.25
    allow_classes: tuple[str, ...] | None = None
    deny_classes: tuple[str, ...] = ()
    nms_iou: float | None = 0.7
    duplicate_iou: float | None = 0.8
    min_area_px: float = 0.0
    min_area_frac: float = 0.0
    max_regions: int | None = 50
    clip: bool = True

    def __post_init__(self) -> None:
        # Lists from a JSON/YAML config become tuples so the config stays hashable and frozen.
        if self.allow_classes is not None:
            object.__setattr__(self, "allow_classes", _names_tuple("allow_classes", self.allow_classes))
        object.__setattr__(self, "deny_classes", _names_tuple("deny_classes", self.deny_classes))
        if not math.isfinite(self.score_threshold):
            raise ValueError(f"PostProcess.score_threshold must be a finite number, got {self.score_threshold}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"PostProcess.nms_iou must be in (0, 1] or None to turn NMS off, got {self.nms_iou}")
        if self.duplicate_iou is not None and not 0.0 < self.duplicate_iou <= 1.0:
            raise ValueError("PostProcess.duplicate_iou must be in (0, 1] or None to keep boxes of different "
                             f"classes on one object, got {self.duplicate_iou}")
        if self.min_area_px < 0 or not 0.0 <= self.min_area_frac <= 1.0:
            raise ValueError("PostProcess: min_area_px must be >= 0 and min_area_frac in [0, 1], got "
                             f"{self.min_area_px} and {self.min_area_frac}")
        if self.max_regions is not None and self.max_regions < 0:
            raise ValueError(f"PostProcess.max_regions must be >= 0 or None for no limit, got {self.max_regions}")


def _names_tuple(field_name: str, names) -> tuple[str, ...]:
    if isinstance(names, str):  # a bare string would otherwise become a tuple of characters
        raise TypeError(f"PostProcess.{field_name} expects a sequence of class names, got the string {names!r}; "
                        f"write ({names!r},)")
    return tuple(str(n) for n in names)


def postprocess(regions: Regions, width: int, height: int, cfg: PostProcess) -> Regions:
    """``regions`` of a ``width`` x ``height`` image after the rules of ``cfg``, best first.

    The input is left untouched; the output's ``dropped`` is the input's counts plus this pass's.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"postprocess: image size must be positive, got width={width}, height={height}")
    boxes = regions.boxes.astype(np.float64)  # (N, 4) xyxy; float64 so clipping is exact
    if cfg.clip:
        boxes = boxes.clip(0.0, [width, height, width, height])
    dropped: dict[str, int] = {}
    keep = np.arange(len(regions))
    for reason, rule in _MASK_RULES:
        mask = rule(regions, boxes[keep], keep, width, height, cfg)
        _count(dropped, reason, int((~mask).sum()))
        keep = keep[mask]
    keep = keep[np.lexsort((keep, -regions.scores[keep]))]  # score descending, then original index
    keep = _nms(regions, boxes, keep, cfg.nms_iou, True, dropped, "nms")
    keep = _nms(regions, boxes, keep, cfg.duplicate_iou, False, dropped, "duplicate")
    if cfg.max_regions is not None:
        _count(dropped, "over_max", max(0, len(keep) - cfg.max_regions))
        keep = keep[:cfg.max_regions]
    out = regions.select(keep)
    out.boxes = boxes[keep].astype(np.float32).reshape(-1, 4)
    out.dropped = dict(regions.dropped)
    for reason, n in dropped.items():
        out.dropped[reason] = out.dropped.get(reason, 0) + n
    return out


def _count(dropped: dict[str, int], reason: str, n: int) -> None:
    if n > 0:  # only reasons that removed something, so the record reads as a short explanation
        dropped[reason] = dropped.get(reason, 0) + n


# Each rule: (regions, boxes of the kept rows (K, 4), kept row indices (K,), W, H, cfg) -> keep mask (K,).
def _finite(regions, boxes, idx, w, h, cfg):
    return np.isfinite(regions.boxes[idx]).all(axis=1) & np.isfinite(regions.scores[idx])


def _ordered(regions, boxes, idx, w, h, cfg):
    raw = regions.boxes[idx]
    return (raw[:, 2] >= raw[:, 0]) & (raw[:, 3] >= raw[:, 1])


def _has_size(regions, boxes, idx, w, h, cfg):
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _scored(regions, boxes, idx, w, h, cfg):
    return regions.scores[idx] >= cfg.score_threshold


def _class_ok(regions, boxes, idx, w, h, cfg):
    names = [regions.class_names[i] for i in idx]
    allowed = np.array([cfg.allow_classes is None or n in cfg.allow_classes for n in names], dtype=bool)
    denied = np.array([n in cfg.deny_classes for n in names], dtype=bool)
    return allowed & ~denied


def _large_enough(regions, boxes, idx, w, h, cfg):
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area >= cfg.min_area_px) & (area >= cfg.min_area_frac * w * h)


_MASK_RULES = (
    ("invalid", _finite),
    ("inverted", _ordered),
    ("degenerate", _has_size),
    ("low_score", _scored),
    ("class_filtered", _class_ok),
    ("small", _large_enough),
)


def _nms(regions: Regions, boxes: np.ndarray, keep: np.ndarray, iou: float | None, per_class: bool,
         dropped: dict, reason: str) -> np.ndarray:
    """``keep`` (already best-first) minus the boxes that NMS at ``iou`` suppresses (within a class
    name when ``per_class``, else across all), order kept; counted under ``reason``.

    torchvision's NMS sorts by score itself, and an unstable sort makes the winner among equal
    scores arbitrary; giving it strictly decreasing ranks instead of the scores keeps our order
    (score, then original index) the one that decides.
    """
    if iou is None or len(keep) < 2:
        return keep
    import torch
    from torchvision.ops import batched_nms

    names = [regions.class_names[i] if per_class else "" for i in keep]
    codes = {name: code for code, name in enumerate(dict.fromkeys(names))}
    ranks = torch.arange(len(keep), 0, -1, dtype=torch.float64)  # best first -> highest rank
    kept = batched_nms(torch.from_numpy(boxes[keep]), ranks,
                       torch.tensor([codes[n] for n in names]), iou).numpy()
    kept.sort()  # positions in the best-first order
    _count(dropped, reason, len(keep) - len(kept))
    return keep[kept]
