"""The in-process annotation flow: records, decoding, instruction composition, parsing, annotate().

Never imports Ray, Label Studio or ultralytics at module level. ``annotate`` (which pulls in the
model and transformers) is loaded on first use, so ``pipeline.records`` stays cheap to import.
"""

from importlib import import_module

from .compose import ComposeConfig, Instruction, Templates, compose, select_pairs
from .decode import ImageDecodeError, ImageSource, decode_image
from .parse import ParsedAnswer, Relation, parse_attribute, parse_caption, parse_relation
from .records import DecodedImage, Regions

_LAZY = {name: ".flow" for name in ("AnnotateConfig", "Answer", "ImageResult", "RelationAnswer", "annotate")}

__all__ = [
    "AnnotateConfig", "Answer", "ComposeConfig", "DecodedImage", "ImageDecodeError", "ImageResult", "ImageSource",
    "Instruction", "ParsedAnswer", "Regions", "Relation", "RelationAnswer", "Templates", "annotate", "compose",
    "decode_image", "parse_attribute", "parse_caption", "parse_relation", "select_pairs",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
