"""The pseudo-label loop, measured on the synthetic world (issue 14).

1. Four worlds of disjoint seeds: a small labelled set, a larger unlabelled pool (its ground truth
   is never read), a labelled validation set (calibration and thresholds) and the held-out scenes
   (read only by the final scoring).
2. The teacher = arm (a): a detector trained from scratch on the labelled set and a GPT4RoI
   trained on it from the shared init (the shipped demo's vision tower and region encoder, the
   stand-in for a pretrained CLIP; projector and LLM random).
3. ``roiscribe calibrate``'s fit on the validation scenes with the teacher's models, on the
   proposals the filtered job keeps (detector score >= ``--proposal-score``); thresholds per kind
   tuned there (``pipeline.calibrate.thresholds_for_precision``).
4. ``roiscribe pseudo-label`` over the pool with the teacher twice: filtered (proposals down to
   ``--proposal-score``, the calibration and its tuned thresholds, ``--mask-rejected``) and
   unfiltered (the job's default proposals, every threshold 0: what keeping every prediction gives).
5. Arms (b) labelled + unfiltered and (c) labelled + filtered: same init, same steps, same data mix
   as (a) but for the pseudo-labels (labelled data weighted so that it stays a fixed share).
6. ``roiscribe evaluate`` of every arm on the held-out scenes: detector mAP50, attribute and
   relation accuracy on ground-truth boxes and on the arm's own detector's boxes.

Every stage writes its result under ``--work`` and is skipped when it is there; trainings resume
from their last checkpoint, so an interrupted run goes on where it stopped::

    nohup python -m benchmarks.loop --work runs/loop > runs/loop.log 2>&1 &
    python -m benchmarks.loop --work runs/loop --report      # the table, from what is done
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"a": "labelled only", "b": "labelled + unfiltered pseudo-labels", "c": "labelled + filtered pseudo-labels"}
SEEDS = {"labelled": 30_000_000, "pool": 31_000_000, "val": 32_000_000, "heldout": 33_000_000}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def stage(work: Path, name: str) -> Path:
    """A stage's marker: written when the stage finished (with what it measured)."""
    return work / "done" / f"{name}.json"


def finish(work: Path, name: str, info: dict | None = None) -> dict:
    path = stage(work, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {**(info or {}), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}  # never empty: an empty marker is falsy
    path.write_text(json.dumps(info, indent=2))
    return info


def done(work: Path, name: str) -> dict | None:
    path = stage(work, name)
    return json.loads(path.read_text()) if path.is_file() else None


# Stages ------------------------------------------------------------------------------------------

def make_worlds(work: Path, sizes: dict[str, int]) -> None:
    from synth.dataset import write_dataset

    for name, count in sizes.items():
        if done(work, f"world-{name}"):
            continue
        out = work / "worlds" / name
        shutil.rmtree(out, ignore_errors=True)
        log(f"world {name}: {count} scenes from seed {SEEDS[name]:,}")
        write_dataset(out, range(SEEDS[name], SEEDS[name] + count), val_fraction=0.0)
        finish(work, f"world-{name}", {"count": count, "seed": SEEDS[name]})


def make_init(work: Path) -> Path:
    """The shared GPT4RoI init: the shipped demo's vision tower and region encoder (trained on other
    scenes of the world: the stand-in for the pretrained CLIP the paper starts from), projector and
    LLM random (seed 0)."""
    from model.checkpoint import init_or_load, save_pretrained

    out = work / "init"
    if done(work, "init"):
        return out
    fresh, shipped = init_or_load("random:demo", seed=0), init_or_load("demo")
    kept = {k: v for k, v in shipped.model.state_dict().items() if k.startswith(("vision_tower.", "spi_module."))}
    missing, _ = fresh.model.load_state_dict(kept, strict=False)
    assert kept and not any(k.startswith(("vision_tower.", "spi_module.")) for k in missing)
    save_pretrained(fresh, out)
    finish(work, "init", {"copied_tensors": len(kept)})
    return out


def yolo_list(work: Path, arm: str, pseudo: Path | None, labelled_weight: int, size: int) -> Path:
    """The detector's training list for an arm: the labelled images ``labelled_weight`` times, then
    the pseudo-labelled pool's images (labels re-indexed to the world's classes) up to ``size``
    lines in all; arm (a): the labelled images repeated to ``size`` (the same number of steps)."""
    from synth.world import SHAPES

    folder = work / "detector-data" / arm
    shutil.rmtree(folder, ignore_errors=True)
    labelled = sorted((work / "worlds" / "labelled" / "yolo" / "images" / "train").glob("*.png"))
    lines = [str(p.absolute()) for p in labelled] * (labelled_weight if pseudo else max(1, size // len(labelled)))
    if pseudo is not None:
        names = _yolo_names(pseudo / "yolo" / "data.yaml")
        pool = []
        (folder / "images").mkdir(parents=True)
        (folder / "labels").mkdir(parents=True)
        for label in sorted((pseudo / "yolo" / "labels").glob("*/*.txt")):
            image = next(label.parent.parent.parent.joinpath("images", label.parent.name).glob(label.stem + ".*"))
            rows = []
            for line in label.read_text().split("\n"):
                if line.strip():
                    cls, *rest = line.split()
                    rows.append(" ".join([str(SHAPES.index(names[int(cls)])), *rest]))
            (folder / "labels" / f"{label.stem}.txt").write_text("\n".join(rows) + "\n")
            target = folder / "images" / image.name
            target.symlink_to(image.resolve())
            pool.append(str(target.absolute()))
        need = max(0, size - len(lines))
        lines += [pool[k % len(pool)] for k in range(need)] if pool else []
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    val = work / "worlds" / "val" / "yolo" / "images" / "train"
    data = folder / "data.yaml"
    data.write_text(f"train: {listing.absolute()}\nval: {val.absolute()}\nnames:\n"
                    + "".join(f"  {i}: {s}\n" for i, s in enumerate(SHAPES)))
    return data


def _yolo_names(path: Path) -> list[str]:
    names, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("names:"):
            inside = True
        elif inside and line.startswith("  "):
            names.append(json.loads(line.split(":", 1)[1].strip()))
    return names


def train_detector(work: Path, arm: str, data: Path, args, init: Path | None = None) -> Path:
    """A detector for ``arm``: the demo layout from scratch, or from ``init``'s weights."""
    from detectors.ultralytics_backend import offline_environment

    weights = work / "detector" / arm / "weights" / "last.pt"
    if done(work, f"detector-{arm}"):
        return weights
    offline_environment()
    if weights.is_file():
        cmd = ["yolo", "detect", "train", f"resume={weights.absolute()}"]
    else:
        import demo

        model = init.absolute() if init is not None else Path(demo.__file__).parent / "detector.yaml"
        cmd = ["yolo", "detect", "train", f"model={model}", f"data={data}",
               f"epochs={args.detector_epochs}", f"imgsz={args.imgsz}", "batch=32", "device=cpu", "workers=2",
               "amp=False", "val=False", "plots=False", "seed=0", "deterministic=True", "patience=0",
               f"project={(work / 'detector').absolute()}", f"name={arm}", "exist_ok=True"]
    started = time.time()
    run(cmd)
    return Path(finish(work, f"detector-{arm}", {"weights": str(weights), "seconds": time.time() - started})["weights"])


def train_gpt4roi(work: Path, arm: str, data: list[str], weights: list[float], init: Path, args) -> Path:
    from model.loop import latest_checkpoint
    from model.train import TrainConfig, train

    out = work / "gpt4roi" / arm
    info = done(work, f"gpt4roi-{arm}")
    if info:
        return Path(info["checkpoint"])
    cfg = TrainConfig(data=data, data_weights=weights, out=str(out), init=str(init), stage=2, freeze=["spi_module"],
                      max_steps=args.steps, batch_size=8, max_turns=16, lr=1e-3, warmup_steps=100,
                      save_every=100, keep_checkpoints=2, seed=0)
    started = time.time()
    log(f"GPT4RoI arm {arm}: {args.steps} steps on {data} (weights {weights})")
    checkpoint = train(cfg, progress=True)  # the bar (loss, LR) goes to the log
    assert latest_checkpoint(out) == checkpoint
    finish(work, f"gpt4roi-{arm}", {"checkpoint": str(checkpoint), "seconds": time.time() - started})
    return checkpoint


def calibrate(work: Path, model: Path, detector: Path, args) -> tuple[Path, dict[str, float]]:
    """Fit on 70 % of the validation scenes' answers, thresholds on the other 30 %; on the proposals
    the filtered pseudo-label job keeps (detector score >= ``--proposal-score``)."""
    from jobs.config import DetectorSpec
    from model.checkpoint import load_model
    from pipeline.postprocess import PostProcess
    from pipeline.stages import PipelineConfig
    from synth.calibrate import calibrate_world
    from synth.evaluate import read_ground_truth

    path = work / "calibration.json"
    info = done(work, "calibration")
    if info:
        return path, info["thresholds"]
    calibration = calibrate_world(read_ground_truth(work / "worlds" / "val"), load_model(str(model)),
                                  PipelineConfig(postprocess=PostProcess(score_threshold=args.proposal_score)),
                                  DetectorSpec(f"yolo:{detector}", "cpu").build(), None, 0.3, 0,
                                  precision=args.precision)
    calibration.fitted_on |= {"model": str(model), "detector": str(detector), "score_threshold": args.proposal_score}
    calibration.save(path)
    finish(work, "calibration", {"thresholds": calibration.thresholds, "precision": args.precision,
                                 "metrics": calibration.metrics["checked"]})
    return path, calibration.thresholds


def pseudo_label(work: Path, model: Path, detector: Path, calibration: Path, thresholds: dict[str, float],
                 args) -> dict:
    """The pool through ``roiscribe pseudo-label`` twice: filtered (proposals down to
    ``--proposal-score``, the calibration and its tuned thresholds, proposals not kept masked out of
    the YOLO images) and unfiltered (what peers do: the job's default proposals, every one kept).
    Each export is moved to its own folder."""
    info = done(work, "pseudo")
    if info:
        return info
    pool = work / "worlds" / "pool" / "images"
    common = ["--model", str(model), "--detector", f"yolo:{detector}", "--runner", "local", "--resume"]
    run(["roiscribe", "pseudo-label", str(pool), "--out", str(work / "pool-filtered"), *common,
         "--calibration", str(calibration), "--score-threshold", str(args.proposal_score),
         *(["--mask-rejected"] if args.mask_rejected else []),
         *[f"--min-probability={k}={v}" for k, v in sorted(thresholds.items())]])
    _move(work / "pool-filtered" / "exports", work / "pseudo" / "filtered")
    run(["roiscribe", "pseudo-label", str(pool), "--out", str(work / "pool"), *common,
         *[f"--min-probability={k}=0" for k in ("region", "caption", "color", "shape", "material", "relation",
                                                "action")]])
    _move(work / "pool" / "exports", work / "pseudo" / "unfiltered")
    counts = {kind: json.loads((work / "pseudo" / kind / "manifest.json").read_text())["counts"]
              for kind in ("filtered", "unfiltered")}
    return finish(work, "pseudo", {"thresholds": thresholds, "counts": counts, "proposal_score": args.proposal_score,
                                   "mask_rejected": args.mask_rejected})


def _move(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dest)


def evaluate_arm(work: Path, arm: str, model: Path, detector: Path, scenes: str = "heldout") -> dict:
    """``roiscribe evaluate`` of an arm on the held-out scenes (the result) or on the validation
    scenes (``scenes="val"``: where choices about the loop may be made)."""
    name = arm if scenes == "heldout" else f"{scenes}-{arm}"
    out = work / "scores" / f"{name}.json"
    if done(work, f"scores-{name}"):
        return json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    run(["roiscribe", "evaluate", "--data", str(work / "worlds" / scenes), "--model", str(model),
         "--detector", f"yolo:{detector}", "--json", str(out)], env={"PYTHONUNBUFFERED": "1"})
    finish(work, f"scores-{name}")
    return json.loads(out.read_text())


# The table -----------------------------------------------------------------------------------------

def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def report(work: Path, scenes: str = "heldout") -> str:
    prefix = "" if scenes == "heldout" else f"{scenes}-"
    rows = ["| arm | detector mAP50 | colour | shape | material | size | relation | with the arm's detector: "
            "colour / shape / material / relation |", "|---|---|---|---|---|---|---|---|"]
    for arm, what in ARMS.items():
        path = work / "scores" / f"{prefix}{arm}.json"
        if not path.is_file():
            rows.append(f"| ({arm}) {what} | not measured yet | | | | | | |")
            continue
        s = json.loads(path.read_text())
        gt, det = s["ground_truth_boxes"], s["detector_boxes"]
        rows.append(f"| ({arm}) {what} | {s['detector']['mAP50']:.3f} | "
                    + " | ".join(_num(gt.get(k)) for k in ("color", "shape", "material", "size", "relation"))
                    + " | " + " / ".join(_num(det.get(k)) for k in ("color", "shape", "material", "relation")) + " |")
    pseudo = done(work, "pseudo")
    if pseudo and scenes == "heldout":
        rows += ["", "pseudo-labels (accepted of proposed): " + "; ".join(
            f"{kind}: " + ", ".join(f"{k} {c['accepted']}/{c['proposed']}" for k, c in counts.items())
            for kind, counts in pseudo["counts"].items()), f"thresholds (tuned on validation): {pseudo['thresholds']}"]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/loop"))
    p.add_argument("--labelled", type=int, default=100, help="labelled scenes")
    p.add_argument("--pool", type=int, default=2000, help="unlabelled scenes to pseudo-label")
    p.add_argument("--val", type=int, default=200, help="labelled validation scenes (calibration, thresholds)")
    p.add_argument("--heldout", type=int, default=300, help="held-out scenes (scoring only)")
    p.add_argument("--steps", type=int, default=800, help="GPT4RoI steps (8 images each), every arm")
    p.add_argument("--detector-epochs", type=int, default=6, help="epochs over --detector-images, every arm")
    p.add_argument("--detector-images", type=int, default=2500, help="images per detector epoch, every arm")
    p.add_argument("--labelled-weight", type=int, default=5,
                   help="detector: times the labelled images are seen per epoch beside the pool (arms b and c)")
    p.add_argument("--gpt-labelled-weight", type=float, default=15.0,
                   help="GPT4RoI: weight of the labelled conversations beside the pool's (arms b and c; 5 left "
                        "the labelled captions too small a share: arm (c) lost the size word on validation)")
    p.add_argument("--proposal-score", type=float, default=0.05,
                   help="detector score down to which the filtered pseudo-label job proposes regions (and its "
                        "calibration is fitted); the calibrated policy decides what is kept")
    p.add_argument("--no-mask-rejected", dest="mask_rejected", action="store_false",
                   help="leave the proposals not kept unmasked in the filtered YOLO export")
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--precision", type=float, default=0.95,
                   help="kept answers' precision on validation that the thresholds aim at")
    p.add_argument("--min-probability", action="append", default=[], metavar="KIND[:CLASS]=P",
                   help="a threshold of the filtered arm chosen on the validation scenes instead of the tuned one "
                        "(e.g. relation=0: the relations kept unfiltered; repeat for several)")
    p.add_argument("--report", action="store_true", help="print the table from what is done, run nothing")
    args = p.parse_args(argv)
    work = args.work
    if args.report:
        print(report(work) + "\n\nvalidation scenes:\n\n" + report(work, "val"))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    make_worlds(work, {"labelled": args.labelled, "pool": args.pool, "val": args.val, "heldout": args.heldout})
    init = make_init(work)
    labelled = work / "worlds" / "labelled"
    base = [str(labelled / "conversations.jsonl"), str(labelled / "relations.jsonl")]

    det_a = train_detector(work, "a", yolo_list(work, "a", None, 1, args.detector_images), args)
    gpt_a = train_gpt4roi(work, "a", base, [1.0, 1.0], init, args)
    cal, thresholds = calibrate(work, gpt_a, det_a, args)
    overrides = {k: float(v) for k, _, v in (item.rpartition("=") for item in args.min_probability)}
    thresholds = {k: v for k, v in thresholds.items() if k.partition(":")[0] not in overrides}  # as the CLI does
    thresholds |= overrides
    pseudo_label(work, gpt_a, det_a, cal, thresholds, args)
    models = {"a": (gpt_a, det_a)}
    for arm, kind in (("b", "unfiltered"), ("c", "filtered")):
        pseudo = work / "pseudo" / kind
        w = float(args.gpt_labelled_weight)
        det = train_detector(work, arm, yolo_list(work, arm, pseudo, args.labelled_weight, args.detector_images), args)
        gpt = train_gpt4roi(work, arm, base + [str(pseudo / "conversations.jsonl")], [w, w, 1.0], init, args)
        models[arm] = (gpt, det)
    for arm, (gpt, det) in models.items():
        evaluate_arm(work, arm, gpt, det, "val")
    for arm, (gpt, det) in models.items():
        evaluate_arm(work, arm, gpt, det)
    table = (f"Held-out scenes ({args.heldout}, seeds {SEEDS['heldout']:,} on):\n\n{report(work)}\n\n"
             f"Validation scenes ({args.val}, seeds {SEEDS['val']:,} on; calibration and thresholds were fitted "
             f"there):\n\n{report(work, 'val')}")
    (work / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
