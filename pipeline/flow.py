"""``annotate()``: the whole pipeline in one process, for a list of images.

decode -> detect -> post-process -> compose -> describe (the batched engine) -> parse, through the
public stages of ``pipeline.stages`` (the same ones every runner calls). Every input yields exactly
one :class:`ImageResult`, with ``status`` "ok" or "error" and the reason; nothing raises for a bad
image, and one bad image never fails its batch.
"""

from __future__ import annotations

from typing import Sequence

from .decode import ImageSource
from .records import ImageResult
from .stages import PipelineConfig, run_stages


def annotate(images: Sequence[ImageSource | str | bytes], detector, model,
             config: PipelineConfig = PipelineConfig()) -> list[ImageResult]:
    """One result per input image, in input order. ``detector`` has ``detect(list[DecodedImage])``;
    ``model`` is a loaded model (``model.checkpoint.Loaded``) or a ``model.engine.RegionEngine``."""
    from model.engine import RegionEngine

    engine = model if isinstance(model, RegionEngine) else RegionEngine(model, config.engine)
    sources = [ImageSource.of(item, i) for i, item in enumerate(images)]
    results: list[ImageResult] = []
    for start in range(0, len(sources), config.batch_size):
        results.extend(run_stages(sources[start:start + config.batch_size], detector, engine, config))
    return results
