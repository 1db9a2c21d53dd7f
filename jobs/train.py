"""Training through Ray Train: the same ``model.train.train`` loop on every worker, DDP set up by
Ray's ``TorchTrainer``. In process on one machine,
or on a cluster (``--address`` / ``RAY_ADDRESS``) whose workers share the output folder.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from model.loop import latest_checkpoint
from model.train import TrainConfig


def _worker_loop(config: dict) -> None:
    from model.train import train

    train(TrainConfig(**config), progress=False)


def train_on_ray(cfg: TrainConfig, workers: int = 2, use_gpu: bool = False, address: str | None = None,
                 cpus_per_worker: float = 1.0) -> Path | None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .ray_cluster import connect

    # workers run in their own folders: every path they read or write must be absolute
    cfg = replace(cfg, out=str(Path(cfg.out).resolve()), data=[str(Path(d).resolve()) for d in cfg.data],
                  init=str(Path(cfg.init).resolve()) if Path(cfg.init).is_dir() else cfg.init)
    connect(address)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name="roiscribe-train", storage_path=str(Path(cfg.out).resolve() / "ray")),
    )
    trainer.fit()
    return latest_checkpoint(cfg.out)
