"""What a reviewer needs beside the answers: how confident each answer is, where the detector's
box label and the model's answer about the same property disagree, and which relations come first.

Pure functions over plain values, so that the Label Studio push, the preview page and
pseudo-label signals (over records or over Arrow rows) apply the same rules.

The disagreement rule. A detector's classes sometimes name a property the model is also asked
about: the demo detector's classes are shapes, and the model answers "What shape is region1?".
An attribute is *compared with the box label* when every class of a run is a word of that
attribute's vocabulary (``pipeline.parse.VOCABULARIES``, synonyms included: a class "round" is the
shape "circle"). A region whose label names one value and whose answer names another disagrees.
The box label stays the detector's class (the detector is what proposed the box; the model's
answer stays in its own attribute field): the disagreement is flagged for review, never resolved
silently. Classes such as COCO's ("person", "car") name no attribute, so nothing is compared.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence, TypeVar

R = TypeVar("R")


def confidence(mean_logprob: float | None, min_logprob: float | None) -> float | None:
    """An answer's confidence in [0, 1]: the probability of its least likely token (for the short
    answers asked here, the token that decides the value), else the mean token probability;
    None when the answer has no log-probs (e.g. a row written by another tool)."""
    logprob = min_logprob if min_logprob is not None else mean_logprob
    if logprob is None or math.isnan(logprob):
        return None
    return math.exp(min(float(logprob), 0.0))


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def vocabulary_value(attribute: str, text: str) -> str | None:
    """The canonical value of ``attribute`` that the whole of ``text`` names (a canonical word or
    one of its spellings, case and punctuation ignored), else None: "Hexagonal" -> "hexagon",
    "red car" -> None (a label that merely contains a colour word is not a colour)."""
    from pipeline.parse import VOCABULARIES

    words = _words(text)
    for canonical, spellings in VOCABULARIES.get(attribute, {}).items():
        if words in (_words(canonical), *(_words(s) for s in spellings)):
            return canonical
    return None


def label_attributes(classes: Iterable[str], attributes: Iterable[str]) -> list[str]:
    """The attributes (of those asked) compared with the box label: those whose vocabulary names
    every one of ``classes``. Empty without classes."""
    classes = [c for c in classes if c]
    if not classes:
        return []
    return [a for a in attributes if all(vocabulary_value(a, c) is not None for c in classes)]


def label_disagreements(label: str, answers: Mapping[str, str | None], compared: Iterable[str]) -> list[str]:
    """The compared attributes whose answer (``answers``: attribute -> parsed value) names another
    value than the box ``label``. An unparsed answer (None) or a label outside the attribute's
    vocabulary disagrees with nothing."""
    out = []
    for attribute in compared:
        said = answers.get(attribute)
        named = vocabulary_value(attribute, label or "")
        if said and named and vocabulary_value(attribute, said) != named:
            out.append(attribute)
    return out


def top_relations(relations: Sequence[R], confidences: Sequence[float | None], limit: int | None) -> list[R]:
    """At most ``limit`` relations (None: all), the most confident first; equal confidences keep
    their order, and a relation without a confidence comes after those with one."""
    order = sorted(range(len(relations)), key=lambda i: (confidences[i] is None, -(confidences[i] or 0.0), i))
    return [relations[i] for i in order[:limit if limit is not None else len(order)]]
