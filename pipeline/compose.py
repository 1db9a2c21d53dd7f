"""Instruction composition: from an image's regions to the questions GPT4RoI is asked.

Pure functions over :class:`~pipeline.records.Regions`. Every question names its regions as
``<region1>``, ``<region2>``... numbered within the question; :class:`Instruction.regions` maps
those numbers to indices into the image's regions. The model sees ``region1 <bbox>`` (see
``model.prompt``).

The default caption wording is taken from the official GPT4RoI training templates (RefCOCOg / VG
region questions, Flickr30k multi-region questions), so real checkpoints are asked what they were
trained on. Attribute and relation questions have no official template; theirs are short VG-style
questions. All wording lives in :class:`Templates`; its ``version`` is recorded with every output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .records import Regions

TEMPLATES_VERSION = "v1"


@dataclass(frozen=True)
class Templates:
    version: str = TEMPLATES_VERSION
    caption_brief: str = "What can you tell me about the region indicated by <region1> in the image?"
    caption_detailed: str = "Could you describe the region shown as <region1> in the picture in great detail?"
    attributes: dict[str, str] = field(default_factory=lambda: {
        "color": "What is the color of <region1>?",
        "shape": "What is the shape of <region1>?",
        "material": "What is <region1> made of?",
        "action": "What is <region1> doing?",
    })
    relation: str = "What is the relationship between <region1> and <region2>?"


@dataclass(frozen=True)
class AnswerTokens:
    """The longest answer, in tokens, each kind of question may get (``engine.max_new_tokens``
    caps them all). A brief caption of one region is a phrase; a detailed one is a paragraph (the
    official demo allowed 1024 tokens for its free-form answers); an attribute is a word or two; a
    relation names both regions and a predicate."""

    caption: int = 64
    caption_detailed: int = 512
    attribute: int = 16
    relation: int = 32

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"answer_tokens.{name} must be a whole number >= 1, got {value!r}")

    def of(self, kind: str, field_name: str) -> int:
        return self.caption_detailed if field_name == "caption_detailed" else getattr(self, kind)


@dataclass(frozen=True)
class ComposeConfig:
    captions: tuple[str, ...] = ("brief",)  # any of "brief", "detailed"
    attributes: tuple[str, ...] = ("color", "shape", "material", "action")
    relations: bool = True
    max_pairs: int = 8  # relation questions per image
    nearest_k: int = 2  # besides overlapping pairs, each region's k nearest neighbours
    max_size_ratio: float = 50.0  # skip pairs whose areas differ more than this
    templates: Templates = field(default_factory=Templates)
    answer_tokens: AnswerTokens = field(default_factory=AnswerTokens)

    def __post_init__(self) -> None:
        unknown = set(self.captions) - {"brief", "detailed"}
        if unknown:
            raise ValueError(f"unknown caption kinds {sorted(unknown)}; valid: brief, detailed")
        missing = set(self.attributes) - set(self.templates.attributes)
        if missing:
            raise ValueError(f"no template for attributes {sorted(missing)}; templates exist for "
                             f"{sorted(self.templates.attributes)}")


@dataclass(frozen=True)
class Instruction:
    """One question: ``field`` is what its answer fills ("caption", "color", "relation"...)."""

    kind: str  # "caption" | "attribute" | "relation"
    field: str
    question: str
    regions: tuple[int, ...]
    max_new_tokens: int | None = None  # the answer's length limit (``ComposeConfig.answer_tokens``)


def compose(regions: Regions, config: ComposeConfig = ComposeConfig()) -> list[Instruction]:
    """All instructions for one image, in a deterministic order: per region its captions and
    attributes (regions in their given order), then the selected pairs."""
    t, limit = config.templates, config.answer_tokens
    out: list[Instruction] = []
    for i in range(len(regions)):
        for kind in config.captions:
            template, name = (t.caption_brief, "caption") if kind == "brief" else (t.caption_detailed, "caption_detailed")
            out.append(Instruction("caption", name, template, (i,), limit.of("caption", name)))
        for name in config.attributes:
            out.append(Instruction("attribute", name, t.attributes[name], (i,), limit.attribute))
    if config.relations:
        for i, j in select_pairs(regions, config):
            out.append(Instruction("relation", "relation", t.relation, (i, j), limit.relation))
    return out


def select_pairs(regions: Regions, config: ComposeConfig = ComposeConfig()) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, worth a relation question: overlapping pairs first (larger IoU first),
    then each region's ``nearest_k`` neighbours by centre distance (nearer first); pairs whose
    areas differ more than ``max_size_ratio`` are skipped; at most ``max_pairs``. Deterministic:
    ties break on (i, j)."""
    n = len(regions)
    if n < 2 or config.max_pairs <= 0:
        return []
    boxes = regions.boxes.astype(np.float64)
    iou = _pairwise_iou(boxes)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    areas = np.maximum(regions.areas().astype(np.float64), 1e-9)
    ratio = np.maximum(areas[:, None], areas[None]) / np.minimum(areas[:, None], areas[None])

    candidates: dict[tuple[int, int], tuple] = {}
    for i in range(n):
        for j in range(i + 1, n):
            if iou[i, j] > 0 and ratio[i, j] <= config.max_size_ratio:
                candidates[(i, j)] = (0, -iou[i, j], i, j)
    for i in range(n):
        neighbours = sorted((dist[i, j], j) for j in range(n) if j != i)[: config.nearest_k]
        for d, j in neighbours:
            pair = (min(i, j), max(i, j))
            if pair not in candidates and ratio[pair] <= config.max_size_ratio:
                candidates[pair] = (1, d, *pair)
    return [pair for pair, _ in sorted(candidates.items(), key=lambda kv: kv[1])][: config.max_pairs]


def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    return inter / np.maximum(area[:, None] + area[None] - inter, 1e-9)
