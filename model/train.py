"""GPT4RoI instruction tuning, as the paper does it, in two stages.

Stage 1 trains only the region encoder (``spi_module``) on region -> category questions; stage 2
trains everything but the vision tower on conversations (captions, attributes, multi-region
questions). The loss covers the assistant turns and their ``###`` stop only.

Training data is the conversation format of ``synth/dataset.py`` (JSONL or Parquet, images by
path). Each assistant answer is tokenised exactly as the model will produce it at inference: the
prompt before it ends with ``"\\n### "`` and the answer is ``"Assistant: {answer}\\n###"``.

Single process by default; under ``torch.distributed`` (e.g. Ray Train's TorchTrainer) the same
loop runs DDP, each rank reading its own shard of the data.
Checkpoints, resuming, the LR schedule and the step count are ``model.loop``'s.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from .checkpoint import Loaded, init_or_load
from .device import resolve_device
from .loop import (latest_checkpoint, load_state, progress_bar, running_mean, save_checkpoint, steps,
                   warmup_cosine_schedule)
from .prompt import IMAGE_PREAMBLE, SEP, expand_region_tags, region_order
from .tokenizer import PromptTokenizer
from .vision import normalize_boxes, preprocess

IGNORE = -100
STAGE_TRAINABLE = {1: ("spi_module",), 2: ("mm_projector", "spi_module", "llm")}


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)  # JSONL / Parquet conversation files
    # how often each file's records are seen per epoch (default 1 each): e.g. [1.0, 0.5, 3.0] for
    # labelled, pseudo-labelled and human-corrected data; 0.5 takes a fresh half of the file each epoch
    data_weights: list[float] = field(default_factory=list)
    out: str = "runs/train"
    init: str = "random:tiny"  # a model spec: random:PRESET, demo, or a roiscribe checkpoint directory
    stage: int = 2
    train_vision_tower: bool = False  # the paper keeps CLIP frozen; a from-scratch demo may not
    freeze: list[str] = field(default_factory=list)  # stage modules to keep frozen anyway, e.g. ["spi_module"]
    max_steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    max_length: int = 2048  # tokens per sample; whole turns beyond it are dropped
    max_turns: int = 0  # 0: all; else a random subset of the QA pairs of each sample per epoch
    box_jitter: float = 0.0  # std of noise on each box edge, in box widths/heights (detector-like boxes)
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    fsdp: bool = False  # refused for now: sharded checkpointing is not implemented and tested
    num_threads: int = 0  # torch CPU threads (0: torch's default)

    def __post_init__(self) -> None:
        if self.fsdp:
            raise ValueError("fsdp = true is not supported: FSDP needs sharded checkpointing (every rank's state "
                             "gathered collectively, every optimizer shard saved), which roiscribe has not implemented "
                             "and tested on GPUs yet; use DDP (the default with --ray) and gradient_checkpointing")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.data_weights and len(self.data_weights) != len(self.data):
            raise ValueError(f"data_weights has {len(self.data_weights)} weights for {len(self.data)} data files; "
                             "give one per file (or none: 1 each)")
        if any(not w > 0 for w in self.data_weights):
            raise ValueError(f"data_weights must be > 0, got {self.data_weights}")

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """TOML or JSON; ``data`` is relative to the file, ``out`` and ``init`` to the working directory."""
        return config_from_file(cls, path, relative=("data",))


def config_from_file(cls, path: str | Path, relative: Sequence[str] = ()):
    """Dataclass ``cls`` from a TOML or JSON file (unknown keys are an error naming the valid ones);
    the path options named in ``relative`` are taken relative to the file (absolute paths stay)."""
    from .configfile import ConfigError, from_dict, read_config

    raw = read_config(path)
    for key in relative:
        if key in raw:
            value = raw[key]
            raw[key] = ([str(Path(path).parent / v) for v in value] if isinstance(value, list)
                        else str(Path(path).parent / value))
    try:
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# Data ---------------------------------------------------------------------------------------------

def read_conversations(paths: Sequence[str | Path]) -> list[dict]:
    """Records of the conversation format; image paths resolved against their file's folder. Each
    record's ``source`` is the index of its file in ``paths`` (for ``TrainConfig.data_weights``)."""
    records = []
    for source, path in enumerate(map(Path, paths)):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            image = Path(row["image"])
            row["image"] = str(image if image.is_absolute() else path.parent / image)
            row["source"] = source
            records.append(row)
    if not records:
        raise ValueError(f"no training records in {list(map(str, paths))}")
    return records


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    boxes: list[int]  # index into the record's boxes for each <bbox>, in order


def encode_conversation(tokenizer: PromptTokenizer, turns: Sequence[dict], system: str, max_length: int) -> Encoded:
    """Token ids and labels of a conversation; supervised: each ``Assistant: answer\\n###``."""
    ids: list[int] = []
    labels: list[int] = []
    boxes: list[int] = []
    for k in range(0, len(turns) - 1, 2):
        human, gpt = turns[k], turns[k + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(f"turns must alternate human / gpt, got {human.get('from')!r}, {gpt.get('from')!r}")
        question = expand_region_tags(human["value"])
        if k == 0:
            prompt = tokenizer.encode(f"{system}\n\n### Human: {IMAGE_PREAMBLE}{question}{SEP}")
        else:
            prompt = tokenizer.encode(f"Human: {question}{SEP}", add_bos=False)
        answer = tokenizer.pieces.encode(f"Assistant: {gpt['value']}\n###")
        if k and len(ids) + len(prompt) + len(answer) > max_length:
            break
        regions = human.get("regions", [])
        order = region_order(question)
        if any(not 1 <= n <= len(regions) for n in order):
            raise ValueError(f"turn {question!r} names regions {order} but lists {regions}")
        boxes += [regions[n - 1] for n in order]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    return Encoded(ids, labels, boxes)


class Batches:
    """Shuffled batches of encoded samples for one rank, reproducible per (seed, epoch)."""

    def __init__(self, records: list[dict], loaded: Loaded, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.records, self.loaded, self.cfg = records, loaded, cfg
        self.rank, self.world = rank, world
        by_source: dict[int, list[int]] = {}
        for i, rec in enumerate(records):
            by_source.setdefault(rec.get("source", 0), []).append(i)
        weights = cfg.data_weights or [1.0] * (max(by_source, default=0) + 1)
        # per source: its records, and how many of them an epoch holds (the same every epoch, so
        # that steps per epoch, and with them resuming, stay fixed)
        self.sources = [(idx, max(1, round(weights[s] * len(idx)))) for s, idx in sorted(by_source.items())]
        self.epoch_size = sum(n for _, n in self.sources)

    def order(self, epoch: int) -> list[int]:
        """The record indices of one epoch, all ranks: each source's records ``weight`` times (whole
        repeats, then a sample of the rest drawn per epoch), shuffled; with all weights 1, every
        record once."""
        rng = random.Random(self.cfg.seed + epoch)
        order = []
        for idx, n in self.sources:
            order += idx * (n // len(idx))
            if n % len(idx):
                order += sorted(random.Random(f"{self.cfg.seed}:{epoch}:{idx[0]}").sample(idx, n % len(idx)))
        rng.shuffle(order)
        return order

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        order = self.order(epoch)[self.rank::self.world]
        bs = self.cfg.batch_size
        for start in range(skip * bs, len(order) - bs + 1, bs):
            yield self.collate([self.records[i] for i in order[start:start + bs]], epoch * 1_000_003 + start)

    def collate(self, records: list[dict], salt: int) -> dict:
        from PIL import Image

        cfg, model_cfg, tok = self.cfg, self.loaded.config, self.loaded.tokenizer
        rng = random.Random(cfg.seed * 7919 + salt)
        jitter_rng = random.Random(cfg.seed * 7919 + salt + 1)  # its own stream: turns drawn as without jitter
        images, samples, boxes = [], [], []
        for rec in records:
            with Image.open(rec["image"]) as im:
                images.append(im.convert("RGB"))
            turns = rec["conversations"]
            if cfg.max_turns:
                pairs = [turns[i:i + 2] for i in range(0, len(turns), 2)]
                turns = [t for pair in rng.sample(pairs, min(cfg.max_turns, len(pairs))) for t in pair]
            enc = encode_conversation(tok, turns, model_cfg.system, cfg.max_length)
            samples.append(enc)
            w, h = images[-1].size
            picked = [rec["boxes"][i] for i in enc.boxes]
            if cfg.box_jitter:
                picked = [jitter_box(b, cfg.box_jitter, w, h, jitter_rng) for b in picked]
            boxes.append(normalize_boxes(picked, w, h))
        width = max(len(s.ids) for s in samples)
        pad = model_cfg.tokens.pad_id
        ids = torch.tensor([s.ids + [pad] * (width - len(s.ids)) for s in samples])
        labels = torch.tensor([s.labels + [IGNORE] * (width - len(s.ids)) for s in samples])
        mask = torch.tensor([[1] * len(s.ids) + [0] * (width - len(s.ids)) for s in samples])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "boxes": boxes,
                "pixel_values": preprocess(images, model_cfg.vision)}


def jitter_box(box, std: float, width: int, height: int, rng: random.Random) -> list[float]:
    """``box`` with Gaussian noise on each edge (``std`` of its width for x, of its height for y),
    clipped to the image and kept at least 1 px wide and high."""
    x1, y1, x2, y2 = (float(v) for v in box)
    xa, xb = sorted(v + rng.gauss(0.0, std * (x2 - x1)) for v in (x1, x2))
    ya, yb = sorted(v + rng.gauss(0.0, std * (y2 - y1)) for v in (y1, y2))
    xa, ya = min(max(xa, 0.0), width - 1.0), min(max(ya, 0.0), height - 1.0)
    return [xa, ya, min(max(xb, xa + 1.0), float(width)), min(max(yb, ya + 1.0), float(height))]


# The loop -----------------------------------------------------------------------------------------

def set_trainable(model: torch.nn.Module, stage: int, train_vision_tower: bool = False,
                  freeze: Sequence[str] = ()) -> list[str]:
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    unknown = set(freeze) - set(STAGE_TRAINABLE[stage])
    if unknown:
        raise ValueError(f"freeze names {sorted(unknown)}, which stage {stage} does not train "
                         f"(it trains {', '.join(STAGE_TRAINABLE[stage])})")
    parts = tuple(p for p in STAGE_TRAINABLE[stage] if p not in freeze) + (("vision_tower",) if train_vision_tower else ())
    model.requires_grad_(False)
    for name in parts:
        getattr(model, name).requires_grad_(True)
    return list(parts)


STATE_FILE, CONFIG_FILE = "trainer_state.pt", "train_config.json"  # in each checkpoint-N folder


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) a training stage; returns the final checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    resume = latest_checkpoint(out)
    loaded = init_or_load(resume or cfg.init, seed=cfg.seed)
    model = loaded.model.to(device).restore_buffers()
    model.train()
    model.vision_tower.train(cfg.train_vision_tower)
    set_trainable(model, cfg.stage, cfg.train_vision_tower, cfg.freeze)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = warmup_cosine_schedule(optim, cfg.warmup_steps, cfg.max_steps)
    start = load_state(resume / STATE_FILE, optim, sched)[0] if resume is not None else 0
    wrapped = _wrap(model, cfg, device)
    batches = Batches(read_conversations(cfg.data), loaded, cfg, rank, world)
    per_epoch = max(batches.epoch_size // world // cfg.batch_size, 1)
    autocast = _autocast(cfg, device)
    avg: dict[str, float] = {}
    t0 = time.perf_counter()
    with progress_bar(progress, cfg.max_steps, start, "train") as bar:
        for step, batch in steps(start, cfg.max_steps, per_epoch, batches.epoch):
            with autocast:
                out_ = wrapped(batch["input_ids"].to(device), batch["pixel_values"].to(device),
                               [b.to(device) for b in batch["boxes"]], batch["attention_mask"].to(device),
                               labels=batch["labels"].to(device))
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            running_mean(avg, {"loss": float(out_.loss.detach())})
            bar.update(1)
            bar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if rank == 0 and (step % cfg.save_every == 0 or step == cfg.max_steps):
                save_checkpoint(out, step, loaded, optim, sched, state_file=STATE_FILE, config_file=CONFIG_FILE,
                                config={**asdict(cfg), "loss": avg["loss"], "seconds": time.perf_counter() - t0},
                                keep=cfg.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()
    return latest_checkpoint(out)


def _wrap(model, cfg: TrainConfig, device):
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _autocast(cfg: TrainConfig, device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def training_loss(loaded: Loaded, batch: dict) -> torch.Tensor:
    """The loss of one collated batch (for tests and evaluation)."""
    m = loaded.model
    return m(batch["input_ids"], batch["pixel_values"], batch["boxes"], batch["attention_mask"],
             labels=batch["labels"]).loss
