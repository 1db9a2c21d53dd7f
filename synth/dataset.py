"""Datasets from the synthetic world: GPT4RoI conversations, a YOLO detection set, ground truth.

Conversation format (JSONL, one image per line; the same format the pseudo-label exporter
writes, and what ``model.train`` reads)::

    {"image": "images/000007.png", "width": 296, "height": 262,
     "boxes": [[x1, y1, x2, y2], ...],                  # pixels of the image
     "conversations": [
        {"from": "human", "value": "What is the color of <region1>?", "regions": [2]},
        {"from": "gpt", "value": "red"},
        ...]}

``<regionK>`` in a human turn is box ``regions[K-1]`` of the line; numbering is local to the turn,
exactly as the pipeline asks its questions at inference. The questions are the pipeline's own
templates (``pipeline.compose.Templates``), so the trained model answers what the main job asks.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.compose import ComposeConfig, Templates, select_pairs
from pipeline.records import Regions

from .world import SHAPES, Scene, SceneObject, WorldConfig, generate_scene, relation

NO_ACTION = "nothing"


def caption(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.color} {obj.material} {obj.shape}"


def scene_regions(scene: Scene) -> Regions:
    """Ground-truth regions in roiscribe's record (class = shape)."""
    return Regions(np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4),
                   np.ones(len(scene.objects)), [SHAPES.index(o.shape) for o in scene.objects],
                   [o.shape for o in scene.objects], detector="ground-truth")


def conversation(scene: Scene, rng: np.random.Generator, templates: Templates = Templates(),
                 compose: ComposeConfig = ComposeConfig()) -> list[dict]:
    """Every question the pipeline would ask about the scene's objects, answered exactly, in a
    shuffled order (so no answer can be guessed from its position)."""
    qa: list[tuple[str, list[int], str]] = []
    for i, obj in enumerate(scene.objects):
        qa.append((templates.caption_brief, [i], caption(obj)))
        qa.append((templates.caption_detailed, [i], f"It is {caption(obj)}."))
        for name, value in (("color", obj.color), ("shape", obj.shape), ("material", obj.material),
                            ("action", NO_ACTION)):
            if name in templates.attributes:
                qa.append((templates.attributes[name], [i], value))
    for i, j in select_pairs(scene_regions(scene), compose):
        if rng.random() < 0.5:
            i, j = j, i  # both directions
        a, b = scene.objects[i], scene.objects[j]
        qa.append((templates.relation, [i, j], f"region1 is {relation(a, b)} region2"))
    order = rng.permutation(len(qa))
    turns = []
    for k in order:
        question, regions, answer = qa[k]
        turns += [{"from": "human", "value": question, "regions": regions}, {"from": "gpt", "value": answer}]
    return turns


def relation_drill(objects: list[SceneObject], rng: np.random.Generator,
                   templates: Templates = Templates()) -> list[dict]:
    """The relation question for every ordered pair of objects, answered exactly, shuffled. The
    pipeline asks about a few pairs per image (``select_pairs``), so ``conversation`` holds few
    relation turns beside many attribute turns; training on these drills as well gives relations
    enough weight (the demo model learned left/right but not above/below without them)."""
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects)) if i != j]
    turns = []
    for k in rng.permutation(len(pairs)):
        i, j = pairs[k]
        turns += [{"from": "human", "value": templates.relation, "regions": [i, j]},
                  {"from": "gpt", "value": f"region1 is {relation(objects[i], objects[j])} region2"}]
    return turns


def ground_truth(scene: Scene, image: str) -> dict:
    pairs = {f"{i},{j}": relation(a, b) for i, a in enumerate(scene.objects)
             for j, b in enumerate(scene.objects) if i != j}
    return {"image": image, "seed": scene.seed, "width": scene.width, "height": scene.height,
            "objects": [asdict(o) for o in scene.objects], "relations": pairs}


def write_dataset(out: str | Path, seeds: range, config: WorldConfig = WorldConfig(), val_fraction: float = 0.1,
                  progress=None) -> Path:
    """Images, ``conversations.jsonl``, ``relations.jsonl`` (``relation_drill`` per image, same
    format), ``ground_truth.jsonl`` and a YOLO set under ``out``."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    yolo = out / "yolo"
    for split in ("train", "val"):
        (yolo / "images" / split).mkdir(parents=True, exist_ok=True)
        (yolo / "labels" / split).mkdir(parents=True, exist_ok=True)
    n_val = int(len(seeds) * val_fraction)
    with (open(out / "conversations.jsonl", "w") as conv, open(out / "relations.jsonl", "w") as drills,
          open(out / "ground_truth.jsonl", "w") as gt):
        for k, seed in enumerate(seeds):
            scene = generate_scene(seed, config)
            name = f"{seed:07d}.png"
            Image.fromarray(scene.image).save(out / "images" / name)
            rel = f"images/{name}"
            head = {"image": rel, "width": scene.width, "height": scene.height,
                    "boxes": [list(o.box) for o in scene.objects]}
            conv.write(json.dumps(head | {"conversations": conversation(scene, np.random.default_rng(seed))}) + "\n")
            drills.write(json.dumps(head | {"conversations": relation_drill(
                scene.objects, np.random.default_rng([seed, 1]))}) + "\n")
            gt.write(json.dumps(ground_truth(scene, rel)) + "\n")
            split = "val" if k < n_val else "train"
            _yolo_item(yolo, split, name, out / "images" / name, scene)
            if progress:
                progress(1)
    (yolo / "data.yaml").write_text(
        "train: images/train\nval: images/val\nnames:\n"  # no path: ultralytics roots these at the file's folder
        + "".join(f"  {i}: {s}\n" for i, s in enumerate(SHAPES)))
    return out


def _yolo_item(yolo: Path, split: str, name: str, image_path: Path, scene: Scene) -> None:
    target = yolo / "images" / split / name
    if not target.exists():
        target.symlink_to(os.path.relpath(image_path.resolve(), target.parent.resolve()))  # the world can move
    lines = []
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        lines.append(f"{SHAPES.index(o.shape)} {(x1 + x2) / 2 / scene.width:.6f} {(y1 + y2) / 2 / scene.height:.6f} "
                     f"{(x2 - x1) / scene.width:.6f} {(y2 - y1) / scene.height:.6f}")
    (yolo / "labels" / split / name.replace(".png", ".txt")).write_text("\n".join(lines) + "\n")


def _write_part(args) -> str:
    out, start, stop, config, val_fraction = args
    return str(write_dataset(out, range(start, stop), config, val_fraction) / "conversations.jsonl")


def write_dataset_parallel(out: str | Path, seeds: range, workers: int = 2, config: WorldConfig = WorldConfig(),
                           val_fraction: float = 0.1) -> list[str]:
    """``write_dataset`` over ``workers`` processes, one part folder each (``out/partK``);
    returns the conversation files. Same scenes as a serial run: each seed draws its own scene."""
    from multiprocessing import get_context

    workers = max(1, min(workers, len(seeds)))
    bounds = [seeds.start + len(seeds) * k // workers for k in range(workers + 1)]
    jobs = [(Path(out) / f"part{k}", bounds[k], bounds[k + 1], config, val_fraction) for k in range(workers)]
    if workers == 1:
        return [_write_part(jobs[0])]
    with get_context("spawn").Pool(workers) as pool:
        return pool.map(_write_part, jobs)
