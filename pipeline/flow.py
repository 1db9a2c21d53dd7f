"""``annotate()``: the whole pipeline in one process, for a list of images.

decode -> detect -> post-process -> compose -> describe (the batched engine) -> parse. Every input
yields exactly one :class:`ImageResult`, with ``status`` "ok" or "error" and the reason; nothing
raises for a bad image, and one bad image never fails its batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from detectors.postprocess import PostProcess, postprocess
from model.checkpoint import Loaded
from model.engine import EngineConfig, ImageJob, RegionEngine, RegionPrompt

from .compose import ComposeConfig, Instruction, compose
from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, decode_image
from .parse import parse_attribute, parse_caption, parse_relation
from .records import DecodedImage, Regions

OK, ERROR = "ok", "error"


@dataclass(frozen=True)
class AnnotateConfig:
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_new_tokens=48))
    postprocess: PostProcess | None = field(default_factory=PostProcess)  # None: the detector's raw boxes
    batch_size: int = 8  # images per detect / describe batch
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Answer:
    """A parsed answer with its confidence (mean and min token log-prob of the generation)."""

    value: str | None
    raw: str
    status: str
    mean_logprob: float
    min_logprob: float


@dataclass(frozen=True)
class RelationAnswer:
    subject: int
    predicate: str | None
    object: int
    raw: str
    status: str
    mean_logprob: float
    min_logprob: float


@dataclass
class ImageResult:
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


def annotate(images: Sequence[ImageSource | str | bytes], detector, model: Loaded | RegionEngine,
             config: AnnotateConfig = AnnotateConfig()) -> list[ImageResult]:
    """One result per input image, in input order. ``detector`` has ``detect(list[DecodedImage])``."""
    engine = model if isinstance(model, RegionEngine) else RegionEngine(model, config.engine)
    sources = [ImageSource.of(item, i) for i, item in enumerate(images)]
    results: list[ImageResult] = []
    for start in range(0, len(sources), config.batch_size):
        results.extend(_annotate_batch(sources[start:start + config.batch_size], detector, engine, config))
    return results


def _annotate_batch(sources, detector, engine, config) -> list[ImageResult]:
    results, decoded = [], []
    for source in sources:
        t = time.perf_counter()
        try:
            image = decode_image(source, config.max_pixels)
        except ImageDecodeError as e:
            results.append(ImageResult(source.image_id or source.uri, source.uri, ERROR, f"decode: {e}"))
            continue
        result = ImageResult(image.image_id, image.uri, OK, width=image.width, height=image.height)
        result.timings["decode"] = time.perf_counter() - t
        results.append(result)
        decoded.append((result, image))
    if decoded:
        _detect(decoded, detector, config)
        live = [(r, im) for r, im in decoded if r.status == OK]
        if live:
            _describe(live, engine, config)
    return results


def _isolating(items: list[tuple[ImageResult, DecodedImage]], run, stage: str) -> None:
    """Run ``run(items)``; if the batch fails, run each image alone so that only the images that
    fail get an error row. Catches every exception on purpose: one bad image must not lose its
    batch, and annotate() never raises for an image."""
    try:
        run(items)
        return
    except Exception as e:  # noqa: BLE001
        if len(items) == 1:
            _fail(items[0][0], stage, e)
            return
    for item in items:
        try:
            run([item])
        except Exception as e:  # noqa: BLE001
            _fail(item[0], stage, e)


def _fail(result: ImageResult, stage: str, error: Exception) -> None:
    result.status, result.error = ERROR, f"{stage}: {type(error).__name__}: {error}"


def _detect(decoded: list[tuple[ImageResult, DecodedImage]], detector, config) -> None:
    def run(items):
        t = time.perf_counter()
        found = detector.detect([im for _, im in items])
        if len(found) != len(items):
            raise RuntimeError(f"detector returned {len(found)} results for {len(items)} images")
        for (result, image), regions in zip(items, found):
            if config.postprocess is not None:
                regions = postprocess(regions, image.width, image.height, config.postprocess)
            result.regions = regions
            result.timings["detect"] = (time.perf_counter() - t) / len(items)

    _isolating(decoded, run, "detect")


def _describe(items: list[tuple[ImageResult, DecodedImage]], engine: RegionEngine, config) -> None:
    def run(batch):
        t = time.perf_counter()
        plans = [compose(r.regions, config.compose) for r, _ in batch]
        jobs = [ImageJob(im.array, r.regions.normalized(im.width, im.height),
                         [RegionPrompt(ins.question, ins.regions) for ins in plan])
                for (r, im), plan in zip(batch, plans)]
        generations = engine.run(jobs)
        for (result, _), plan, gens in zip(batch, plans, generations):
            _fill(result, plan, gens)
            result.timings["describe"] = (time.perf_counter() - t) / len(batch)

    _isolating(items, run, "describe")


def _fill(result: ImageResult, plan: list[Instruction], gens) -> None:
    result.answers = [{} for _ in range(len(result.regions))]
    result.relations = []
    for ins, gen in zip(plan, gens):
        conf = (gen.mean_logprob, gen.min_logprob)
        if ins.kind == "relation":
            rel = parse_relation(gen.text, ins.regions)
            result.relations.append(RelationAnswer(rel.subject, rel.predicate, rel.object, rel.raw, rel.status, *conf))
            continue
        parsed = parse_caption(gen.text) if ins.kind == "caption" else parse_attribute(ins.field, gen.text)
        result.answers[ins.regions[0]][ins.field] = Answer(parsed.value, parsed.raw, parsed.status, *conf)
