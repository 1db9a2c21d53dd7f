"""The pipeline's batch stages: decode, detect (+ post-process), describe (compose + engine + parse).

Every runner calls these and only these: ``annotate()`` in process, the caption job's local loop
and its Ray actors, the Label Studio ML backend and pull. A runner adds scheduling, never logic.

Each stage takes a batch of :class:`~pipeline.records.ImageResult` records and returns it, filled
in; records that are already errors pass through untouched. A stage never raises for an image: if
a batch fails, each image is run alone so that only the images that fail get an error row (with
the stage and the exception in ``error``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from model.config import EngineConfig

from .compose import ComposeConfig, Instruction, compose
from .decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, decode_image
from .parse import parse_attribute, parse_caption, parse_relation
from .postprocess import PostProcess, postprocess
from .records import ERROR, OK, Answer, ImageResult, RelationAnswer


@dataclass(frozen=True)
class PipelineConfig:
    """What the stages do with each image (a job adds where images come from and how it runs)."""

    compose: ComposeConfig = field(default_factory=ComposeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    postprocess: PostProcess | None = field(default_factory=PostProcess)  # None: the detector's raw boxes
    batch_size: int = 8  # images per detect / describe batch
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded size limit (decompression bombs)
    max_bytes: int = DEFAULT_MAX_BYTES  # file size limit, checked before a file is read
    calibration: str | None = None  # a `roiscribe calibrate` file: every answer gets its probability of being right

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def decode_stage(sources: Sequence[ImageSource], config: PipelineConfig) -> list[ImageResult]:
    """One record per source: decoded pixels in ``record.image``, or an error saying why not."""
    out = []
    for source in sources:
        t = time.perf_counter()
        try:
            image = decode_image(source, config.max_pixels, config.max_bytes)
        except ImageDecodeError as e:
            out.append(ImageResult(source.image_id or source.uri, source.uri, ERROR, f"decode: {e}"))
            continue
        result = ImageResult(image.image_id, image.uri, OK, width=image.width, height=image.height, image=image)
        result.timings["decode"] = time.perf_counter() - t
        out.append(result)
    return out


def detect_stage(results: list[ImageResult], detector, config: PipelineConfig) -> list[ImageResult]:
    """Boxes for every decoded record: ``detector.detect`` then the shared post-processing."""
    def run(batch: list[ImageResult]) -> None:
        t = time.perf_counter()
        found = detector.detect([r.image for r in batch])
        if len(found) != len(batch):
            raise RuntimeError(f"detector returned {len(found)} results for {len(batch)} images")
        for result, regions in zip(batch, found):
            if config.postprocess is not None:
                regions = postprocess(regions, result.width, result.height, config.postprocess)
            result.regions = regions
        for result in batch:
            result.timings["detect"] = (time.perf_counter() - t) / len(batch)

    _isolating([r for r in results if r.ok], run, "detect")
    return results


def describe_stage(results: list[ImageResult], engine, config: PipelineConfig) -> list[ImageResult]:
    """Answers for every record with regions: compose the questions, run the batched engine
    (``model.engine.RegionEngine``) once for the batch, parse. Drops the pixels afterwards."""
    from model.engine import ImageJob, RegionPrompt

    from .calibrate import apply as apply_calibration
    from .calibrate import load_calibration

    def run(batch: list[ImageResult]) -> None:
        t = time.perf_counter()
        plans = [compose(r.regions, config.compose) for r in batch]
        jobs = [ImageJob(r.image.array, r.regions.normalized(r.width, r.height),
                         [RegionPrompt(ins.question, ins.regions, ins.max_new_tokens) for ins in plan])
                for r, plan in zip(batch, plans)]
        generations = engine.run(jobs)
        calibration = load_calibration(config.calibration) if config.calibration else None
        for result, plan, gens in zip(batch, plans, generations):
            fill_answers(result, plan, gens)
            if calibration is not None:
                apply_calibration(result, calibration)
        for result in batch:
            result.timings["describe"] = (time.perf_counter() - t) / len(batch)

    _isolating([r for r in results if r.ok], run, "describe")
    for r in results:
        r.image = None
    return results


def run_stages(sources: Sequence[ImageSource], detector, engine, config: PipelineConfig) -> list[ImageResult]:
    """One batch through decode, detect and describe."""
    return describe_stage(detect_stage(decode_stage(sources, config), detector, config), engine, config)


def fill_answers(result: ImageResult, plan: list[Instruction], generations) -> None:
    """Parse the engine's generations for ``plan`` into ``result.answers`` and ``result.relations``."""
    result.answers = [{} for _ in range(len(result.regions))]
    result.relations = []
    for ins, gen in zip(plan, generations):
        conf = (gen.mean_logprob, gen.min_logprob)
        if ins.kind == "relation":
            rel = parse_relation(gen.text, ins.regions)
            result.relations.append(RelationAnswer(rel.subject, rel.predicate, rel.object, rel.raw, rel.status, *conf))
            continue
        parsed = parse_caption(gen.text) if ins.kind == "caption" else parse_attribute(ins.field, gen.text)
        result.answers[ins.regions[0]][ins.field] = Answer(parsed.value, parsed.raw, parsed.status, *conf)


def _isolating(batch: list[ImageResult], run: Callable[[list[ImageResult]], None], stage: str) -> None:
    """Run ``run(batch)``; if the batch fails, run each image alone so that only the images that
    fail get an error row. Catches every exception on purpose: one bad image must not lose its
    batch, and no stage raises for an image."""
    if not batch:
        return
    try:
        run(batch)
        return
    except Exception as e:  # noqa: BLE001
        if len(batch) == 1:
            batch[0].fail(stage, f"{type(e).__name__}: {e}")
            return
    for item in batch:
        try:
            run([item])
        except Exception as e:  # noqa: BLE001
            item.fail(stage, f"{type(e).__name__}: {e}")
