"""Region-level vision pretraining on the synthetic world: the demo's stand-in for CLIP.

The paper starts from a pretrained CLIP ViT; nothing pretrained can be downloaded here, and
learning a vision tower from scratch through the language loss alone is slow (the LLM has to
discover the visual cues before the tower gets a useful gradient). So the demo pretrains its
vision tower and region encoder first, directly on the world's ground truth: small heads on the
region tokens predict each object's shape, colour, material and size, and a pair head predicts the
position relation of two objects. The heads are thrown away; the checkpoint is an ordinary
roiscribe checkpoint that instruction tuning (``model.train``, stage 2) starts from.

Resumable like ``model.train`` (the loop of ``model.loop``): ``out/checkpoint-N`` holds the model and
``pretrain_state.pt`` (heads, optimizer, scheduler, step).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import Loaded, init_or_load
from model.loop import (latest_checkpoint, load_state, progress_bar, running_mean, save_checkpoint, steps,
                        warmup_cosine_schedule)
from model.vision import normalize_boxes, preprocess

from .evaluate import GroundTruth, read_ground_truth
from .world import COLORS, MATERIALS, POSITION_PREDICATES, SHAPES, SIZES

LABELS = {"shape": SHAPES, "color": tuple(COLORS), "material": MATERIALS, "size": SIZES}


@dataclass
class PretrainConfig:
    world: str = "runs/world"  # a `roiscribe world` folder (its ground_truth.jsonl files)
    out: str = "runs/demo-vision"
    init: str = "random:demo"  # a model spec: random:PRESET, demo, or a roiscribe checkpoint directory
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this before every step
    save_every: int = 250
    keep_checkpoints: int = 2
    seed: int = 0
    num_threads: int = 0

    @classmethod
    def from_file(cls, path: str | Path) -> "PretrainConfig":
        """TOML or JSON; ``world`` is relative to the file, ``out`` and ``init`` to the working directory."""
        from model.train import config_from_file

        return config_from_file(cls, path, relative=("world",))


class Heads(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attributes = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in LABELS.items()})
        self.relation = torch.nn.Sequential(torch.nn.Linear(2 * dim, dim), torch.nn.GELU(),
                                            torch.nn.Linear(dim, len(POSITION_PREDICATES)))


def _targets(truths: list[GroundTruth]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    attrs = {k: torch.tensor([v.index(o[k]) for t in truths for o in t.objects]) for k, v in LABELS.items()}
    pairs, rel, base = [], [], 0
    for t in truths:
        for key, predicate in t.relations.items():
            i, j = map(int, key.split(","))
            pairs.append((base + i, base + j))
            rel.append(POSITION_PREDICATES.index(predicate))
        base += len(t.objects)
    return attrs, torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), torch.tensor(rel)


def pretrain_loss(loaded: Loaded, heads: Heads, truths: list[GroundTruth]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed cross-entropy of the attribute and relation heads on one batch; also accuracies."""
    from PIL import Image

    images = []
    for t in truths:
        with Image.open(t.image) as im:
            images.append(im.convert("RGB"))
    model = loaded.model
    feats = model.encode_images(preprocess(images, loaded.config.vision).to(model.device))
    boxes = [torch.as_tensor(normalize_boxes([o["box"] for o in t.objects], t.width, t.height)) for t in truths]
    tokens = torch.cat(model.region_tokens(feats, boxes))
    attrs, pairs, rel = _targets(truths)
    loss = tokens.new_zeros(())
    acc = {}
    for name, head in heads.attributes.items():
        logits = head(tokens)
        loss = loss + F.cross_entropy(logits, attrs[name].to(logits.device))
        acc[name] = float((logits.argmax(1).cpu() == attrs[name]).float().mean())
    if len(pairs):
        logits = heads.relation(torch.cat([tokens[pairs[:, 0]], tokens[pairs[:, 1]]], 1))
        loss = loss + F.cross_entropy(logits, rel.to(logits.device))
        acc["relation"] = float((logits.argmax(1).cpu() == rel).float().mean())
    return loss, acc


STATE_FILE, CONFIG_FILE = "pretrain_state.pt", "pretrain_config.json"  # in each checkpoint-N folder


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Train the vision tower and region encoder on the world's labels; returns the last checkpoint."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out)
    resume = latest_checkpoint(out)
    loaded = init_or_load(resume or cfg.init, seed=cfg.seed)
    model = loaded.model.restore_buffers()
    model.requires_grad_(False)
    model.vision_tower.requires_grad_(True)
    model.spi_module.requires_grad_(True)
    model.train()
    torch.manual_seed(cfg.seed)
    heads = Heads(loaded.config.llm.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine_schedule(optim, cfg.warmup_steps, cfg.steps)
    start = 0
    if resume is not None:
        start, state = load_state(resume / STATE_FILE, optim, sched)
        heads.load_state_dict(state["heads"])
    truths = read_ground_truth(cfg.world)
    per_epoch = max(len(truths) // cfg.batch_size, 1)

    def epoch(e: int, skip: int):
        order = list(range(len(truths)))
        random.Random(cfg.seed + e).shuffle(order)
        for first in range(skip * cfg.batch_size, len(order) - cfg.batch_size + 1, cfg.batch_size):
            yield [truths[i] for i in order[first:first + cfg.batch_size]]

    avg: dict[str, float] = {}
    t0 = time.perf_counter()
    with progress_bar(progress, cfg.steps, start, "pretrain") as bar:
        for step, batch in steps(start, cfg.steps, per_epoch, epoch):
            loss, acc = pretrain_loss(loaded, heads, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            running_mean(avg, {"loss": float(loss.detach()), **acc})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in avg.items()})
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(out, step, loaded, optim, sched, state_file=STATE_FILE, config_file=CONFIG_FILE,
                                config={**asdict(cfg), "running": avg, "seconds": time.perf_counter() - t0},
                                keep=cfg.keep_checkpoints, extra={"heads": heads.state_dict()})
    return latest_checkpoint(out)
