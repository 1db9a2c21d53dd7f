"""Answer parsing: free-text answers -> captions, attribute values, relation triples.

Pure functions. Nothing is dropped: every parsed answer keeps its raw text, and an answer that
names nothing in the vocabulary (or is empty) comes back with ``value=None`` and a status that
says so, never as an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OK, UNKNOWN, EMPTY = "ok", "unknown", "empty"

# canonical value -> spellings that mean it (the canonical word matches itself)
VOCABULARIES: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "red": ("crimson", "scarlet"), "orange": (), "yellow": (), "green": (), "blue": ("navy",),
        "purple": ("violet",), "pink": (), "brown": ("tan",), "black": (), "white": (),
        "gray": ("grey",), "cyan": ("turquoise",), "magenta": (), "gold": ("golden",), "silver": (),
    },
    "shape": {
        "circle": ("circular", "round"), "square": (), "triangle": ("triangular",),
        "rectangle": ("rectangular",), "star": (), "hexagon": ("hexagonal",), "pentagon": ("pentagonal",),
        "ellipse": ("oval", "elliptical"), "diamond": (), "cross": (), "heart": (), "ring": (),
    },
    "material": {
        "wood": ("wooden",), "metal": ("metallic", "steel", "iron", "aluminium", "aluminum"), "plastic": (),
        "glass": (), "stone": ("rock", "marble"), "fabric": ("cloth", "cotton", "textile"), "rubber": (),
        "paper": ("cardboard",), "leather": (), "ceramic": ("porcelain",), "concrete": (),
    },
    "action": {
        "standing": ("stands",), "sitting": ("sits", "seated"), "walking": ("walks",), "running": ("runs",),
        "holding": ("holds",), "riding": ("rides",), "lying": ("lies", "laying"), "eating": ("eats",),
        "playing": ("plays",), "jumping": ("jumps",), "flying": ("flies",), "driving": ("drives",),
        "talking": ("talks",), "looking": ("looks", "watching"), "reading": ("reads",),
        "none": ("nothing", "still", "static", "stationary"),
    },
}

PREDICATES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "on the left of", "left of"),
    "right of": ("to the right of", "on the right of", "right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "underneath", "beneath"),
    "overlapping": ("overlapping", "overlaps", "overlap with", "overlaps with", "intersects"),
    "larger than": ("larger than", "bigger than"),
    "smaller than": ("smaller than",),
    "inside": ("inside", "within", "contained in"),
    "next to": ("next to", "beside", "adjacent to", "near"),
    "in front of": ("in front of",),
    "behind": ("behind",),
    "holding": ("holding", "holds"),
    "riding": ("riding", "rides"),
    "wearing": ("wearing", "wears"),
}

_NEGATIONS = ("not ", "no ", "isn't ", "isnt ", "never ")
_REGION = re.compile(r"region\s?(\d+)")


@dataclass(frozen=True)
class ParsedAnswer:
    value: str | None
    raw: str
    status: str  # ok | unknown | empty


@dataclass(frozen=True)
class Relation:
    """``subject`` and ``object`` index the image's regions."""

    subject: int
    predicate: str | None
    object: int
    raw: str
    status: str


def _normal(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def _first_match(text: str, table: dict[str, tuple[str, ...]]) -> tuple[str | None, int]:
    """The canonical entry whose spelling occurs first (longest spelling wins a tie), skipping
    negated mentions ("not red") -> (value, position in the normalised text)."""
    norm = _normal(text)
    best: tuple[int, int, str] | None = None
    for canonical, spellings in table.items():
        for spelling in (canonical, *spellings):
            needle = f" {_normal(spelling).strip()} "
            start = 0
            while (pos := norm.find(needle, start)) >= 0:
                start = pos + 1
                if any(norm[:pos + 1].endswith(" " + neg) for neg in _NEGATIONS):
                    continue
                key = (pos, -len(needle), canonical)
                if best is None or key < best:
                    best = key
                break
    return (best[2], best[0]) if best else (None, -1)


def parse_caption(answer: str) -> ParsedAnswer:
    text = " ".join(answer.split())
    return ParsedAnswer(text or None, answer, OK if text else EMPTY)


def parse_attribute(field: str, answer: str) -> ParsedAnswer:
    """An attribute answer normalised to the field's vocabulary (``value=None`` when it names none)."""
    if not answer.strip():
        return ParsedAnswer(None, answer, EMPTY)
    table = VOCABULARIES.get(field)
    if table is None:  # an attribute without a vocabulary keeps its text
        return ParsedAnswer(" ".join(answer.split()), answer, OK)
    value, _ = _first_match(answer, table)
    return ParsedAnswer(value, answer, OK if value else UNKNOWN)


def parse_relation(answer: str, regions: tuple[int, int]) -> Relation:
    """A relation answer about ``regions`` (the image's indices of the question's region1 and
    region2) -> (subject, predicate, object). Region words in the answer decide the direction
    ("region2 is left of region1"); without them, region1 is the subject."""
    first, second = regions
    if not answer.strip():
        return Relation(first, None, second, answer, EMPTY)
    predicate, at = _first_match(answer, PREDICATES)
    if predicate is None:
        return Relation(first, None, second, answer, UNKNOWN)
    norm = _normal(answer)
    before = [int(n) for n in _REGION.findall(norm[:at])]
    after = [int(n) for n in _REGION.findall(norm[at:])]
    local = {1: first, 2: second}
    subject_no = before[0] if before and before[0] in local else (3 - after[0] if after and after[0] in local else 1)
    return Relation(local[subject_no], predicate, local[3 - subject_no], answer, OK)
