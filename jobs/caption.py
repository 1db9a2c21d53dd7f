"""The main job: caption every image of a source into Parquet, in process or on Ray.

Stages (the same code in both modes): decode (CPU) -> detect (detector) -> describe (compose,
the batched engine, parse) -> rows. On Ray each stage is a ``map_batches`` step — decode as tasks,
detect and describe as actor pools holding their models — streamed to the driver, which writes
part files as rows arrive, so driver memory stays flat however many images there are.

Every input yields one row (``ok`` or ``error`` with a reason). Output parts are atomic; a resumed
job skips images whose rows exist; ``retry_failed`` reprocesses error rows and replaces them.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np

from detectors.postprocess import PostProcess
from model.engine import EngineConfig
from pipeline.compose import ComposeConfig
from pipeline.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, decode_image
from pipeline.flow import ERROR, OK, AnnotateConfig, ImageResult, _describe, _detect
from pipeline.records import DecodedImage, Regions
from sinks.parquet import SCHEMA_VERSION, ParquetSink, Provenance, reconcile, result_to_row, statuses

from .sources import Source, SourceItem


@dataclass
class CaptionConfig:
    """Everything a caption job needs; saved as ``OUT/manifest.json`` with every run."""

    source: str
    out: str
    model: str = "demo"
    clip: str | None = None
    detector: str = "demo"
    device: str = "auto"
    batch_size: int = 8  # images per detect / describe call
    max_new_tokens: int = 32
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    postprocess: PostProcess = field(default_factory=PostProcess)
    max_pixels: int = DEFAULT_MAX_PIXELS
    rows_per_part: int = 500
    # Ray
    use_ray: bool = True
    address: str | None = None
    detect_actors: int = 1
    describe_actors: int = 1
    detect_cpus: float = 0.5  # per detect actor
    describe_cpus: float = 1.0  # per describe actor
    gpus_per_describe_actor: float = 0.0  # 0: auto (1 when the cluster has GPUs)
    decode_cpus: float = 0.25  # per decode task

    def annotate_config(self) -> AnnotateConfig:
        return AnnotateConfig(compose=self.compose, engine=EngineConfig(max_new_tokens=self.max_new_tokens),
                              postprocess=self.postprocess, batch_size=self.batch_size, max_pixels=self.max_pixels)


# Model and detector resolution ----------------------------------------------------------------------

def demo_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("demo")))


def resolve_model_spec(spec: str) -> str:
    if spec == "demo":
        path = demo_dir() / "gpt4roi"
        if not path.is_dir():
            raise FileNotFoundError(f"the demo model is not at {path}; pass --model tiny (random weights) or a checkpoint")
        return str(path)
    return spec


def resolve_detector_spec(spec: str) -> str:
    if spec == "demo":
        path = demo_dir() / "detector.pt"
        if not path.is_file():
            raise FileNotFoundError(f"the demo detector is not at {path}; pass --detector SPEC")
        return f"yolo:{path}"
    return spec


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def load_engine(cfg: CaptionConfig):
    import torch

    from model.checkpoint import load_model
    from model.engine import RegionEngine

    device = _device(cfg.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    loaded = load_model(resolve_model_spec(cfg.model), clip=cfg.clip, device=device, dtype=dtype)
    return RegionEngine(loaded, cfg.annotate_config().engine)


def load_detector(cfg: CaptionConfig, given: str | None):
    from detectors import build_detector

    if given is not None:  # the source's own boxes (COCO, a Label Studio pull)
        return build_detector(given)
    return build_detector(resolve_detector_spec(cfg.detector), device=_device(cfg.device))


def provenance(cfg: CaptionConfig, source: Source) -> Provenance:
    detector = source.given_spec or resolve_detector_spec(cfg.detector)
    return Provenance(detector=detector, model=resolve_model_spec(cfg.model),
                      templates_version=cfg.compose.templates.version)


# The stages, shared by both modes ------------------------------------------------------------------

def decode_stage(items: list[SourceItem], max_pixels: int) -> list[tuple[ImageResult, DecodedImage | None]]:
    out = []
    for item in items:
        t = time.perf_counter()
        try:
            image = decode_image(ImageSource(item.uri, image_id=item.image_id), max_pixels)
        except ImageDecodeError as e:
            out.append((ImageResult(item.image_id, item.uri, ERROR, f"decode: {e}"), None))
            continue
        result = ImageResult(item.image_id, item.uri, OK, width=image.width, height=image.height)
        result.timings["decode"] = time.perf_counter() - t
        out.append((result, image))
    return out


def detect_stage(pairs, detector, cfg: AnnotateConfig) -> None:
    live = [(r, im) for r, im in pairs if r.status == OK]
    if live:
        _detect(live, detector, cfg)


def describe_stage(pairs, engine, cfg: AnnotateConfig) -> None:
    live = [(r, im) for r, im in pairs if r.status == OK]
    if live:
        _describe(live, engine, cfg)


# In process ------------------------------------------------------------------------------------------

def rows_inprocess(items: list[SourceItem], cfg: CaptionConfig, prov: Provenance, given: str | None) -> Iterator[list[dict]]:
    detector, engine, acfg = load_detector(cfg, given), load_engine(cfg), cfg.annotate_config()
    for start in range(0, len(items), cfg.batch_size):
        pairs = decode_stage(items[start:start + cfg.batch_size], cfg.max_pixels)
        detect_stage(pairs, detector, acfg)
        describe_stage(pairs, engine, acfg)
        yield [result_to_row(r, prov) for r, _ in pairs]


# On Ray ------------------------------------------------------------------------------------------------

def _pack(pairs) -> dict:
    """Stage output as a Ray Data batch: plain columns, the image as bytes + shape."""
    return {
        "image_id": [r.image_id for r, _ in pairs],
        "uri": [r.uri for r, _ in pairs],
        "result": [json.dumps(_result_state(r)) for r, _ in pairs],
        "pixels": [im.array.tobytes() if im is not None else b"" for _, im in pairs],
        "shape": [json.dumps(list(im.array.shape)) if im is not None else "[]" for _, im in pairs],
    }


def _unpack(batch: dict) -> list[tuple[ImageResult, DecodedImage | None]]:
    pairs = []
    for i in range(len(batch["image_id"])):
        result = _result_from_state(json.loads(batch["result"][i]))
        shape = json.loads(batch["shape"][i])
        image = None
        if shape:
            array = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(shape)
            image = DecodedImage(result.image_id, result.uri, array)
        pairs.append((result, image))
    return pairs


def _result_state(r: ImageResult) -> dict:
    reg = r.regions
    return {"image_id": r.image_id, "uri": r.uri, "status": r.status, "error": r.error, "width": r.width,
            "height": r.height, "timings": r.timings,
            "regions": {"boxes": reg.boxes.tolist(), "scores": reg.scores.tolist(), "class_ids": reg.class_ids.tolist(),
                        "class_names": reg.class_names, "detector": reg.detector, "dropped": reg.dropped}}


def _result_from_state(s: dict) -> ImageResult:
    reg = s["regions"]
    regions = Regions(np.asarray(reg["boxes"], np.float32).reshape(-1, 4), reg["scores"], reg["class_ids"],
                      reg["class_names"], reg["detector"], reg["dropped"])
    return ImageResult(s["image_id"], s["uri"], s["status"], s["error"], s["width"], s["height"], regions,
                       timings=s["timings"])


def decode_task(batch: dict, max_pixels: int) -> dict:
    """Ray Data task: source items -> decoded images (or error results)."""
    items = [SourceItem(str(i), str(u)) for i, u in zip(batch["image_id"], batch["uri"])]
    return _pack(decode_stage(items, max_pixels))


class DetectActor:
    """Ray Data actor: holds the detector."""

    def __init__(self, cfg: dict, given: str | None):
        self.cfg = _config_from_dict(cfg)
        self.detector = load_detector(self.cfg, given)
        self.acfg = self.cfg.annotate_config()

    def __call__(self, batch: dict) -> dict:
        pairs = _unpack(batch)
        detect_stage(pairs, self.detector, self.acfg)
        return _pack(pairs)


class DescribeActor:
    """Ray Data actor: holds the region engine; emits finished rows (JSON, one per image)."""

    def __init__(self, cfg: dict, prov: dict):
        self.cfg = _config_from_dict(cfg)
        self.engine = load_engine(self.cfg)
        self.acfg = self.cfg.annotate_config()
        self.prov = Provenance(**prov)
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        pairs = _unpack(batch)
        describe_stage(pairs, self.engine, self.acfg)
        return {"row": [json.dumps(result_to_row(r, self.prov, self.node)) for r, _ in pairs]}


def _config_from_dict(d: dict) -> CaptionConfig:
    from pipeline.compose import Templates

    d = dict(d)
    compose = dict(d.pop("compose"))
    compose["templates"] = Templates(**compose.pop("templates"))
    compose = {k: tuple(v) if isinstance(v, list) else v for k, v in compose.items()}
    post = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("postprocess").items()}
    return CaptionConfig(**d, compose=ComposeConfig(**compose), postprocess=PostProcess(**post))


class ResourceError(ValueError):
    """The requested actor pools cannot fit on the cluster (the job would wait forever)."""


def check_resources(cfg: CaptionConfig, resources: dict) -> None:
    need = cfg.detect_actors * cfg.detect_cpus + cfg.describe_actors * cfg.describe_cpus + cfg.decode_cpus
    have = resources.get("CPU", 0)
    if need > have:
        raise ResourceError(
            f"the actor pools need {need:g} CPUs ({cfg.detect_actors} detect x {cfg.detect_cpus:g} + "
            f"{cfg.describe_actors} describe x {cfg.describe_cpus:g} + decode {cfg.decode_cpus:g}) but the Ray "
            f"cluster has {have:g}; use fewer actors or a larger cluster")
    if cfg.gpus_per_describe_actor and cfg.describe_actors * cfg.gpus_per_describe_actor > resources.get("GPU", 0):
        raise ResourceError(f"{cfg.describe_actors} describe actors x {cfg.gpus_per_describe_actor:g} GPUs do not fit "
                            f"the cluster's {resources.get('GPU', 0):g} GPUs")


def rows_on_ray(items: list[SourceItem], cfg: CaptionConfig, prov: Provenance, given: str | None) -> Iterator[list[dict]]:
    import ray
    from ray.data import ActorPoolStrategy

    from .ray_cluster import connect

    connect(cfg.address)
    check_resources(cfg, ray.cluster_resources())
    gpus = cfg.gpus_per_describe_actor or (1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
    cfg_dict = asdict(cfg)
    ds = ray.data.from_items([{"image_id": i.image_id, "uri": i.uri} for i in items],
                             override_num_blocks=max(1, len(items) // cfg.batch_size))
    ds = ds.map_batches(decode_task, fn_kwargs={"max_pixels": cfg.max_pixels}, batch_size=cfg.batch_size,
                        num_cpus=cfg.decode_cpus)
    ds = ds.map_batches(DetectActor, fn_constructor_args=(cfg_dict, given),
                        batch_size=cfg.batch_size, num_cpus=cfg.detect_cpus,
                        compute=ActorPoolStrategy(size=cfg.detect_actors))
    ds = ds.map_batches(DescribeActor, fn_constructor_args=(cfg_dict, asdict(prov)), batch_size=cfg.batch_size,
                        num_cpus=cfg.describe_cpus, num_gpus=gpus, compute=ActorPoolStrategy(size=cfg.describe_actors))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield [json.loads(r) for r in batch["row"]]


# The job ---------------------------------------------------------------------------------------------

@dataclass
class JobSummary:
    out: str
    total: int
    skipped: int
    processed: int
    counts: dict[str, int]
    regions: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0


def plan(items: list[SourceItem], out: Path, resume: bool, retry_failed: bool) -> tuple[list[SourceItem], set[str]]:
    """The items still to process, and the ids whose error rows they will replace."""
    if not (resume or retry_failed):
        existing = statuses(out)
        if existing:
            raise FileExistsError(f"{out} already holds {len(existing)} rows; pass --resume to complete it, "
                                  "--retry-failed to redo its errors, or choose another --out")
        return items, set()
    reconcile(out)
    done = statuses(out)
    retry = {i for i, s in done.items() if s == ERROR} if retry_failed else set()
    return [it for it in items if it.image_id not in done or it.image_id in retry], retry


def run_caption(cfg: CaptionConfig, source: Source, resume: bool = False, retry_failed: bool = False,
                progress: bool = True) -> JobSummary:
    out = Path(cfg.out)
    todo, replacing = plan(source.items, out, resume, retry_failed)
    prov = provenance(cfg, source)
    given = source.given_spec
    rows = rows_on_ray if cfg.use_ray else rows_inprocess
    counts: dict[str, int] = {}
    n_regions, t0 = 0, time.perf_counter()
    bar = _bar(progress, len(todo))
    with ParquetSink(out, cfg.rows_per_part) as sink:
        for batch in (rows(todo, cfg, prov, given) if todo else []):
            batch = [r for r in batch]
            sink.write(batch)
            for r in batch:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
                n_regions += r["num_regions"]
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(regions=n_regions, errors=counts.get(ERROR, 0))
    if bar is not None:
        bar.close()
    if replacing:
        reconcile(out)  # the new rows of retried images replace their old error rows
    seconds = time.perf_counter() - t0
    summary = JobSummary(str(out), len(source.items), len(source.items) - len(todo), len(todo), counts, n_regions, seconds)
    write_manifest(out, cfg, summary)
    return summary


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="caption", dynamic_ncols=True)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_manifest(out: Path, cfg: CaptionConfig, summary: JobSummary) -> None:
    all_status = statuses(out)
    totals: dict[str, int] = {}
    for s in all_status.values():
        totals[s] = totals.get(s, 0) + 1
    versions = {}
    for pkg in ("roiscribe", "torch", "transformers", "ray", "ultralytics", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    manifest = {
        "schema": SCHEMA_VERSION, "config": asdict(cfg), "versions": versions, "python": platform.python_version(),
        "rows": len(all_status), "counts": totals,
        "last_run": {"processed": summary.processed, "skipped": summary.skipped, "counts": summary.counts,
                     "regions": summary.regions, "seconds": round(summary.seconds, 3),
                     "driver_peak_rss_mib": round(_peak_rss_mib(), 1)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
