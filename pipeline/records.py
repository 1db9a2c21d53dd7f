"""The records that travel from the decoder through the detector and the model to every sink.

``DecodedImage`` (pixels), ``Regions`` (the boxes of one image) and ``ImageResult`` (one input
image's record: status, regions, answers, relations, timings) are the only currency between
stages; ``pipeline.arrow`` converts them to and from Arrow rows (Parquet, Ray batches).

Coordinates, stated once for all of roiscribe: boxes are ``xyxy`` in absolute pixels of the
original image *after* EXIF orientation has been applied (the image a person sees), as float32.
``x2 > x1`` and ``y2 > y1``; a box never extends outside ``[0, width] x [0, height]`` once it has
passed post-processing. ``model/`` works with the same boxes divided by ``[W, H, W, H]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class DecodedImage:
    """An image ready for the detector and the model: RGB uint8 (H, W, 3), EXIF-rotated."""

    image_id: str
    uri: str
    array: np.ndarray

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def height(self) -> int:
        return int(self.array.shape[0])


@dataclass
class Regions:
    """The regions of one image, struct-of-arrays (see the module docstring for coordinates).

    ``boxes`` (N, 4) float32 pixels; ``scores`` (N,) float32 detector confidence (1.0 for given
    boxes); ``class_ids`` (N,) int64 (-1 when unknown); ``class_names`` N strings ("" when unknown);
    ``detector``: which detector made them; ``dropped``: counts of boxes removed by
    post-processing, by reason.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: list[str]
    detector: str = ""
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        n = len(self.boxes)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        self.class_names = [str(c) for c in self.class_names]
        lengths = {"scores": len(self.scores), "class_ids": len(self.class_ids), "class_names": len(self.class_names)}
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"Regions: {n} boxes but " + ", ".join(f"{v} {k}" for k, v in bad.items()))

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls, detector: str = "") -> "Regions":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), [], detector)

    @classmethod
    def from_boxes(cls, boxes: Sequence[Sequence[float]], class_names: Sequence[str] | None = None,
                   scores: Sequence[float] | None = None, detector: str = "given") -> "Regions":
        """Regions from plain pixel boxes (scores default to 1, classes to unknown)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        n = len(boxes)
        names = list(class_names) if class_names is not None else [""] * n
        return cls(boxes, np.ones(n) if scores is None else scores, np.full(n, -1), names, detector)

    def select(self, index: np.ndarray | Sequence[int]) -> "Regions":
        """The regions at ``index`` (an integer index array or a boolean mask), in that order."""
        index = np.asarray(index)
        if index.size == 0:
            index = index.astype(np.int64)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return Regions(self.boxes[index], self.scores[index], self.class_ids[index],
                       [self.class_names[i] for i in index], self.detector, dict(self.dropped))

    def normalized(self, width: int, height: int) -> np.ndarray:
        """(N, 4) boxes divided by [W, H, W, H]: what ``model/`` takes."""
        return (self.boxes / np.array([width, height, width, height], np.float32)).clip(0.0, 1.0)

    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])


OK, ERROR = "ok", "error"


@dataclass(frozen=True)
class Answer:
    """A parsed answer with its confidence (mean and min token log-prob of the generation)."""

    value: str | None
    raw: str
    status: str
    mean_logprob: float
    min_logprob: float
    probability: float | None = None  # calibrated probability of being right (``pipeline.calibrate``), if any


@dataclass(frozen=True)
class RelationAnswer:
    subject: int
    predicate: str | None
    object: int
    raw: str
    status: str
    mean_logprob: float
    min_logprob: float
    probability: float | None = None


@dataclass
class ImageResult:
    """One input image's record. ``status`` is ``ok`` or ``error`` (``error`` says why); every
    input image yields exactly one. ``image`` holds the decoded pixels while the record is between
    stages and is dropped once the image has been described."""

    image_id: str
    uri: str
    status: str
    error: str = ""
    width: int = 0
    height: int = 0
    regions: Regions = field(default_factory=Regions.empty)
    answers: list[dict[str, Answer]] = field(default_factory=list)  # per region: field -> answer
    relations: list[RelationAnswer] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (batch stages amortised)
    region_probabilities: list[float | None] = field(default_factory=list)  # calibrated: a real object of its class
    image: DecodedImage | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def fail(self, stage: str, reason: str) -> None:
        """Mark the record an error of ``stage``; its pixels and partial results are dropped."""
        self.status, self.error, self.image = ERROR, f"{stage}: {reason}", None
        self.regions, self.answers, self.relations = Regions.empty(), [], []
