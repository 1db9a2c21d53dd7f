"""The main job: caption every image of a source into Parquet, in this process or on Ray.

Both runners call the same public stages (``pipeline.stages``: decode, detect + post-process,
describe) on the same :class:`~jobs.config.JobConfig`, and both hand the sink the same Arrow rows
(``pipeline.arrow.to_table``); a runner adds scheduling, never logic.

* ``local``: batches of ``batch_size`` images through the three stages, in order.
* ``ray``: a Ray Data pipeline. By default one actor pool (``DescribeActor``) decodes, detects and
  describes, so a job pays for starting one kind of actor; with ``runner.detect_actors > 0`` a
  ``DetectActor`` pool decodes and detects and passes the pixels on in the batch. Rows stream back
  to the driver, which writes part files as they arrive.
* ``auto`` (the default): ``local`` for a job of at most ``runner.local_max_images`` images when no
  cluster address is given (starting a cluster costs more than it saves), else ``ray``.

Every input yields one row (``ok`` or ``error`` with a reason). Part files are atomic; a resumed
job skips images whose rows exist; ``retry_failed`` reprocesses error rows and replaces them.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrow import SCHEMA_VERSION, Provenance, from_table, to_table
from pipeline.decode import ImageSource
from pipeline.postprocess import PostProcess
from pipeline.records import ERROR, ImageResult
from pipeline.stages import decode_stage, describe_stage, detect_stage
from sinks.parquet import (OutputLock, ParquetSink, reconcile, row_count, set_aside_corrupt_parts, statuses,
                           write_atomic)

from .config import JobConfig, RunnerConfig
from .sources import Source, SourceItem


class ResourceError(ValueError):
    """The requested actor pools cannot fit on the cluster (the job would wait forever)."""


# Boxes people drew are kept as drawn: only unusable boxes go (invalid, inverted, empty after
# clipping to the image); no score threshold, NMS, duplicate removal or cap.
DRAWN_BOXES = PostProcess(score_threshold=0.0, nms_iou=None, duplicate_iou=None, max_regions=None)


def job_for_source(cfg: JobConfig, source: Source) -> JobConfig:
    """The config the job really runs: a source that brings its own boxes (COCO, a Label Studio
    pull) replaces the detector; boxes people drew skip the detector clean-up."""
    if source.given_spec:
        cfg = replace(cfg, detector=replace(cfg.detector, spec=source.given_spec))
    if source.drawn:
        cfg = replace(cfg, postprocess=DRAWN_BOXES)
    return cfg


class ResumeMismatchError(ValueError):
    """``--resume`` into an output that another source, model, detector or config wrote."""


def job_fingerprints(cfg: JobConfig) -> dict:
    from .fingerprint import fingerprints

    config = cfg.resolved().to_dict()
    prov = provenance(cfg)
    # what changes the answers: the weights and the pipeline's settings (not where the job ran)
    answering = {k: config[k] for k in ("compose", "engine", "postprocess", "max_pixels")}
    answering["model"] = {k: config["model"][k] for k in ("spec", "dtype")}
    if cfg.calibration:  # its probabilities are in the rows (outputs without one keep their fingerprint)
        from .fingerprint import path_fingerprint

        answering["calibration"] = path_fingerprint(cfg.calibration)
    return fingerprints(prov.model, cfg.model.spec, prov.detector.split(":", 1)[-1], cfg.detector.spec, answering)


def check_resume(out: Path, cfg: JobConfig, prints: dict) -> None:
    """Refuse to resume an output written from another source or with another model, detector or
    answering config: the rows would mix two jobs (or, for another source, name images twice)."""
    path = out / "manifest.json"
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # an unreadable manifest says nothing to compare; the rows are still checked by id
    old_source = (before.get("config") or {}).get("source")
    if old_source and _same_place(old_source) != _same_place(cfg.source):
        raise ResumeMismatchError(
            f"{out} was written from the source {old_source!r}, not {cfg.source!r}; resuming would write "
            "images of another source into it. Use another --out, or --force-resume to add them anyway")
    old = before.get("fingerprints") or {}
    what = {"model": f"model {cfg.model.spec!r}", "detector": f"detector {cfg.detector.spec!r}",
            "config": "answering config (compose, engine, post-processing, dtype)"}
    changed = [k for k in ("model", "detector", "config") if k in old and old[k] != prints[k]]
    if changed:
        raise ResumeMismatchError(
            f"{out} was written with another " + ", ".join(f"{what[k]} (fingerprint {old[k]}, now {prints[k]})"
                                                           for k in changed)
            + "; resuming would mix two jobs' rows in one output. Use another --out, or --force-resume to mix them")


def _same_place(source: str) -> str:
    return os.path.realpath(source) if os.path.exists(source) else source


def provenance(cfg: JobConfig) -> Provenance:
    return Provenance(detector=cfg.detector.provenance(), model=cfg.model.provenance(),
                      templates_version=cfg.compose.templates.version)


def _sources(batch: pa.Table) -> list[ImageSource]:
    return [ImageSource(u, image_id=i) for i, u in zip(batch.column("image_id").to_pylist(),
                                                        batch.column("uri").to_pylist())]


# Runners ---------------------------------------------------------------------------------------------

def choose_runner(runner: RunnerConfig, images: int) -> tuple[str, str]:
    """(``local`` | ``ray``, why) for a job of ``images`` images."""
    if runner.mode != "auto":
        return runner.mode, f"runner {runner.mode}"
    if runner.address or os.environ.get("RAY_ADDRESS"):
        return "ray", "runner auto: a Ray cluster address is set"
    if images > runner.local_max_images:
        return "ray", f"runner auto: {images} images > local_max_images {runner.local_max_images}"
    return "local", f"runner auto: {images} images <= local_max_images {runner.local_max_images}, in process"


def rows_local(items: list[SourceItem], cfg: JobConfig) -> Iterator[pa.Table]:
    detector, engine, prov = cfg.detector.build(), cfg.model.engine(cfg.engine), provenance(cfg)
    for start in range(0, len(items), cfg.batch_size):
        sources = [ImageSource(i.uri, image_id=i.image_id) for i in items[start:start + cfg.batch_size]]
        results = describe_stage(detect_stage(decode_stage(sources, cfg), detector, cfg), engine, cfg)
        yield to_table(results, prov)


class DetectActor:
    """Ray Data actor (``runner.detect_actors > 0``): decodes and detects; the pixels travel on."""

    def __init__(self, cfg: JobConfig):
        self.cfg, self.detector = cfg, cfg.detector.build()

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = detect_stage(decode_stage(_sources(batch), self.cfg), self.detector, self.cfg)
        return to_table(results, pixels=True)


class DescribeActor:
    """Ray Data actor holding the engine. Given source items it also decodes and detects (then it
    holds the detector too); given a ``DetectActor``'s output it only describes."""

    def __init__(self, cfg: JobConfig, detect_here: bool):
        import ray

        self.cfg, self.prov = cfg, provenance(cfg)
        self.detector = cfg.detector.build() if detect_here else None
        self.engine = cfg.model.engine(cfg.engine)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.detector is not None:
            results = detect_stage(decode_stage(_sources(batch), self.cfg), self.detector, self.cfg)
        else:
            results = from_table(batch)
        return to_table(describe_stage(results, self.engine, self.cfg), self.prov, self.node)


def check_resources(runner: RunnerConfig, resources: dict, batches: int = 1) -> tuple[int, float]:
    """(describe actors, GPUs each) that fit the cluster; refuses pools that never could (the job
    would wait forever)."""
    actors, gpus = runner.actors(resources, batches)
    need = actors * runner.describe_cpus + runner.detect_actors * runner.detect_cpus
    have = resources.get("CPU", 0)
    if need > have:
        raise ResourceError(
            f"the actor pools need {need:g} CPUs ({actors} describe x {runner.describe_cpus:g}"
            + (f" + {runner.detect_actors} detect x {runner.detect_cpus:g}" if runner.detect_actors else "")
            + f") but the Ray cluster has {have:g}; use fewer actors or a larger cluster")
    if gpus and actors * gpus > resources.get("GPU", 0):
        raise ResourceError(f"{actors} describe actors x {gpus:g} GPUs do not fit "
                            f"the cluster's {resources.get('GPU', 0):g} GPUs")
    return actors, gpus


WORKER_DIED = ("{stage}: the Ray worker processing this image died {times} times (a crash or out of memory in the "
               "decoder, detector or model); the image was retried alone and written as an error so the job could finish")


def rows_on_ray(items: list[SourceItem], cfg: JobConfig) -> Iterator[pa.Table]:
    """Rows of every item. A batch whose actor keeps dying (a crash or out-of-memory on some input)
    is dropped after ``runner.max_task_retries``; its images are tried again one at a time, and
    those that still kill their worker become error rows: one bad input never fails the job."""
    from .ray_cluster import connect

    connect(cfg.runner.address)
    seen: set[str] = set()
    for table in _ray_pass(items, cfg):
        seen.update(table.column("image_id").to_pylist())
        yield table
    lost = [it for it in items if it.image_id not in seen]
    if lost:  # alone, so that only the images that kill a worker are lost
        for table in _ray_pass(lost, replace(cfg, batch_size=1)):
            seen.update(table.column("image_id").to_pylist())
            yield table
    dead = [it for it in items if it.image_id not in seen]
    if dead:
        reason = WORKER_DIED.format(stage="describe" if not cfg.runner.detect_actors else "detect or describe",
                                    times=cfg.runner.max_task_retries + 1)
        yield to_table([ImageResult(it.image_id, it.uri, ERROR, reason) for it in dead], provenance(cfg))


def _ray_pass(items: list[SourceItem], cfg: JobConfig) -> Iterator[pa.Table]:
    import ray
    from ray.data import ActorPoolStrategy

    runner = cfg.runner
    batches = -(-len(items) // cfg.batch_size)
    actors, gpus = check_resources(runner, ray.cluster_resources(), batches)
    # Dispatch only once the whole pool is up: otherwise the actor that loads its model first is
    # handed every batch of a short job, and a pool that can never start fails instead of waiting.
    ctx = ray.data.DataContext.get_current()
    ctx.wait_for_min_actors_s = runner.actor_start_timeout_s
    ctx.max_errored_blocks = -1  # a batch that kills its actor every time is dropped, not the whole job
    ds = ray.data.from_items([{"image_id": i.image_id, "uri": i.uri} for i in items],
                             override_num_blocks=max(1, len(items) // cfg.batch_size))
    common = dict(batch_size=cfg.batch_size, batch_format="pyarrow", max_restarts=runner.max_restarts,
                  max_task_retries=runner.max_task_retries)
    if runner.detect_actors:
        ds = ds.map_batches(DetectActor, fn_constructor_args=(cfg,), num_cpus=runner.detect_cpus,
                            compute=ActorPoolStrategy(size=runner.detect_actors), **common)
    ds = ds.map_batches(DescribeActor, fn_constructor_args=(cfg, not runner.detect_actors),
                        num_cpus=runner.describe_cpus, num_gpus=gpus,
                        compute=ActorPoolStrategy(size=actors), **common)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


RUNNER_ROWS = {"local": rows_local, "ray": rows_on_ray}


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
    runner: str = "local"
    runner_reason: str = ""
    duplicates_removed: int = 0  # rows of an image written twice (by a crash mid-retry), newest kept
    set_aside: list[str] = field(default_factory=list)  # unreadable parts moved to OUT/corrupt

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0


def plan(items: list[SourceItem], out: Path, resume: bool, retry_failed: bool) -> tuple[list[SourceItem], set[str], int]:
    """The items still to process, the ids whose error rows they will replace, and how many
    duplicate rows (an image written twice) were found and removed."""
    if not (resume or retry_failed):
        existing = row_count(out)
        if existing:
            raise FileExistsError(f"{out} already holds {existing} rows; pass --resume to complete it, "
                                  "--retry-failed to redo its errors, or choose another --out")
        return items, set(), 0
    duplicates = reconcile(out)
    done = statuses(out)
    retry = {i for i, s in done.items() if s == ERROR} if retry_failed else set()
    return [it for it in items if it.image_id not in done or it.image_id in retry], retry, duplicates


def run_caption(cfg: JobConfig, source: Source, resume: bool = False, retry_failed: bool = False,
                progress: bool = True, force_resume: bool = False) -> JobSummary:
    """Caption ``source`` into ``cfg.out``: one row per item. The folder is locked for the job;
    unreadable parts are set aside; a resume must match the source, model, detector and config
    that wrote the folder (``force_resume`` overrides)."""
    if not cfg.out:
        raise ValueError("a caption job needs an output folder (out)")
    cfg = job_for_source(cfg, source)
    out = Path(cfg.out)
    with OutputLock(out):
        set_aside = [str(p) for p in set_aside_corrupt_parts(out)]
        prints = job_fingerprints(cfg)
        if (resume or retry_failed) and not force_resume:
            check_resume(out, cfg, prints)
        todo, replacing, duplicates = plan(source.items, out, resume, retry_failed)
        runner, reason = choose_runner(cfg.runner, len(todo))
        counts: dict[str, int] = {}
        n_regions, t0 = 0, time.perf_counter()
        bar = _bar(progress, len(todo))
        with ParquetSink(out, cfg.rows_per_part) as sink:
            failed = [it for it in todo if it.error]  # items that arrive as errors: their rows, written here
            if failed:
                sink.write(to_table([ImageResult(it.image_id, it.uri, ERROR, it.error) for it in failed], provenance(cfg)))
                counts[ERROR] = counts.get(ERROR, 0) + len(failed)
                if bar is not None:
                    bar.update(len(failed))
            readable = [it for it in todo if not it.error]
            for table in (RUNNER_ROWS[runner](readable, cfg) if readable else []):
                sink.write(table)
                for status, n in zip(*_value_counts(table.column("status"))):
                    counts[status] = counts.get(status, 0) + n
                n_regions += pc.sum(table.column("num_regions")).as_py() or 0
                if bar is not None:
                    bar.update(table.num_rows)
                    bar.set_postfix(regions=n_regions, errors=counts.get(ERROR, 0))
        if bar is not None:
            bar.close()
        if replacing:
            reconcile(out)  # the new rows of retried images replace their old error rows
        seconds = time.perf_counter() - t0
        summary = JobSummary(str(out), len(source.items), len(source.items) - len(todo), len(todo), counts,
                             n_regions, seconds, runner, reason, duplicates, set_aside)
        write_manifest(out, cfg, summary, prints)
    return summary


def _value_counts(column) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="caption", dynamic_ncols=True)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def package_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("roiscribe", "torch", "torchvision", "transformers", "ray", "ultralytics", "pyarrow",
                "label-studio-sdk", "numpy", "pillow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(out: Path, cfg: JobConfig, summary: JobSummary, prints: dict) -> None:
    totals: dict[str, int] = {}
    all_status = statuses(out)
    for s in all_status.values():
        totals[s] = totals.get(s, 0) + 1
    manifest = {
        "schema": SCHEMA_VERSION, "config": cfg.resolved().to_dict(), "fingerprints": prints,
        "versions": package_versions(), "python": platform.python_version(), "rows": len(all_status),
        "counts": totals,
        "last_run": {"runner": summary.runner, "runner_reason": summary.runner_reason,
                     "processed": summary.processed, "skipped": summary.skipped, "counts": summary.counts,
                     "regions": summary.regions, "seconds": round(summary.seconds, 3),
                     "duplicates_removed": summary.duplicates_removed, "parts_set_aside": summary.set_aside,
                     "driver_peak_rss_mib": round(_peak_rss_mib(), 1)},
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())
