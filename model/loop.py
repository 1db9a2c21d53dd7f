"""What every roiscribe training loop shares: checkpoints, the LR schedule, resuming, the step count.

A run writes ``out/checkpoint-N`` folders (N = optimizer steps done), each holding the model in
roiscribe's format (``model.checkpoint.save_pretrained``), a state file (optimizer, scheduler,
``step`` and whatever else the loop needs, e.g. auxiliary heads) and the run's config as JSON.
A run started on a folder that has checkpoints resumes from the newest one.

Used by ``model.train.train`` (instruction tuning) and ``synth.pretrain.pretrain`` (the demo's
vision pretraining); each names its own state and config files.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # model.checkpoint pulls in transformers; finding a run's checkpoints should not
    from .checkpoint import Loaded

T = TypeVar("T")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(out: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, oldest (smallest N) first."""
    found = [(int(m[1]), p) for p in Path(out).glob("checkpoint-*")
             if p.is_dir() and (m := CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` folder of a run, or None when it has none."""
    found = checkpoints(out)
    return found[-1] if found else None


def warmup_cosine(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """LR factor at (0-based) step: linear warmup to 1 over ``warmup_steps``, then a cosine to 0 at
    ``max_steps``, 0 after.

    A plain function on purpose: ``LambdaLR`` saves the attributes of a callable object in its
    state and restores them on load, which would bring back the old run's schedule on resume.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                           max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, max_steps))


def save_checkpoint(out: str | Path, step: int, loaded: Loaded, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, *, state_file: str, config_file: str,
                    config: dict, keep: int, extra: dict | None = None) -> Path:
    """Write ``out/checkpoint-STEP`` and keep only the newest ``keep`` checkpoints.

    It holds the model, ``state_file`` (``extra``'s entries plus ``optimizer``, ``scheduler`` and
    ``step``) and ``config_file`` (``config`` as JSON). Everything is written into a hidden folder
    that is then renamed, so a checkpoint exists whole or not at all.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint just written), got {keep}")
    from .checkpoint import save_pretrained

    out = Path(out)
    target, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if tmp.exists():  # left by a run killed while saving
        shutil.rmtree(tmp)
    save_pretrained(loaded, tmp)
    state = {**(extra or {}), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    torch.save(state, tmp / state_file)
    (tmp / config_file).write_text(json.dumps(config, indent=2))
    tmp.rename(target)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return target


def load_state(path: str | Path, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR) -> tuple[int, dict]:
    """Restore ``optimizer`` and ``scheduler`` from a state file written by :func:`save_checkpoint`;
    returns the step reached and the whole state (for the loop's ``extra`` entries).

    The scheduler keeps its own LR function, so a resumed run follows *its* config's schedule (a
    longer ``max_steps``, say); the LR of the next step is set from it here too.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    return step, state


def steps(start: int, max_steps: int, per_epoch: int,
          epoch: Callable[[int, int], Iterable[T]]) -> Iterator[tuple[int, T]]:
    """``(n, batch)`` for the steps ``start + 1 .. max_steps``, where ``epoch(e, skip)`` yields the
    batches of epoch ``e`` from its ``skip``-th on.

    Every epoch is exactly ``per_epoch`` steps (extra batches, e.g. of a rank with a longer shard,
    are dropped), so step ``n`` always draws the same batch and a resumed run repeats an
    uninterrupted one.
    """
    n = start
    while n < max_steps:
        e, skip = divmod(n, per_epoch)
        before = n
        for batch in islice(epoch(e, skip), min(per_epoch - skip, max_steps - n)):
            n += 1
            yield n, batch
        if n == before:
            raise ValueError(f"epoch {e} has no batch from batch {skip} on; expected {per_epoch} per epoch "
                             f"(fewer samples than one batch?)")


def running_mean(avg: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    """Update ``avg`` in place to an exponential moving average (decay 0.95) of each logged value; a
    new key starts at its first value. Returns ``avg``."""
    for k, v in values.items():
        avg[k] = v if k not in avg else 0.95 * avg[k] + 0.05 * v
    return avg


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar of steps from ``initial`` (the resumed step) to ``total``, drawn on rank 0 only;
    a silent one that accepts the same calls when not ``enabled``."""
    from tqdm import tqdm

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                disable=not enabled or rank != 0)
