"""Calibrated confidence: the probability that an answer (or a region) is right.

A generative model's token log-probs rank its answers but are not probabilities of being right:
the demo model's ``exp(mean token log-prob)`` says 0.9 for answers that are right far less often.
A calibrator is fitted on labelled data (the synthetic world's ground truth: ``synth.calibrate``,
or any annotated set turned into the same :class:`Example` records) per kind of answer, and maps
the signals of one answer to a probability; ``apply`` sets them on a result (the describe stage
does, when the job has a calibration).

Kinds: ``color``, ``shape``, ``material`` (direct attribute answers), ``caption`` (right when the
colour, shape, material and size it names are all the object's), ``relation`` (both regions real
objects and the predicate the true one) and ``region`` (a real object with the right class).
A region that matches no object (a false detection) makes every answer about it wrong.

Signals (``FEATURES``), each known without ground truth when the job runs:

* ``mean_logprob``, ``min_logprob``: of the answer's tokens (the region: of its shape answer);
* ``detector_score``: the region's (a relation: the lower of its two regions');
* ``caption_agrees``: the caption names the same value as the direct answer (1), another one
  (0), or none (0.5); for a caption, the share of its attribute words the direct answers repeat;
* ``label_agrees``: the detector's class names the same value as the answer (1), another (0),
  or the class is no word of the attribute (0.5) (``pipeline.review``);
* ``geometry_agrees`` (relations): the two boxes say what the predicate says (1), are only
  consistent with it (0.5: e.g. "left of" a box that is more below than left, or one it overlaps;
  a predicate boxes cannot check, such as "holding"), or contradict it (0) (``geometry_agreement``);
* ``overlap``: the largest share of the region's box that another detected box of the image
  covers (0: it overlaps no other box; 1: it lies inside one): occluded objects and duplicate
  detections (``box_overlap``). A relation: the larger of its two regions';
* ``jitter_agrees``: asked again about the same region with its box edges moved a little
  (``synth.calibrate.jitter_agreement``: a second pass, so it doubles the cost), the answer stays the same (1) or
  not (0); 0.5 when not measured. A region: its shape answer's.

The calibrator is a logistic regression on the standardised signals (L2-regularised, fitted by
Newton's method): monotone in each signal, a handful of parameters per kind, so that a few
hundred labelled answers fit it without overfitting, and its weights say which signals count.
``signal_report`` gives each signal's own AUROC: how well it alone separates right from wrong.

Metrics: ECE (expected calibration error, 10 equal-width bins, weighted by bin size) and AUROC
(the probability that a right answer gets a higher confidence than a wrong one; ties count half).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = "roiscribe-calibration"
FORMAT_VERSION = 2  # 2: isotonic correction (iso_x, iso_y); version 1 files read as before
FEATURES = ("mean_logprob", "min_logprob", "detector_score", "caption_agrees", "label_agrees", "geometry_agrees",
            "overlap", "jitter_agrees")
ATTRIBUTE_KINDS = ("color", "shape", "material")
KINDS = (*ATTRIBUTE_KINDS, "caption", "relation", "region")
UNKNOWN_AGREEMENT = 0.5  # neither agrees nor disagrees: the caption or the label names no value
PROBABILITY_FLOOR = 1e-4  # a calibrated probability lies in [floor, 1 - floor]
ISOTONIC_FROM = 200  # examples of a kind from which its logistic output is corrected by isotonic regression


@dataclass(frozen=True)
class Example:
    """One answer with its signals and whether it was right."""

    kind: str
    features: dict[str, float]
    correct: bool
    label: str | None = None  # the region's detector class, where known (per-class thresholds)

    def baseline(self) -> float:
        """The uncalibrated confidence: ``exp(mean token log-prob)`` (a region: its detector score)."""
        if self.kind == "region":
            return float(self.features["detector_score"])
        return math.exp(min(self.features["mean_logprob"], 0.0))


# Signals of one image's answers -------------------------------------------------------------------

def named_value(attribute: str, text: str | None) -> str | None:
    """The value of ``attribute`` that a word (or two-word phrase) of ``text`` names, if any."""
    from pipeline.review import vocabulary_value

    words = (text or "").lower().replace(",", " ").replace(".", " ").split()
    for n in (2, 1):
        for i in range(len(words) - n + 1):
            value = vocabulary_value(attribute, " ".join(words[i:i + n]))
            if value is not None:
                return value
    return None


def _agreement(said: str | None, other: str | None) -> float:
    if said is None or other is None:
        return UNKNOWN_AGREEMENT
    return 1.0 if said == other else 0.0


def region_signals(result, r: int, jitter: dict | None = None) -> dict[str, dict[str, float]]:
    """kind -> signals for every answer of region ``r`` of an ``ImageResult`` (and the region);
    ``jitter``: answer name -> agreement under box jitter (``jitter_agreement``), if measured."""
    from pipeline.review import vocabulary_value

    jitter = jitter or {}

    answers = result.answers[r] if r < len(result.answers) else {}
    score = float(result.regions.scores[r])
    label = result.regions.class_names[r]
    covered = box_overlap(result.regions.boxes, r)
    caption = answers.get("caption")
    out: dict[str, dict[str, float]] = {}
    agreeing, named = 0, 0
    for kind in ATTRIBUTE_KINDS:
        a = answers.get(kind)
        if a is None:
            continue
        in_caption = named_value(kind, caption.value if caption else None)
        out[kind] = {"mean_logprob": a.mean_logprob, "min_logprob": a.min_logprob, "detector_score": score,
                     "caption_agrees": _agreement(a.value, in_caption),
                     "label_agrees": _agreement(a.value, vocabulary_value(kind, label)),
                     "geometry_agrees": UNKNOWN_AGREEMENT, "overlap": covered,
                     "jitter_agrees": jitter.get(kind, UNKNOWN_AGREEMENT)}
        if in_caption is not None:
            named += 1
            agreeing += int(in_caption == a.value)
    if caption is not None:
        out["caption"] = {"mean_logprob": caption.mean_logprob, "min_logprob": caption.min_logprob,
                          "detector_score": score,
                          "caption_agrees": agreeing / named if named else UNKNOWN_AGREEMENT,
                          "label_agrees": _agreement(named_value("shape", caption.value), vocabulary_value("shape", label)),
                          "geometry_agrees": UNKNOWN_AGREEMENT, "overlap": covered,
                          "jitter_agrees": jitter.get("caption", UNKNOWN_AGREEMENT)}
    shape = answers.get("shape")
    out["region"] = {"mean_logprob": shape.mean_logprob if shape else 0.0,
                     "min_logprob": shape.min_logprob if shape else 0.0, "detector_score": score,
                     "caption_agrees": out.get("shape", {}).get("caption_agrees", UNKNOWN_AGREEMENT),
                     "label_agrees": out.get("shape", {}).get("label_agrees", UNKNOWN_AGREEMENT),
                     "geometry_agrees": UNKNOWN_AGREEMENT, "overlap": covered,
                     "jitter_agrees": jitter.get("shape", UNKNOWN_AGREEMENT)}
    return out


def relation_signals(result, rel, jitter: float = UNKNOWN_AGREEMENT) -> dict[str, float]:
    scores, boxes = result.regions.scores, result.regions.boxes
    return {"mean_logprob": rel.mean_logprob, "min_logprob": rel.min_logprob,
            "detector_score": float(min(scores[rel.subject], scores[rel.object])),
            "caption_agrees": UNKNOWN_AGREEMENT, "label_agrees": UNKNOWN_AGREEMENT,
            "geometry_agrees": geometry_agreement(rel.predicate, boxes[rel.subject], boxes[rel.object]),
            "overlap": max(box_overlap(boxes, rel.subject), box_overlap(boxes, rel.object)),
            "jitter_agrees": jitter}


def box_overlap(boxes, r: int) -> float:
    """The largest share of box ``r``'s area (``boxes``: xyxy, one per row) that another box
    covers: 0 when it intersects none, 1 when it lies inside one (a box of no area: 0)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b[r]
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    if area <= 0 or len(b) < 2:
        return 0.0
    iw = np.clip(np.minimum(b[:, 2], x2) - np.maximum(b[:, 0], x1), 0.0, None)
    ih = np.clip(np.minimum(b[:, 3], y2) - np.maximum(b[:, 1], y1), 0.0, None)
    shares = iw * ih / area
    shares[r] = 0.0
    return float(min(shares.max(), 1.0))


def geometry_agreement(predicate: str | None, a, b) -> float:
    """How far boxes ``a`` (the subject) and ``b`` (xyxy) bear out a predicate (canonical, as
    ``pipeline.parse`` gives it): 1 when they say it, 0 when they contradict it, 0.5 when they are
    only consistent with it or cannot check it.

    Positions: boxes that intersect say "overlapping"; apart, the axis with the larger offset of
    the centres says "left of" / "right of" or "above" / "below", the other axis is consistent with
    its own direction (0.5), and a direction the centres contradict, or "overlapping" of boxes
    apart, is 0. A direction between intersecting boxes is 0.5 when the centres lie that way.
    Sizes ("larger than", "smaller than"): the box areas. "inside": at least 90 % of the subject's
    box within the object's. Other predicates (e.g. "holding", "next to"), or a box of no area: 0.5."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    ix, iy = min(ax2, bx2) - max(ax1, bx1), min(ay2, by2) - max(ay1, by1)
    intersect = ix > 0 and iy > 0
    area_a, area_b = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0), max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    if area_a <= 0 or area_b <= 0:
        return UNKNOWN_AGREEMENT
    if predicate == "overlapping":
        return 1.0 if intersect else 0.0
    if predicate in ("larger than", "smaller than"):
        return UNKNOWN_AGREEMENT if area_a == area_b else float((area_a > area_b) == (predicate == "larger than"))
    if predicate == "inside":
        return float(intersect and ix * iy >= 0.9 * area_a)
    directions = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    if predicate not in directions:
        return UNKNOWN_AGREEMENT
    axis, sign = directions[predicate]
    offset = ((ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2)
    if offset[axis] * sign <= 0:
        return 0.0  # the centres lie the other way (or level)
    if intersect:
        return UNKNOWN_AGREEMENT
    dominant = 0 if abs(offset[0]) >= abs(offset[1]) else 1  # a tie: the horizontal, as synth.world.relation
    return 1.0 if axis == dominant else UNKNOWN_AGREEMENT


# Metrics ------------------------------------------------------------------------------------------

def ece(probabilities: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of |accuracy - mean probability|,
    weighted by the share of answers in the bin."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    index = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def auroc(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """P(a right answer scores higher than a wrong one), ties counting half; nan without both."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# The calibrator -----------------------------------------------------------------------------------

@dataclass
class KindCalibrator:
    """Logistic regression on the standardised signals of one kind of answer."""

    features: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    examples: int = 0
    base_rate: float = 0.0
    # a monotone correction of the logistic output, fitted after it (isotonic regression: the
    # logistic curve cannot bend to every kind's), as points to interpolate; empty: none
    iso_x: list[float] = field(default_factory=list)
    iso_y: list[float] = field(default_factory=list)

    def probability(self, features: dict[str, float]) -> float:
        return self._correct(self._logistic(np.array([[features[f] for f in self.features]], dtype=np.float64)))[0]

    def _logistic(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(((x - self.mean) / self.std) @ np.asarray(self.weights) + self.bias)))

    def _correct(self, p: np.ndarray) -> list[float]:
        """The isotonic correction, if fitted; never exactly 0 or 1 (so that a threshold of 1.0 keeps nothing)."""
        return np.clip(np.interp(p, self.iso_x, self.iso_y) if self.iso_x else p, PROBABILITY_FLOOR,
                       1 - PROBABILITY_FLOOR).tolist()

    @classmethod
    def fit(cls, examples: Sequence[Example], features: Sequence[str] = FEATURES, l2: float = 1.0,
            iterations: int = 50, isotonic_from: int = ISOTONIC_FROM) -> "KindCalibrator":
        """L2-regularised logistic regression by Newton's method (the bias unpenalised), then, with at
        least ``isotonic_from`` examples, isotonic regression of the right answers on its output.
        With only right (or only wrong) examples it returns that constant rate."""
        x = np.array([[e.features[f] for f in features] for e in examples], dtype=np.float64)
        y = np.array([e.correct for e in examples], dtype=np.float64)
        mean = x.mean(0) if len(x) else np.zeros(len(features))
        std = x.std(0) if len(x) else np.ones(len(features))
        std = np.where(std > 1e-9, std, 1.0)
        rate = float(y.mean()) if len(y) else 0.5
        if len(y) == 0 or rate in (0.0, 1.0):
            clipped = min(max(rate, 1e-4), 1 - 1e-4)
            return cls(list(features), mean.tolist(), std.tolist(), [0.0] * len(features),
                       math.log(clipped / (1 - clipped)), len(y), rate)
        z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
        w = np.zeros(z.shape[1])
        penalty = np.full(z.shape[1], l2)
        penalty[-1] = 0.0
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(z @ w)))
            grad = z.T @ (p - y) + penalty * w
            hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        fitted = cls(list(features), mean.tolist(), std.tolist(), w[:-1].tolist(), float(w[-1]), len(y), rate)
        if len(y) >= isotonic_from:
            fitted.iso_x, fitted.iso_y = isotonic(fitted._logistic(x), y)
        return fitted


def isotonic(scores: np.ndarray, correct: np.ndarray, floor: float = 1e-3) -> tuple[list[float], list[float]]:
    """Isotonic regression (pool adjacent violators) of ``correct`` on ``scores`` -> the blocks'
    mean scores and rates, to interpolate between (rates kept within [floor, 1 - floor])."""
    order = np.argsort(scores, kind="stable")
    blocks: list[list[float]] = []  # [sum of correct, count, sum of scores]
    for s, c in zip(np.asarray(scores, np.float64)[order], np.asarray(correct, np.float64)[order]):
        blocks.append([c, 1.0, s])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] >= blocks[-1][0] * blocks[-2][1]:
            c2, n2, s2 = blocks.pop()
            blocks[-1][0] += c2
            blocks[-1][1] += n2
            blocks[-1][2] += s2
    xs = [b[2] / b[1] for b in blocks]
    ys = [min(max(b[0] / b[1], floor), 1 - floor) for b in blocks]
    return xs, ys


@dataclass
class Calibration:
    """One calibrator per kind of answer, with the metrics it was fitted and checked with."""

    kinds: dict[str, KindCalibrator]
    metrics: dict = field(default_factory=dict)
    fitted_on: dict = field(default_factory=dict)
    # per kind, the probability threshold tuned on labelled validation answers
    # (``thresholds_for_precision``); the export policy's default when this calibration is used
    thresholds: dict[str, float] = field(default_factory=dict)

    def probability(self, kind: str, features: dict[str, float]) -> float | None:
        """The probability that an answer of ``kind`` with these signals is right (None: no
        calibrator for that kind)."""
        c = self.kinds.get(kind)
        return None if c is None else c.probability(features)

    @classmethod
    def fit(cls, examples: Iterable[Example], **kw) -> "Calibration":
        by_kind: dict[str, list[Example]] = {}
        for e in examples:
            by_kind.setdefault(e.kind, []).append(e)
        return cls({k: KindCalibrator.fit(v, **kw) for k, v in sorted(by_kind.items())})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "kinds": {k: c.__dict__ for k, c in self.kinds.items()},
                "metrics": self.metrics, "fitted_on": self.fitted_on, "thresholds": self.thresholds}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a roiscribe calibration (format {data.get('format')!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has calibration format {data['format_version']}; this roiscribe reads up to "
                             f"{FORMAT_VERSION}")
        return cls({k: KindCalibrator(**v) for k, v in data["kinds"].items()}, data.get("metrics", {}),
                   data.get("fitted_on", {}), data.get("thresholds", {}))


def evaluate(calibration: Calibration, examples: Sequence[Example]) -> dict[str, dict[str, float]]:
    """Per kind, and for all answers pooled (``all``, regions excluded): examples, accuracy, and ECE
    and AUROC before (``exp(mean log-prob)``; a region: its detector score) and after calibration."""
    out = {}
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.kind, []).append(e)
    groups["all"] = [e for e in examples if e.kind != "region" and e.kind in calibration.kinds]
    for kind, group in groups.items():
        if not group:
            continue
        y = [e.correct for e in group]
        before = [e.baseline() for e in group]
        after = [calibration.probability(e.kind, e.features) for e in group]
        if any(a is None for a in after):
            continue
        out[kind] = {"examples": len(group), "accuracy": float(np.mean(y)),
                     "ece_before": ece(before, y), "ece_after": ece(after, y),
                     "auroc_before": auroc(before, y), "auroc_after": auroc(after, y)}
    return out


def signal_report(examples: Sequence[Example]) -> dict[str, dict[str, float]]:
    """Per kind: each signal's own AUROC (0.5: it says nothing; below 0.5: higher means wrong)."""
    out = {}
    kinds = sorted({e.kind for e in examples})
    for kind in kinds:
        group = [e for e in examples if e.kind == kind]
        y = [e.correct for e in group]
        out[kind] = {f: auroc([e.features[f] for e in group], y) for f in FEATURES}
    return out


def split(examples: Sequence[Example], images: Sequence[int], holdout: float, seed: int) -> tuple[list, list]:
    """(fit, held out) by image (``images[i]`` is example i's image), so that no image's answers
    are on both sides."""
    unique = sorted(set(images))
    if not unique:
        raise ValueError("no answers to split: the pipeline answered nothing on these images (no detections?)")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, int(round(len(unique) * holdout))), replace=False).tolist())
    fit = [e for e, i in zip(examples, images) if i not in held]
    test = [e for e, i in zip(examples, images) if i in held]
    return fit, test


def thresholds_for_precision(calibration: Calibration, examples: Sequence[Example], precision: float,
                             grid: Sequence[float] = tuple(np.round(np.arange(0.0, 1.0, 0.05), 2)),
                             per_class: bool = False, min_class_examples: int = 30) -> dict[str, float]:
    """Per kind, the lowest probability threshold (from ``grid``) at which the answers kept on
    labelled validation ``examples`` (never the scenes a result is reported on) are right at least
    ``precision`` of the time; a kind that never reaches it gets the grid point of best precision
    among those that keep at least a tenth of its answers (ties: the higher threshold). A kind
    without a calibrator or examples gets none. The export policy's ``min_probability``.

    With ``per_class``, regions also get one threshold per detector class (``"region:<class>"``,
    from the examples' ``label``; classes with at least ``min_class_examples``): the region
    probability is fitted on all classes together, so a class the detector confuses (its boxes
    often real objects of another class) is over-trusted by it, and a precise class is
    under-used (a class's threshold may be lower than the kind's; its grid goes on to 0.99). A
    class that never reaches ``precision`` gets 1.0 (no calibrated probability reaches it: its
    boxes are kept out of the detector exports, and masked out of the YOLO images with
    ``mask_rejected``). Not the default: in the pseudo-label loop (README) it helped a detector
    student fine-tuned from the teacher (mAP50 0.715 against 0.690) and hurt one trained from
    scratch (0.582 against 0.635), and neither beat training on the labelled images alone."""
    out = {}
    for kind in sorted({e.kind for e in examples}):
        group = [e for e in examples if e.kind == kind]
        probs = [calibration.probability(kind, e.features) for e in group]
        if not group or any(p is None for p in probs):
            continue
        p = np.asarray(probs, float)
        y = np.asarray([e.correct for e in group], bool)
        best = _threshold(p, y, precision, grid, fallback=True)
        if best is not None:
            out[kind] = best
        if kind == "region" and per_class:
            labels = np.asarray([e.label for e in group], object)
            for label in sorted({e.label for e in group if e.label is not None}):
                mine = labels == label
                if mine.sum() >= min_class_examples:
                    found = _threshold(p[mine], y[mine], precision, (*grid, 0.96, 0.97, 0.98, 0.99), fallback=False)
                    out[f"region:{label}"] = 1.0 if found is None else found
    return out


def _threshold(p: np.ndarray, y: np.ndarray, precision: float, grid: Sequence[float], fallback: bool) -> float | None:
    best, best_precision = None, -1.0
    for t in grid:
        kept = p >= t
        if not kept.any():
            break
        share = float(y[kept].mean())
        if share >= precision:
            return float(t)
        if fallback and kept.mean() >= 0.1 and share >= best_precision:
            best, best_precision = float(t), share
    return best


def format_report(metrics: dict, signals: dict | None = None) -> str:
    """The metrics (and the signals' AUROCs) as text tables."""
    lines = ["kind       answers  accuracy  ECE before  ECE after  AUROC before  AUROC after"]
    for kind, m in metrics.items():
        lines.append(f"{kind:<10} {m['examples']:>7}  {m['accuracy']:>8.3f}  {m['ece_before']:>10.3f}  "
                     f"{m['ece_after']:>9.3f}  {m['auroc_before']:>12.3f}  {m['auroc_after']:>11.3f}")
    if signals:
        lines += ["", "AUROC of each signal alone (0.5: says nothing)",
                  "kind       " + "  ".join(f"{f:>14}" for f in FEATURES)]
        for kind, row in signals.items():
            lines.append(f"{kind:<10} " + "  ".join(f"{row[f]:>14.3f}" for f in FEATURES))
    return "\n".join(lines)


# Applying a calibration to results ----------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def load_calibration(path: str) -> Calibration:
    """``Calibration.load``, once per path in a process (every batch of a job asks)."""
    return Calibration.load(path)


def apply(result, calibration: Calibration) -> None:
    """Set the calibrated probability of every answer, relation and region of an ``ok``
    ``ImageResult`` (None for a kind the calibration has no calibrator for, or an unparsed answer)."""
    import dataclasses

    if not result.ok:
        return
    result.region_probabilities = []
    for r in range(len(result.regions)):
        signals = region_signals(result, r)
        result.region_probabilities.append(calibration.probability("region", signals["region"]))
        answers = result.answers[r] if r < len(result.answers) else {}
        for name, answer in answers.items():
            p = calibration.probability(name, signals[name]) if name in signals and answer.value is not None else None
            answers[name] = dataclasses.replace(answer, probability=p)
    result.relations = [
        dataclasses.replace(rel, probability=calibration.probability("relation", relation_signals(result, rel))
                            if rel.predicate is not None else None)
        for rel in result.relations]
