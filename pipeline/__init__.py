"""The pipeline: records, decoding, post-processing, instruction composition, parsing, the batch
stages every runner calls, and ``annotate()`` (all of it in one process).

Never imports Ray, Label Studio or ultralytics. Modules that pull in torch or pyarrow
(``stages``, ``flow``, ``arrow``) are loaded on first use, so ``pipeline.records`` stays cheap.
"""

from importlib import import_module

from .compose import ComposeConfig, Instruction, Templates, compose, select_pairs
from .decode import ImageDecodeError, ImageSource, decode_image
from .parse import ParsedAnswer, Relation, parse_attribute, parse_caption, parse_relation
from .postprocess import PostProcess, postprocess
from .records import ERROR, OK, Answer, DecodedImage, ImageResult, Regions, RelationAnswer

_LAZY = {
    "annotate": ".flow",
    "PipelineConfig": ".stages", "decode_stage": ".stages", "detect_stage": ".stages", "describe_stage": ".stages",
    "run_stages": ".stages",
    "Provenance": ".arrow", "SCHEMA": ".arrow", "SCHEMA_VERSION": ".arrow", "from_table": ".arrow", "to_table": ".arrow",
}

__all__ = [
    "ERROR", "OK", "Answer", "ComposeConfig", "DecodedImage", "ImageDecodeError", "ImageResult", "ImageSource",
    "Instruction", "ParsedAnswer", "PostProcess", "Regions", "Relation", "RelationAnswer", "Templates", "compose",
    "decode_image", "parse_attribute", "parse_caption", "parse_relation", "postprocess", "select_pairs", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
