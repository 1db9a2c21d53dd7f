"""The Vicuna v0 conversation template of GPT4RoI, and region references.

A single-question inference prompt, exactly as the official model was trained and served::

    {system}\\n\\n### Human: The <image> provides an overview of the picture.\\n{question}\\n###{space}

The model continues with ``Assistant: {answer}\\n###``; :func:`cut_answer` extracts the answer.
A region is written ``region{i} <bbox>``: the plain word keeps the index the model can refer back
to, and the ``<bbox>`` token's embedding is replaced by that region's feature token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from .config import VICUNA_V0_SYSTEM
from .tokenizer import IMAGE_PLACEHOLDER

BBOX_TOKEN = "<bbox>"
IMAGE_PREAMBLE = f"The {IMAGE_PLACEHOLDER} provides an overview of the picture.\n"
SEP = "\n### "
STOP = "###"
HUMAN, ASSISTANT = "Human", "Assistant"

_REGION_TAG = re.compile(r"<region(\d+)>")


def region_ref(index: int) -> str:
    """How region ``index`` (1-based) is written in a prompt: ``region1 <bbox>``."""
    if index < 1:
        raise ValueError(f"region numbers start at 1, got {index}")
    return f"region{index} {BBOX_TOKEN}"


def expand_region_tags(question: str) -> str:
    """The demo syntax ``<region1>`` -> ``region1 <bbox>``, as the official demo rewrote it."""
    return _REGION_TAG.sub(lambda m: region_ref(int(m.group(1))), question)


def region_order(text: str) -> list[int]:
    """1-based region numbers in the order their ``<bbox>`` tokens appear in ``text``.

    Each ``<bbox>`` must follow its ``region{i}`` word; the i-th ``<bbox>`` gets the i-th entry.
    """
    found = re.findall(r"region\s?(\d+)\s*" + re.escape(BBOX_TOKEN), text)
    if len(found) != text.count(BBOX_TOKEN):
        raise ValueError(
            f"every {BBOX_TOKEN} must follow a 'region<N>' word: {text.count(BBOX_TOKEN)} {BBOX_TOKEN} "
            f"tokens but {len(found)} 'region<N> {BBOX_TOKEN}' references in {text!r}"
        )
    return [int(n) for n in found]


@dataclass
class Conversation:
    """A Vicuna v0 conversation. The first human turn carries the image preamble."""

    system: str = VICUNA_V0_SYSTEM
    turns: list[tuple[str, str]] = field(default_factory=list)

    def ask(self, question: str) -> "Conversation":
        text = question if self.turns else IMAGE_PREAMBLE + question
        self.turns.append((HUMAN, text))
        return self

    def answer(self, text: str) -> "Conversation":
        self.turns.append((ASSISTANT, text))
        return self

    def render(self) -> str:
        """The text up to the point where the model speaks next (ends with ``"\\n### "``)."""
        body = SEP.join(f"{role}: {text}" for role, text in self.turns)
        return f"{self.system}\n\n### {body}{SEP}"


def build_prompt(question: str, system: str = VICUNA_V0_SYSTEM) -> str:
    """A single-question prompt (``<region1>`` tags are expanded)."""
    return Conversation(system).ask(expand_region_tags(question)).render()


def build_multiturn(qa: Sequence[tuple[str, str]], question: str, system: str = VICUNA_V0_SYSTEM) -> str:
    """Earlier (question, answer) turns followed by a new question."""
    conv = Conversation(system)
    for q, a in qa:
        conv.ask(expand_region_tags(q)).answer(a)
    return conv.ask(expand_region_tags(question)).render()


def cut_answer(generated: str) -> str:
    """The answer in a continuation: cut at ``###``, strip the ``Assistant:`` prefix."""
    text = generated.split(STOP, 1)[0].strip()
    prefix = f"{ASSISTANT}:"
    if text.startswith(prefix):
        text = text[len(prefix):]
    return text.strip()
