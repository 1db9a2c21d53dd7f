"""The main job: caption every image of a source into Parquet, in this process or on Ray.

Both runners call the same public stages (``pipeline.stages``: decode, detect + post-process,
describe, through :func:`caption_rows`) on the same :class:`~jobs.config.JobConfig`, plan with the
same :func:`plan_block` and commit the same parts (``sinks.parquet.commit_part``); a runner adds
scheduling, never logic. No runner holds a list of the source or of the output in the driver:

* the source is read in blocks (``jobs.sources``: a manifest by pyarrow, or by Ray Data in the
  workers; a folder walked lazily);
* the output is indexed by :func:`sinks.parquet.scan` into 64-bit id hashes (on Ray, in a task: the
  index reaches the planning workers through the object store), and each block is filtered against
  it (:func:`plan_block`);
* each part is written whole (tmp, fsync, rename) under a name that hashes its ids, its counts in
  its footer: on Ray by ``write_part`` tasks spread over the nodes, so the driver receives one small
  commit record per part, and a retried writer replaces its own part.

* ``local``: blocks planned, then batches of ``batch_size`` images through the stages, in order.
* ``ray``: a Ray Data pipeline: read -> plan (tasks) -> ``DescribeActor`` pool (decode, detect,
  describe; with ``runner.detect_actors > 0`` a ``DetectActor`` pool decodes and detects and passes
  the pixels on) -> ``write_part`` tasks of ``rows_per_part`` rows.
* ``auto`` (the default): ``local`` for a job of at most ``runner.local_max_images`` images when no
  cluster address is given (starting a cluster costs more than it saves), else ``ray``.

Every input yields one row (``ok`` or ``error`` with a reason). A resumed job skips images whose
rows exist; ``retry_failed`` reprocesses error rows, and the final :func:`~sinks.parquet.scan` keeps
the newest row of each image. The manifest's counts are the sum of the parts' commit records.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from pipeline.arrow import SCHEMA_VERSION, Provenance, from_table, to_table
from pipeline.decode import ImageSource
from pipeline.postprocess import PostProcess
from pipeline.records import ERROR, ImageResult
from pipeline.stages import decode_stage, describe_stage, detect_stage
from sinks.parquet import (OutputIndex, OutputLock, ParquetSink, commit_part, committed_counts, id_hashes,
                           next_part_number, row_count, scan, set_aside_corrupt_parts, write_atomic)

from .config import JobConfig, RunnerConfig
from .sources import Source

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


# One pipeline: plan a block, caption a batch -----------------------------------------------------------

@dataclass
class Tally:
    """What planning found: source rows seen, already done (ok rows), failed (error rows), to do."""

    seen: int = 0
    done: int = 0
    failed: int = 0
    todo: int = 0

    def add(self, other: "Tally") -> None:
        for key in ("seen", "done", "failed", "todo"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


def plan_block(raw: pa.Table, reader, index: OutputIndex, retry_failed: bool) -> tuple[pa.Table, Tally]:
    """The rows (:data:`jobs.sources.ROWS`) of one raw source block that are still to do, and the
    block's tally. Ids a manifest names are checked before any path is resolved, so a resume
    resolves only the images it will process."""
    ids = reader.ids(raw)
    rows = None
    if ids is None:
        rows = reader.resolve(raw)
        ids = rows.column("image_id")
    in_ok, in_error = index.classify(id_hashes(ids))
    todo = ~(in_ok | (in_error & (not retry_failed)))
    tally = Tally(raw.num_rows, int(in_ok.sum()), int(in_error.sum()), int(todo.sum()))
    mask = pa.array(todo)
    return (rows.filter(mask) if rows is not None else reader.resolve(raw.filter(mask))), tally


def _results_of(rows: pa.Table) -> tuple[list[ImageResult], list[ImageSource]]:
    """Error rows of the items that arrive failed (e.g. a pulled task without its image), and the
    sources of the others."""
    failed, sources = [], []
    for r in rows.to_pylist():
        if r["error"]:
            failed.append(ImageResult(r["image_id"], r["uri"], ERROR, r["error"]))
        else:
            sources.append(ImageSource(r["uri"], image_id=r["image_id"]))
    return failed, sources


def caption_rows(rows: pa.Table, cfg: JobConfig, detector, engine, prov: Provenance,
                 processed_by: str | None = None) -> pa.Table:
    """Output rows of one batch of planned rows: decode, detect, describe (every runner's path)."""
    failed, sources = _results_of(rows)
    results = describe_stage(detect_stage(decode_stage(sources, cfg), detector, cfg), engine, cfg) if sources else []
    kw = {"processed_by": processed_by} if processed_by else {}
    return to_table(failed + results, prov, **kw)


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


class LocalRunner:
    """In this process: the index in memory, blocks planned and captioned in order."""

    name = "local"

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.duplicates_removed = 0

    def index(self, out: Path, repair: bool = True) -> OutputIndex:
        index = scan(out, repair)
        self.duplicates_removed += index.duplicates_removed
        return index

    def empty_index(self) -> OutputIndex:
        return OutputIndex.empty()

    def count(self, source: Source, index: OutputIndex, retry_failed: bool) -> Tally:
        tally = Tally()
        for raw in source.reader.blocks():
            tally.add(plan_block(raw, source.reader, index, retry_failed)[1])
        return tally

    def process(self, source: Source, out: Path, index: OutputIndex, retry_failed: bool, progress) -> Tally:
        cfg, stages, tally = self.cfg, None, Tally()
        with ParquetSink(out, cfg.rows_per_part, on_commit=progress.committed) as sink:
            for raw in source.reader.blocks():
                todo, block = plan_block(raw, source.reader, index, retry_failed)
                tally.add(block)
                progress.planned(tally)
                if todo.num_rows and stages is None:  # loaded once there is something to do
                    stages = cfg.detector.build(), cfg.model.engine(cfg.engine), provenance(cfg)
                for start in range(0, todo.num_rows, cfg.batch_size):
                    sink.write(caption_rows(todo.slice(start, cfg.batch_size), cfg, *stages))
        return tally



class DetectActor:
    """Ray Data actor (``runner.detect_actors > 0``): decodes and detects; the pixels travel on."""

    def __init__(self, cfg: JobConfig):
        self.cfg, self.detector = cfg, cfg.detector.build()

    def __call__(self, rows: pa.Table) -> pa.Table:
        failed, sources = _results_of(rows)
        results = detect_stage(decode_stage(sources, self.cfg), self.detector, self.cfg)
        return to_table(failed + results, pixels=True)


class DescribeActor:
    """Ray Data actor holding the engine. Given planned rows it also decodes and detects (then it
    holds the detector too); given a ``DetectActor``'s output it only describes."""

    def __init__(self, cfg: JobConfig, detect_here: bool):
        import ray

        self.cfg, self.prov = cfg, provenance(cfg)
        self.detector = cfg.detector.build() if detect_here else None
        self.engine = cfg.model.engine(cfg.engine)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.detector is not None:
            return caption_rows(batch, self.cfg, self.detector, self.engine, self.prov, self.node)
        return to_table(describe_stage(from_table(batch), self.engine, self.cfg), self.prov, self.node)


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
RECORD = pa.schema([("part", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("error", pa.int64()),
                    ("regions", pa.int64()), ("written_by", pa.string())])
TALLY = pa.schema([(k, pa.int64()) for k in ("seen", "done", "failed", "todo")])


# Ray Data functions (module level: they run in the workers, from the installed package) ------------------

class TallyActor:
    """Where planning tasks report their counts (a Ray actor, no CPU), keyed by block so that a
    retried task is counted once; the driver reads the running total for its progress and to
    notice images a dropped batch lost."""

    def __init__(self):
        self.blocks: dict[tuple, tuple] = {}

    def add(self, key: tuple, counts: tuple) -> None:
        self.blocks[key] = counts

    def total(self) -> Tally:
        return Tally(*(sum(c[i] for c in self.blocks.values()) for i in range(4)))


def _index(ref) -> OutputIndex:
    import ray

    return ray.get(ref[0])  # zero-copy from the object store: the index never passes through the driver


def plan_rows(raw: pa.Table, reader, index, retry_failed: bool, tally) -> Iterator[pa.Table]:
    """In a read task: a raw block's rows still to do; its counts go to the tally actor."""
    import ray

    rows, counts = plan_block(raw, reader, _index(index), retry_failed)
    key = (raw.num_rows, str(raw.slice(0, 1).to_pylist()), str(raw.slice(raw.num_rows - 1).to_pylist()))
    # waited for, so that the total the driver reads after the pass has every block in it
    ray.get(tally.add.remote(key, (counts.seen, counts.done, counts.failed, counts.todo)))
    if rows.num_rows:
        yield rows


def plan_counts(raw: pa.Table, reader, index, retry_failed: bool) -> Iterator[pa.Table]:
    """In a read task (a dry run): the counts of a raw block, one row."""
    counts = plan_block(raw, reader, _index(index), retry_failed)[1]
    yield pa.Table.from_pylist([counts.__dict__], schema=TALLY)


def lost_rows(rows: pa.Table, cfg: JobConfig, reason: str) -> pa.Table:
    """Ray Data task (the last pass): error rows for images whose worker died every time."""
    return to_table([ImageResult(i, u, ERROR, reason) for i, u in zip(rows.column("image_id").to_pylist(),
                                                                     rows.column("uri").to_pylist())], provenance(cfg))


def write_part(rows: pa.Table, data: str, seq: int) -> pa.Table:
    """Ray Data task: commit one part of the rows on the node that runs it; its commit record."""
    import ray

    if not rows.num_rows:
        return RECORD.empty_table()
    record = commit_part(data, seq, rows, ray.get_runtime_context().get_node_id())
    return pa.Table.from_pylist([record], schema=RECORD)


def _scan_task(out: str, repair: bool) -> tuple[OutputIndex, dict]:
    index = scan(out, repair)
    return index, {"rows": index.rows, "duplicates_removed": index.duplicates_removed}


class RayRunner:
    """On a Ray cluster: the output indexed by a task, the source read and planned by tasks, the
    images captioned by actor pools, the parts written by tasks spread over the nodes. The driver
    holds object refs, counts and one commit record per part."""

    name = "ray"

    def __init__(self, cfg: JobConfig, source: Source, estimate: int | None):
        import ray

        from .ray_cluster import connect

        connect(cfg.runner.address)
        self.cfg, self.estimate, self.ray = cfg, estimate, ray
        self.row_bytes = source.row_bytes()
        self.duplicates_removed = 0

    def index(self, out: Path, repair: bool = True):
        """A ref to the output's index (built in a task; the driver gets only its size)."""
        index, info = self.ray.remote(_scan_task).options(num_cpus=0, num_returns=2).remote(str(out), repair)
        self.duplicates_removed += self.ray.get(info)["duplicates_removed"]
        return index

    def empty_index(self):
        return self.ray.put(OutputIndex.empty())

    def _planned(self, source: Source, index, retry_failed: bool, tally=None):
        """The rows to do (or, without a tally, each block's counts), planned in the read tasks."""
        args = {"reader": source.reader, "index": [index], "retry_failed": retry_failed}
        plan = partial(plan_counts, **args) if tally is None else partial(plan_rows, **args, tally=tally)
        return source.ray_dataset(plan, readers=self._nodes())

    def _nodes(self) -> int:
        """Nodes alive, at least 2: how many read tasks, and how many part writers, run at once."""
        return max(2, sum(n["Alive"] for n in self.ray.nodes()))

    def count(self, source: Source, index, retry_failed: bool) -> Tally:
        tally = Tally()
        for batch in self._planned(source, index, retry_failed).iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                tally.add(Tally(**row))
        return tally

    def process(self, source: Source, out: Path, index, retry_failed: bool, progress) -> Tally:
        """Up to three passes: all images; the images of batches dropped after killing their
        worker ``max_task_retries + 1`` times, one image per batch; those that still did, as error
        rows. Lost images are found by planning again against the output, not by remembering ids."""
        cfg = self.cfg
        planned, written = self._pass(source, out, index, retry_failed, progress, cfg, None, totals=True)
        reason = WORKER_DIED.format(stage="describe" if not cfg.runner.detect_actors else "detect or describe",
                                    times=cfg.runner.max_task_retries + 1)
        single = replace(cfg, batch_size=1, rows_per_part=1)
        for dead in (None, reason):  # alone first; then the images that still killed their worker, as errors
            if written >= planned.todo:
                break
            # retried error rows that a dropped batch lost keep their old error row (planned as done)
            written += self._pass(source, out, self.index(out), False, progress, single, dead, totals=False)[1]
        if written < planned.todo:
            raise RuntimeError(f"{planned.todo - written} of {planned.todo} images could not be written to {out} "
                               "(the part writers failed; see the Ray logs); run again with --resume")
        return planned

    def _pass(self, source: Source, out: Path, index, retry_failed: bool, progress: "Progress", cfg: JobConfig,
              dead: str | None, totals: bool) -> tuple[Tally, int]:
        """One Ray Data execution over the source: (what planning found, rows committed).
        ``progress`` is fed commit records, and with ``totals`` its total from the planning tally
        (the first pass: the job's total). ``dead``: write the planned images as error rows with
        this reason."""
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        ray, runner = self.ray, cfg.runner
        tally = ray.remote(TallyActor).options(num_cpus=0).remote()
        ctx = ray.data.DataContext.get_current()
        # Dispatch only once the whole pool is up: otherwise the actor that loads its model first is
        # handed every batch of a short job, and a pool that can never start fails instead of waiting.
        ctx.wait_for_min_actors_s = runner.actor_start_timeout_s
        ctx.max_errored_blocks = -1  # a batch that kills its actor every time is dropped, not the whole job
        ds = self._planned(source, index, retry_failed, tally)
        if dead:
            ds = ds.map_batches(lost_rows, fn_kwargs={"cfg": cfg, "reason": dead}, batch_format="pyarrow",
                                num_cpus=0, compute=TaskPoolStrategy(size=2))
        else:
            batches = -(-self.estimate // cfg.batch_size) if self.estimate is not None else 1 << 30
            actors, gpus = check_resources(runner, ray.cluster_resources(), max(1, batches))
            common = dict(batch_size=cfg.batch_size, batch_format="pyarrow", max_restarts=runner.max_restarts,
                          max_task_retries=runner.max_task_retries)
            if runner.detect_actors:
                ds = ds.map_batches(DetectActor, fn_constructor_args=(cfg,), num_cpus=runner.detect_cpus,
                                    compute=ActorPoolStrategy(size=runner.detect_actors), **common)
            ds = ds.map_batches(DescribeActor, fn_constructor_args=(cfg, not runner.detect_actors),
                                num_cpus=runner.describe_cpus, num_gpus=gpus,
                                compute=ActorPoolStrategy(size=actors), **common)
        (out / "data").mkdir(parents=True, exist_ok=True)
        seq = next_part_number(out / "data")
        ds = ds.map_batches(write_part, fn_kwargs={"data": str(out / "data"), "seq": seq},
                            batch_size=cfg.rows_per_part, batch_format="pyarrow", num_cpus=0,
                            compute=TaskPoolStrategy(size=self._nodes()),
                            scheduling_strategy="SPREAD")
        written = 0
        # blocks of about batch_size planned rows, so that every actor of the pool gets work (Ray
        # Data sizes blocks in bytes only; a block goes to one actor whole)
        default_size, ctx.target_max_block_size = ctx.target_max_block_size, max(1, int(cfg.batch_size * self.row_bytes))
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                records = batch.to_pylist()
                written += sum(r["rows"] for r in records)
                if totals:
                    progress.planned(ray.get(tally.total.remote()))
                for record in records:
                    progress.committed(record)
        finally:
            ctx.target_max_block_size = default_size
        return ray.get(tally.total.remote()), written



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
    failed: int = 0  # source images whose rows in the output are errors
    dry_run: bool = False

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0


class Progress:
    """The job's bar and counts, fed by commit records (one per part) and the planning tally: the
    total grows while the source is still being listed and is exact once it has been."""

    def __init__(self, enabled: bool):
        self.counts: dict[str, int] = {}
        self.regions = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", desc="caption", dynamic_ncols=True)

    def planned(self, tally: Tally) -> None:
        if self.bar is not None and tally.todo != self.bar.total:
            self.bar.total = tally.todo
            self.bar.refresh()

    def committed(self, record: dict) -> None:
        for status in ("ok", "error"):
            if record[status]:
                self.counts[status] = self.counts.get(status, 0) + record[status]
        self.regions += record["regions"]
        if self.bar is not None:
            self.bar.update(record["rows"])
            self.bar.set_postfix(regions=self.regions, errors=self.counts.get(ERROR, 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def estimate_todo(source: Source, out: Path, runner: RunnerConfig) -> int | None:
    """About how many images the job has to do (what ``auto`` decides on, and the actor count's
    cap), counting the source no further than it needs to: None when it is too large to count
    cheaply (a listing past the local limit); a Parquet manifest counts from its footer."""
    done = row_count(out)
    limit = runner.local_max_images + done
    n = source.count(limit)
    return None if n > limit else max(0, n - done)


def run_caption(cfg: JobConfig, source: Source, resume: bool = False, retry_failed: bool = False,
                progress: bool = True, force_resume: bool = False, dry_run: bool = False) -> JobSummary:
    """Caption ``source`` into ``cfg.out``: one row per item. The folder is locked for the job;
    unreadable parts are set aside; a resume must match the source, model, detector and config
    that wrote the folder (``force_resume`` overrides). ``dry_run``: plan only (what is done,
    failed and to do), nothing written."""
    if not cfg.out:
        raise ValueError("a caption job needs an output folder (out)")
    cfg = job_for_source(cfg, source)
    out = Path(cfg.out)
    if dry_run:
        return _dry_run(cfg, source, out, resume, retry_failed, force_resume)
    with OutputLock(out):
        set_aside = [str(p) for p in set_aside_corrupt_parts(out)]
        prints = job_fingerprints(cfg)
        _check_output(cfg, out, resume, retry_failed, force_resume, prints)
        estimate = estimate_todo(source, out, cfg.runner)
        name, reason = choose_runner(cfg.runner, estimate if estimate is not None else cfg.runner.local_max_images + 1)
        runner = LocalRunner(cfg) if name == "local" else RayRunner(cfg, source, estimate)
        t0, bar = time.perf_counter(), Progress(progress)
        try:
            index = runner.index(out) if resume or retry_failed else runner.empty_index()
            tally = runner.process(source, out, index, retry_failed, bar)
            runner.index(out)  # the newest row of each image kept (retried errors replaced, ids listed twice)
        finally:
            bar.close()
        summary = JobSummary(str(out), tally.seen, tally.seen - tally.todo, tally.todo, bar.counts, bar.regions,
                             time.perf_counter() - t0, name, reason, runner.duplicates_removed, set_aside,
                             tally.failed)
        write_manifest(out, cfg, summary, prints)
    return summary


def _check_output(cfg: JobConfig, out: Path, resume: bool, retry_failed: bool, force_resume: bool, prints: dict) -> None:
    """A fresh job needs an empty output; a resume must match what wrote it."""
    if resume or retry_failed:
        if not force_resume:
            check_resume(out, cfg, prints)
        return
    existing = row_count(out)
    if existing:
        raise FileExistsError(f"{out} already holds {existing} rows; pass --resume to complete it, "
                              "--retry-failed to redo its errors, or choose another --out")


def _dry_run(cfg: JobConfig, source: Source, out: Path, resume: bool, retry_failed: bool,
             force_resume: bool) -> JobSummary:
    """The plan of a job without running it: the same checks, nothing written (not even the lock)."""
    t0 = time.perf_counter()
    _check_output(cfg, out, resume, retry_failed, force_resume, job_fingerprints(cfg))
    estimate = estimate_todo(source, out, cfg.runner)
    name, reason = choose_runner(cfg.runner, estimate if estimate is not None else cfg.runner.local_max_images + 1)
    runner = LocalRunner(cfg) if name == "local" else RayRunner(cfg, source, estimate)
    index = runner.index(out, repair=False) if resume or retry_failed else runner.empty_index()
    tally = runner.count(source, index, retry_failed)
    return JobSummary(str(out), tally.seen, tally.seen - tally.todo, tally.todo, {}, 0, time.perf_counter() - t0,
                      name, reason, failed=tally.failed, dry_run=True)


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
    committed = committed_counts(out)  # the parts' commit records: their footers, no rows read
    totals = {s: committed[s] for s in ("error", "ok") if committed[s]}
    manifest = {
        "schema": SCHEMA_VERSION, "config": cfg.resolved().to_dict(), "fingerprints": prints,
        "versions": package_versions(), "python": platform.python_version(), "rows": committed["rows"],
        "counts": totals,
        "last_run": {"runner": summary.runner, "runner_reason": summary.runner_reason,
                     "processed": summary.processed, "skipped": summary.skipped, "counts": summary.counts,
                     "regions": summary.regions, "seconds": round(summary.seconds, 3),
                     "duplicates_removed": summary.duplicates_removed, "parts_set_aside": summary.set_aside,
                     "driver_peak_rss_mib": round(_peak_rss_mib(), 1)},
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, default=str).encode())
