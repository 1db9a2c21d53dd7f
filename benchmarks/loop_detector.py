"""Detector students of the pseudo-label loop, one variable at a time, scored on the validation
scenes only (where choices about the loop may be made; never the held-out ones).

A finished loop (``benchmarks/loop.py --work LOOP``) has the worlds, the teacher's detector (arm
(a), trained from scratch) and the pseudo-label exports. Each call here trains one more detector
under ``--out`` and prints the table of every student trained there so far, side by side with the
teacher:

* ``--export DIR``: the YOLO set it adds to the labelled images (``LOOP/pseudo/filtered``, or an
  export made with another policy, e.g. ``roiscribe export ... --min-probability region:CLASS=P``);
  none: the labelled images only;
* ``--labelled-weight W``: the labelled images W times per epoch beside the pool's (as the loop's);
* ``--init scratch|teacher``: the demo layout from scratch (the loop's arms) or the teacher's
  weights (every student of one table from the same init, for the same ``--epochs``).

::

    python -m benchmarks.loop_detector --loop runs/loop4 --out runs/loop5 --name fta --init teacher --epochs 3
    python -m benchmarks.loop_detector --loop runs/loop4 --out runs/loop5 --name ftc5 --init teacher --epochs 3 \\
        --export runs/loop4/pseudo/filtered
    python -m benchmarks.loop_detector --out runs/loop5 --report
    # a stronger teacher: the student fta pseudo-labels the pool (runs/loop6, a loop --work of its own)
    python -m benchmarks.loop_detector --loop runs/loop4 --out runs/loop5 --name fta --promote runs/loop6
    python -m benchmarks.loop_detector --loop runs/loop6 --out runs/loop6 --name ftc5 --init teacher --epochs 3 \
        --export runs/loop6/pseudo/filtered
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import loop


def promote(loop_work: Path, students: Path, name: str, to: Path, relation: float | None) -> Path:
    """A new loop ``--work`` (``to``) whose detector teacher is student ``name``: the worlds and the
    GPT4RoI teacher of ``loop_work``, the loop's calibration fitted again on the validation scenes
    with the student's boxes, and the pool pseudo-labelled by the loop's filtered job with them
    (``to/pseudo/filtered``). ``relation``: the relation threshold instead of the tuned one."""
    weights = loop.done(students, f"detector-{name}")
    gpt = loop.done(loop_work, "gpt4roi-a")
    if not (weights and gpt):
        raise SystemExit(f"no trained student {name!r} under {students}, or no teacher in {loop_work}")
    to.mkdir(parents=True, exist_ok=True)
    if not (to / "worlds").exists():
        (to / "worlds").symlink_to((loop_work / "worlds").resolve())
    if not loop.done(to, "detector-a"):
        loop.finish(to, "detector-a", {"weights": weights["weights"], "promoted": f"{students}:{name}"})
        loop.finish(to, "gpt4roi-a", {"checkpoint": gpt["checkpoint"]})
    det, model = Path(weights["weights"]), Path(gpt["checkpoint"])
    cal, thresholds = loop.calibrate(to, model, det, argparse.Namespace(proposal_score=0.05, precision=0.95))
    if relation is not None:
        thresholds = {**thresholds, "relation": relation}
    if not (to / "pseudo" / "filtered" / "manifest.json").is_file():
        loop.run(["roiscribe", "pseudo-label", str(to / "worlds" / "pool" / "images"), "--out", str(to / "pool-filtered"),
                  "--model", str(model), "--detector", f"yolo:{det}", "--runner", "local", "--resume",
                  "--calibration", str(cal), "--score-threshold", "0.05", "--mask-rejected",
                  *[f"--min-probability={k}={v}" for k, v in sorted(thresholds.items())]])
        loop._move(to / "pool-filtered" / "exports", to / "pseudo" / "filtered")
    return to / "pseudo" / "filtered"


def table(work: Path) -> str:
    rows = ["| student | init | epochs | pseudo-labels | labelled weight | mAP50 | circle | hexagon | square | star | triangle |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted((work / "students").glob("*.json")):
        s = json.loads(path.read_text())
        ap = s["AP50_per_class"]
        rows.append(f"| {s['name']} | {s['init']} | {s['epochs']} | {s['export'] or '-'} | {s['labelled_weight'] or '-'} | "
                    f"{s['mAP50']:.3f} | " + " | ".join(f"{ap.get(c, 0):.3f}" for c in
                                                        ("circle", "hexagon", "square", "star", "triangle")) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", type=Path, default=Path("runs/loop"), help="a finished loop's --work")
    p.add_argument("--out", type=Path, default=Path("runs/loop-detector"))
    p.add_argument("--name", help="the student's name (its folder under --out)")
    p.add_argument("--export", type=Path, default=None, help="a pseudo-label export (its yolo/ set); none: labelled only")
    p.add_argument("--labelled-weight", type=int, default=5)
    p.add_argument("--init", choices=("scratch", "teacher"), default="scratch")
    p.add_argument("--epochs", type=int, default=6, help="epochs of --images images")
    p.add_argument("--images", type=int, default=2500, help="images per epoch")
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--report", action="store_true", help="print the table of the students under --out, train nothing")
    p.add_argument("--promote", metavar="DIR", type=Path, default=None,
                   help="make DIR a loop --work whose detector teacher is student --name of --out (the GPT4RoI "
                        "teacher and worlds of --loop), calibrated and with the pool pseudo-labelled by it")
    p.add_argument("--relation", type=float, default=0.0,
                   help="with --promote: the pseudo-label job's relation threshold (default 0, as the loop's runs)")
    args = p.parse_args(argv)
    work = args.out
    if args.promote is not None:
        if not args.name:
            p.error("--promote needs --name (the student to make the teacher)")
        print(f"pseudo-labels: {promote(args.loop, work, args.name, args.promote, args.relation)}")
        return 0
    if not args.report:
        if not args.name:
            p.error("--name is required to train a student")
        teacher, gpt = loop.done(args.loop, "detector-a"), loop.done(args.loop, "gpt4roi-a")
        if not (teacher and gpt and (args.loop / "worlds").is_dir()):
            p.error(f"{args.loop} is not the --work of a loop whose teacher is trained (benchmarks/loop.py)")
        worlds = (args.loop / "worlds").resolve()
        if (work / "worlds").exists() and (work / "worlds").resolve() != worlds:
            p.error(f"{work} holds students of another loop's worlds ({(work / 'worlds').resolve()}); use another --out")
        settings = {"name": args.name, "init": args.init, "epochs": args.epochs, "images": args.images,
                    "export": str(args.export) if args.export else None,
                    "labelled_weight": args.labelled_weight if args.export else None, "teacher": teacher["weights"]}
        record = work / "students" / f"{args.name}.json"
        if record.is_file():
            old = json.loads(record.read_text())
            if any(old.get(k, v) != v for k, v in settings.items()):
                p.error(f"student {args.name!r} under {work} was trained with other settings; use another --name")
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "worlds").exists():
            (work / "worlds").symlink_to(worlds)
        data = loop.yolo_list(work, args.name, args.export, args.labelled_weight if args.export else 1, args.images)
        weights = loop.train_detector(work, args.name, data,
                                      argparse.Namespace(detector_epochs=args.epochs, imgsz=args.imgsz),
                                      Path(teacher["weights"]) if args.init == "teacher" else None)
        # the detector's numbers do not depend on the GPT4RoI the evaluation also asks
        scores = loop.evaluate_arm(work, args.name, Path(gpt["checkpoint"]), weights, "val")["detector"]
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps({**settings, "mAP50": scores["mAP50"],
                                      "AP50_per_class": scores["AP50_per_class"]}, indent=2))
    print(f"Detector students on the validation scenes ({work}):\n\n{table(work)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
