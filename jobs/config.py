"""The job config: one nested dataclass tree, read from TOML, overridden by flags, saved resolved.

::

    source = "demo/samples"            # a folder, a glob, a .parquet/.csv manifest, a COCO .json
    out = "runs/quickstart"
    batch_size = 8                     # images per detect / describe batch
    rows_per_part = 500                # rows per Parquet part file

    [model]                            # ModelSpec
    spec = "demo"                      # demo | random:PRESET | a checkpoint directory
    device = "auto"                    # auto | cpu | cuda | cuda:N
    dtype = "auto"                     # auto (CUDA: fp16 for official-layout checkpoints, else bf16; CPU: fp32) | float32 | bfloat16 | float16

    [detector]                         # DetectorSpec
    spec = "demo"                      # demo | yolo:PATH | torchvision:ARCH:PATH | given:coco:FILE ...

    [engine]                           # model.config.EngineConfig
    [compose]                          # pipeline.compose.ComposeConfig
    [postprocess]                      # pipeline.postprocess.PostProcess
    [runner]                           # RunnerConfig: auto | ray | local, Ray address, pools

:class:`JobConfig` *is* a :class:`~pipeline.stages.PipelineConfig` (what the stages do with each
image) plus where images come from, where rows go and how the job runs, so every runner hands the
same object to the same stages. ``ModelSpec.load`` and ``DetectorSpec.build`` are the one way a
spec becomes a loaded object (``model.checkpoint.load_model``, ``detectors.build_detector``, with
``model.device`` turning ``auto`` into a device and a dtype).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.configfile import ConfigError, from_dict, read_config, to_dict
from pipeline.stages import PipelineConfig

RUNNERS = ("auto", "ray", "local")
LOCAL_MAX_IMAGES = 1000  # runner auto: a job of fewer images, with no cluster address, runs in process


@dataclass(frozen=True)
class ModelSpec:
    """Which GPT4RoI to load, and where."""

    spec: str = "demo"  # demo (the shipped model) | random:PRESET | a checkpoint directory
    clip: str | None = None  # local CLIP directory, for checkpoints in the official layout
    device: str = "auto"
    dtype: str = "auto"

    def resolved(self) -> "ModelSpec":
        """The same spec with ``auto`` device and dtype made concrete (what actually runs)."""
        from model.device import dtype_name, resolve_device

        device = resolve_device(self.device)
        return dataclasses.replace(self, device=str(device), dtype=dtype_name(self._dtype(device)))

    def load(self):
        """The loaded model (``model.checkpoint.Loaded``)."""
        from model.checkpoint import load_model
        from model.device import resolve_device

        device = resolve_device(self.device)
        return load_model(self.spec, clip=self.clip, device=device, dtype=self._dtype(device))

    def _dtype(self, device):
        """``auto``: float32 on a CPU; on CUDA fp16 for official-layout checkpoints, else bf16."""
        from model.checkpoint import native_cuda_dtype
        from model.device import resolve_dtype

        return resolve_dtype(self.dtype, device, cuda_default=native_cuda_dtype(self.spec))

    def engine(self, config):
        """A ``model.engine.RegionEngine`` around the loaded model."""
        from model.engine import RegionEngine

        return RegionEngine(self.load(), config)

    def provenance(self) -> str:
        """The model as rows record it: the shipped model's directory, else the spec."""
        if self.spec == "demo":
            import demo

            return str(demo.model_dir())
        return self.spec


@dataclass(frozen=True)
class DetectorSpec:
    """Which detector proposes the boxes (see ``detectors.registry`` for the spec syntax)."""

    spec: str = "demo"
    device: str = "auto"

    def build(self):
        from detectors import build_detector
        from model.device import resolve_device

        return build_detector(self.spec, device=str(resolve_device(self.device)))

    def provenance(self) -> str:
        if self.spec == "demo":
            import demo

            return f"yolo:{demo.detector_path()}"
        return self.spec


@dataclass(frozen=True)
class RunnerConfig:
    """How the job runs: in this process, or on Ray (a local cluster, or ``address``)."""

    mode: str = "auto"  # auto: local below local_max_images images with no address, else ray
    address: str | None = None  # an existing Ray cluster (default: RAY_ADDRESS, else a local one)
    local_max_images: int = LOCAL_MAX_IMAGES
    describe_actors: int = 0  # actors holding the model (and, with detect_actors = 0, the detector); 0: auto
    describe_cpus: float = 1.0
    gpus_per_describe_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    detect_actors: int = 0  # 0: decode and detect inside the describe actors (one pool); N: a pool of N
    detect_cpus: float = 0.5
    actor_start_timeout_s: int = 1800  # batches go out once every actor of a pool is up (or fail after this)
    max_restarts: int = 3  # times Ray restarts an actor that died (a crash, out of memory)
    max_task_retries: int = 2  # times a batch whose actor died is tried again before its images become error rows

    def actors(self, resources: dict, batches: int) -> tuple[int, float]:
        """(describe actors, GPUs per describe actor) for a cluster's resources and a job of
        ``batches`` batches. Auto: one actor per GPU on a cluster with GPUs; without GPUs, one per
        ``describe_cpus`` CPUs left after the detect pool; never more actors than batches."""
        gpus = self.gpus_per_describe_actor
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        if self.describe_actors:
            return self.describe_actors, gpus
        if gpus:
            n = int(resources.get("GPU", 0) // gpus)
        else:
            n = int((resources.get("CPU", 0) - self.detect_actors * self.detect_cpus) // self.describe_cpus)
        return max(1, min(n, batches)), gpus

    def __post_init__(self) -> None:
        if self.mode not in RUNNERS:
            raise ConfigError(f"runner mode {self.mode!r}: expected one of {', '.join(RUNNERS)}")
        if self.describe_actors < 0 or self.detect_actors < 0:
            raise ConfigError("runner: describe_actors and detect_actors must be >= 0 (describe_actors 0: auto)")
        if self.describe_cpus <= 0 or self.detect_cpus <= 0:
            raise ConfigError("runner: describe_cpus and detect_cpus must be > 0")


@dataclass(frozen=True, kw_only=True)
class JobConfig(PipelineConfig):
    """Everything a caption job needs; saved fully resolved in ``OUT/manifest.json``."""

    source: str = ""
    out: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    rows_per_part: int = 500
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rows_per_part < 1:
            raise ConfigError(f"rows_per_part must be >= 1, got {self.rows_per_part}")

    @classmethod
    def from_file(cls, path: str | Path) -> "JobConfig":
        """A TOML or JSON job file (``source`` and ``out`` as written: relative to the working directory)."""
        return job_from_dict(read_config(path))

    def resolved(self) -> "JobConfig":
        """Device and dtype made concrete (what the manifest records)."""
        return dataclasses.replace(self, model=self.model.resolved())

    def to_dict(self) -> dict:
        return to_dict(self)


def job_from_dict(data: dict[str, Any]) -> JobConfig:
    try:
        return from_dict(JobConfig, data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a value a config's own checks refused
        raise ConfigError(str(e)) from None


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied, nested tables merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
