"""The ``roiscribe`` command line. Only this module talks to the user."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata, resources
from pathlib import Path

SAMPLE_BOXES = {  # pixel boxes of the shapes in the bundled sample image (jobs/assets/shapes.png)
    "red circle": (30, 40, 120, 130),
    "blue square": (170, 60, 280, 150),
    "green triangle": (100, 150, 200, 220),
}


def _add_label_studio_args(p: argparse.ArgumentParser, project_required: bool) -> None:
    p.add_argument("--project", required=project_required, default=None,
                   help="Label Studio project title (created if missing) or numeric id")
    p.add_argument("--images", choices=("local-files", "upload", "url"), default=None,
                   help="how tasks reach their images: local-files under --document-root (the default when it "
                        "is given), upload to the project (the default otherwise), or url (http(s) uris, or "
                        "--url-prefix + the path under --document-root)")
    p.add_argument("--document-root", default=None,
                   help="the folder Label Studio serves as local files (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
    p.add_argument("--url-prefix", default=None, help="with --images url: prefix + the path under --document-root")
    p.add_argument("--model-version", default=None,
                   help="prediction model_version (default: from the output's manifest: roiscribe version, model and "
                        "detector names with fingerprints of their weights, and of the answering config)")
    p.add_argument("--chunk-size", type=int, default=500, help="tasks per import request")
    p.add_argument("--max-relations", type=_non_negative_int, default=5,
                   help="relations pushed per image, the most confident first (default 5; 0: none)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="a `roiscribe calibrate` file: every score pushed is the calibrated probability of being "
                        "right, the prediction's that the whole pre-annotation is (sort by it to review the "
                        "least sure first)")
    p.add_argument("--retries", type=int, default=5,
                   help="read retries (exponential backoff from 1 s) while the server is unreachable")


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    """The pseudo-label policy (``sinks.exports.Policy``) of ``export`` and ``pseudo-label``."""
    p.add_argument("--min-probability", action="append", default=[], metavar="KIND[:CLASS]=P",
                   help="threshold per kind (region, caption, color, shape, material, action, relation; "
                        "default: the calibration's tuned thresholds (`calibrate --precision`), else 0.5), "
                        "or per kind and detector class (a region or an answer about one); repeat for several, "
                        "e.g. --min-probability relation=0.8 --min-probability region:hexagon=0.9")
    p.add_argument("--min-area", type=float, default=0.0, help="smallest box kept, in pixels (default 0)")
    p.add_argument("--max-per-image", type=int, default=None, help="regions kept per image, the most "
                                                                   "probable first (default: all)")
    p.add_argument("--max-per-class", type=int, default=None, help="regions kept per class and image")
    p.add_argument("--val-fraction", type=float, default=0.1, help="images of the YOLO export kept for "
                                                                   "validation (default 0.1)")
    p.add_argument("--mask-rejected", action="store_true",
                   help="YOLO export: paint out the proposals not kept (masked PNG copies of those images), so "
                        "that objects the teacher was unsure of are not taught as background")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _version() -> str:
    try:
        return metadata.version("roiscribe")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a box is x1,y1,x2,y2 in pixels, got {text!r}") from None
    if not (x2 > x1 and y2 > y1):
        raise argparse.ArgumentTypeError(f"a box needs x2 > x1 and y2 > y1, got {text!r}")
    return x1, y1, x2, y2


OFF = "off"


def _iou_or_off(text: str) -> float | str:
    if text.strip().lower() in ("off", "none"):
        return OFF
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected an IoU in (0, 1] or 'off', got {text!r}")
    return value


_DUPLICATE_HELP = ("drop a box that overlaps a higher-scoring box of another class by more than this IoU "
                   "(one region per object; 'off' keeps both; default 0.8)")


_MODEL_HELP = "demo (the shipped model, the default), random:PRESET (random weights) or a local checkpoint directory"
_DETECTOR_HELP = "demo (the shipped detector, the default), yolo:PATH, torchvision:ARCH:PATH, given:coco:FILE, ..."


def _add_model_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Model flags. With ``defaults=False`` an omitted flag is None (a config file decides)."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--model", default=d("demo"), help=_MODEL_HELP)
    p.add_argument("--clip", default=None, help="local CLIP directory, for checkpoints in the official layout")
    p.add_argument("--device", default=d("auto"), help="cpu, cuda, cuda:N or auto (the default: a GPU if visible)")
    p.add_argument("--dtype", default=d("auto"), choices=("auto", "float32", "bfloat16", "float16"),
                   help="model weights and compute (auto: on CUDA float16 for official-layout checkpoints as released, "
                        "bfloat16 for the rest; float32 on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on every answer's length in tokens (default 1024; each kind of question has its own "
                        "lower limit, [compose.answer_tokens] in the job config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roiscribe",
        description="Region-level annotation with GPT4RoI: captions, attributes and relations for detector boxes.",
    )
    parser.add_argument("--version", action="version", version=f"roiscribe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    caption = sub.add_parser("caption", help="the main job: caption every image of a source into Parquet",
                             description="Flags override the --config file; the fully resolved config is saved "
                                         "in OUT/manifest.json.")
    caption.add_argument("source", nargs="?", default=None,
                         help="a folder, a glob, a .parquet/.csv manifest or a COCO .json (or the config's source)")
    caption.add_argument("--config", type=Path, default=None, help="a TOML or JSON job config (see README)")
    caption.add_argument("--out", default=None, help="output folder (Parquet parts + manifest.json)")
    _add_model_args(caption, defaults=False)
    caption.add_argument("--detector", default=None, help=_DETECTOR_HELP)
    caption.add_argument("--batch-size", type=int, default=None, help="images per detect / describe call (default 8)")
    caption.add_argument("--score-threshold", type=float, default=None, help="detector score kept (default 0.25)")
    caption.add_argument("--max-regions", type=int, default=None, help="regions per image (default 50)")
    caption.add_argument("--duplicate-iou", type=_iou_or_off, default=None, help=_DUPLICATE_HELP)
    caption.add_argument("--captions", default=None, help="comma list of brief, detailed (default brief)")
    caption.add_argument("--attributes", default=None,
                         help="comma list ('' for none; default color,shape,material,action)")
    caption.add_argument("--max-pairs", type=int, default=None, help="relation questions per image (0: none; default 8)")
    caption.add_argument("--rows-per-part", type=int, default=None, help="rows per Parquet part file (default 500)")
    caption.add_argument("--resume", action="store_true", help="skip images already written in --out")
    caption.add_argument("--force-resume", action="store_true",
                         help="resume even though --out was written from another source, model, detector or config")
    caption.add_argument("--root", default=None,
                         help="the folder every path named in a manifest or COCO file must lie under "
                              "(default: that file's folder)")
    caption.add_argument("--max-bytes", type=int, default=None,
                         help="refuse image files larger than this many bytes (default 268435456)")
    caption.add_argument("--retry-failed", action="store_true", help="reprocess images whose rows are errors")
    caption.add_argument("--dry-run", action="store_true",
                         help="plan only: count the source's images already done, failed and to do (with --resume "
                              "or --retry-failed as the job would run), write nothing")
    caption.add_argument("--runner", choices=("auto", "ray", "local"), default=None,
                         help="auto (the default): in process for a small job with no cluster address, else Ray")
    caption.add_argument("--no-ray", action="store_const", const="local", dest="runner", help="same as --runner local")
    caption.add_argument("--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS or a local one)")
    caption.add_argument("--describe-actors", type=int, default=None, help="Ray actors holding the model (default 1)")
    caption.add_argument("--detect-actors", type=int, default=None,
                         help="a separate Ray pool for decoding and detection (default 0: inside the describe actors)")
    caption.add_argument("--gpus-per-actor", type=float, default=None,
                         help="GPUs per describe actor (default: 1 if the cluster has GPUs, else 0)")
    caption.add_argument("--from-label-studio", metavar="PROJECT", default=None,
                         help="caption a Label Studio project's tasks (SOURCE is then the server URL); "
                              "results go back to it as predictions")
    caption.add_argument("--ls-boxes", choices=("annotations", "detector"), default="annotations",
                         help="with --from-label-studio: the boxes annotators drew (default) or the detector's")
    caption.add_argument("--to-label-studio", metavar="URL", default=None,
                         help="also push the output to this Label Studio server (see `roiscribe push`)")
    _add_label_studio_args(caption, project_required=False)

    push = sub.add_parser("push", help="push a caption output into Label Studio as tasks with predictions")
    push.add_argument("out", type=Path, help="a `roiscribe caption` output folder")
    push.add_argument("--url", default=None, help="the Label Studio server, e.g. http://127.0.0.1:8080")
    _add_label_studio_args(push, project_required=False)
    push.add_argument("--task-files", type=Path, default=None, metavar="DIR",
                      help="instead of importing: write the tasks with their predictions as JSON files of "
                           "--chunk-size tasks (and labeling-config.xml) into DIR, for a storage sync to import")

    backend = sub.add_parser("ml-backend", help="serve the engine as a Label Studio ML backend (draw a box, get its description)")
    backend.add_argument("--host", default="127.0.0.1")
    backend.add_argument("--port", type=int, default=9090)
    backend.add_argument("--config", type=Path, default=None,
                         help="a job config (TOML/JSON): model, detector, engine, compose, postprocess")
    backend.add_argument("--detector", default=None, help="for pre-annotating whole images (no drawn box); " + _DETECTOR_HELP)
    backend.add_argument("--label-studio-url", default=None, help="the server whose uploaded images tasks point at")
    backend.add_argument("--document-root", default=None, help="the server's local-files document root")
    backend.add_argument("--model-version", default="roiscribe-interactive")
    backend.add_argument("--allow-unauthenticated", action="store_true",
                         help="serve beyond 127.0.0.1 without basic auth (set ROISCRIBE_ML_BACKEND_USER and "
                              "ROISCRIBE_ML_BACKEND_PASSWORD instead)")
    _add_model_args(backend, defaults=False)

    show = sub.add_parser("show", help="render previews (boxes, labels, captions) and an HTML page of a caption output")
    show.add_argument("out", type=Path, help="a `roiscribe caption` output folder")
    show.add_argument("--limit", type=int, default=100, help="images to render")
    show.add_argument("--preview-dir", type=Path, default=None, help="default: OUT/preview")

    demo = sub.add_parser("demo", help="describe the regions of the bundled sample image")
    _add_model_args(demo)

    describe = sub.add_parser("describe", help="ask GPT4RoI about regions of one image")
    describe.add_argument("image", type=Path)
    describe.add_argument("question", help='e.g. "What is <region1> doing?"; <regionN> is the N-th --box')
    describe.add_argument("--box", type=_parse_box, action="append", default=[], required=True,
                          help="x1,y1,x2,y2 in pixels of the image; repeat for several regions")
    _add_model_args(describe)

    train = sub.add_parser("train", help="instruction-tune a GPT4RoI model (stage 1 or 2) from a config file")
    train.add_argument("--config", type=Path, required=True, help="TOML or JSON with model.train.TrainConfig fields")
    train.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    train.add_argument("--ray", action="store_true", help="run through Ray Train (DDP) instead of in process")
    train.add_argument("--workers", type=int, default=2, help="Ray Train workers (with --ray)")
    train.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker (with --ray)")

    pretrain = sub.add_parser("pretrain", help="pretrain the demo's vision tower and region encoder on the world's labels")
    pretrain.add_argument("--config", type=Path, required=True, help="TOML or JSON with synth.pretrain.PretrainConfig fields")
    pretrain.add_argument("--steps", type=int, default=None, help="override the config's steps")

    world = sub.add_parser("world", help="generate the synthetic shapes world (training and evaluation data)")
    world.add_argument("--out", type=Path, required=True)
    world.add_argument("--count", type=int, default=1000, help="number of images")
    world.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed + k")
    world.add_argument("--workers", type=int, default=1)
    world.add_argument("--val-fraction", type=float, default=0.1, help="share of the YOLO set kept for validation")

    evaluate = sub.add_parser("evaluate", help="score a model and a detector on synthetic-world ground truth")
    evaluate.add_argument("--data", type=Path, required=True, help="a `roiscribe world` folder (ground_truth.jsonl)")
    evaluate.add_argument("--detector", default=None,
                          help="detector spec (default: demo, the shipped detector; none: ground-truth boxes only)")
    evaluate.add_argument("--limit", type=int, default=200, help="images to score (default 200)")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the scores here")
    evaluate.add_argument("--score-threshold", type=float, default=0.25, help="detector score kept for captioning")
    evaluate.add_argument("--duplicate-iou", type=_iou_or_off, default=0.8, help=_DUPLICATE_HELP)
    evaluate.add_argument("--batch-size", type=int, default=8, help="images per describe batch")
    _add_model_args(evaluate)

    calibrate = sub.add_parser("calibrate", help="fit the probability that each answer is right on labelled "
                                                 "synthetic-world scenes; report ECE and AUROC before and after")
    calibrate.add_argument("--data", type=Path, required=True, help="a `roiscribe world` folder to fit on")
    calibrate.add_argument("--check", type=Path, default=None,
                           help="another world folder to check on (scenes of a seed used for nothing else); "
                                "default: a held-out share of --data's images")
    calibrate.add_argument("--holdout", type=float, default=0.3, help="share of --data's images kept out of the fit "
                                                                      "to check on, without --check (default 0.3)")
    calibrate.add_argument("--seed", type=int, default=0, help="which images are held out")
    calibrate.add_argument("--limit", type=int, default=None, help="images of each folder to use (default: all)")
    calibrate.add_argument("--detector", default=None, help="detector spec whose boxes are asked about (default: demo)")
    calibrate.add_argument("--out", type=Path, default=None,
                           help="where to write the calibration (default: calibration.json in the model's "
                                "checkpoint directory)")
    calibrate.add_argument("--jitter", type=float, default=None,
                           help="also measure stability: ask again with box edges moved by this share of the box "
                                "(e.g. 0.05; a second pass, twice the time)")
    calibrate.add_argument("--precision", type=float, default=None,
                           help="also tune a threshold per kind on the checked answers: the lowest probability at "
                                "which the answers kept are right this often (e.g. 0.95); written into the "
                                "calibration, where export and pseudo-label take them as their defaults")
    calibrate.add_argument("--per-class", action="store_true",
                           help="with --precision: also a region threshold per detector class with 30 checked "
                                "regions or more (region:CLASS; 1.0 for a class whose boxes never reach the precision)")
    calibrate.add_argument("--score-threshold", type=float, default=0.25,
                           help="detector score kept (default 0.25): fit on the proposals the job that uses the "
                                "calibration keeps (e.g. a pseudo-label job run with a lower --score-threshold)")
    calibrate.add_argument("--batch-size", type=int, default=8, help="images per describe batch")
    _add_model_args(calibrate)

    export = sub.add_parser("export", help="pseudo-labels: filter a caption output by a policy and export "
                                           "training data (GPT4RoI conversations, YOLO, COCO) to DIR/exports")
    export.add_argument("out", type=Path, help="a caption job's output folder")
    export.add_argument("--calibration", type=Path, default=None,
                        help="a `roiscribe calibrate` file: filter on calibrated probabilities (default: the rows' "
                             "own, when the job ran with one; else the uncalibrated confidence, exp(mean token "
                             "log-prob); regions: the detector score)")
    _add_policy_args(export)

    # caption's every flag (the same job: stages, runner, resume), then the export's policy
    pseudo = sub.add_parser("pseudo-label", conflict_handler="resolve",
                            help="caption SOURCE, then export its pseudo-labels by a policy (caption + export)")
    pseudo._add_container_actions(caption)
    _add_policy_args(pseudo)

    corrections = sub.add_parser("corrections", help="the annotations people made in a Label Studio project, as "
                                                     "training data (GPT4RoI conversations, YOLO, COCO) in DIR/exports")
    corrections.add_argument("--url", required=True, help="the Label Studio server (token: LABEL_STUDIO_API_KEY)")
    corrections.add_argument("--project", required=True, help="project title or id")
    corrections.add_argument("--out", type=Path, required=True, help="folder for exports/ (and downloaded images)")
    corrections.add_argument("--document-root", default=None, help="the server's local-files document root")
    corrections.add_argument("--retries", type=int, default=5, help="read retries while the server is unreachable")

    delta = sub.add_parser("apply-delta", help="merge the released GPT4RoI delta into a local LLaMA-7B")
    delta.add_argument("--base", type=Path, required=True, help="local LLaMA-7B directory (HF layout)")
    delta.add_argument("--delta", type=Path, required=True, help="local GPT4RoI-7B-delta-V0 directory")
    delta.add_argument("--out", type=Path, required=True, help="where to write the merged checkpoint")
    return parser


class UsageError(ValueError):
    """Unusable arguments: the command exits 2 with the message (no traceback)."""


def _model_spec(args):
    from jobs.config import ModelSpec

    spec = ModelSpec(args.model or "demo", args.clip, args.device or "auto", args.dtype or "auto")
    _check_model(spec.spec)
    return spec


def _check_model(spec: str) -> None:
    """Refuse a model spec that cannot load before any work starts (on Ray it would fail in actors)."""
    from model.checkpoint import RANDOM, SHIPPED
    from model.config import PRESETS

    if spec == SHIPPED or Path(spec).is_dir():
        return
    if spec.startswith(RANDOM) and spec[len(RANDOM):] in PRESETS:
        return
    hint = f"; for random weights of that preset write {RANDOM}{spec}" if spec in PRESETS else ""
    raise UsageError(f"model {spec!r} is not a checkpoint directory, {SHIPPED!r} or {RANDOM}PRESET "
                     f"(valid presets: {', '.join(sorted(PRESETS))}){hint}")


def _check_detector(spec: str) -> None:
    from detectors import DETECTORS

    kind = spec.partition(":")[0]
    if kind not in DETECTORS:
        raise UsageError(f"unknown detector kind {kind!r} in {spec!r}; valid kinds: {', '.join(DETECTORS)}")


def _engine(args):
    from model.config import EngineConfig

    return EngineConfig() if args.max_new_tokens is None else EngineConfig(max_new_tokens=args.max_new_tokens)


def _describe(loaded, image, boxes_px, question: str, engine_config) -> str:
    """One question about regions of one image; ``<regionN>`` is the N-th box."""
    from model.engine import ImageJob, RegionEngine, RegionPrompt
    from model.vision import normalize_boxes

    boxes = normalize_boxes(boxes_px, *image.size)
    job = ImageJob(image, boxes, [RegionPrompt(question, tuple(range(len(boxes))))])
    return RegionEngine(loaded, engine_config).run([job])[0][0].text


# job-config key <- command-line flag (argparse dest); a flag a command lacks, or leaves out, sets nothing
FLAG_KEYS = (
    ("source", "source"), ("out", "out"), ("model.spec", "model"), ("model.clip", "clip"),
    ("model.device", "device"), ("model.dtype", "dtype"), ("detector.spec", "detector"),
    ("detector.device", "device"), ("batch_size", "batch_size"), ("max_bytes", "max_bytes"),
    ("engine.max_new_tokens", "max_new_tokens"), ("postprocess.score_threshold", "score_threshold"),
    ("postprocess.max_regions", "max_regions"), ("postprocess.duplicate_iou", "duplicate_iou"),
    ("compose.captions", "captions"), ("compose.attributes", "attributes"), ("compose.max_pairs", "max_pairs"),
    ("rows_per_part", "rows_per_part"), ("runner.mode", "runner"), ("runner.address", "address"),
    ("runner.describe_actors", "describe_actors"), ("runner.detect_actors", "detect_actors"),
    ("runner.gpus_per_describe_actor", "gpus_per_actor"), ("calibration", "calibration"),
)


def job_overrides(args) -> dict:
    """The job-config keys the command line sets (flags left out are None and set nothing)."""
    out: dict = {}
    for path, dest in FLAG_KEYS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest in ("captions", "attributes"):  # comma lists
            value = [n.strip() for n in value.split(",") if n.strip()]
        elif dest == "duplicate_iou" and value == OFF:
            value = None
        elif dest in ("out", "calibration"):
            value = str(value)
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    if getattr(args, "max_pairs", None) is not None:
        out["compose"]["relations"] = args.max_pairs > 0
    return out


def job_config(args):
    """The job config of a command: the --config file (if any) with the flags applied."""
    from jobs.config import job_from_dict, merge
    from model.configfile import read_config

    base = read_config(args.config) if getattr(args, "config", None) else {}
    return job_from_dict(merge(base, job_overrides(args)))


def cmd_caption(args) -> int:
    from jobs.caption import run_caption
    from jobs.sources import SourceError, open_source

    push_url = args.to_label_studio
    cfg = job_config(args)
    _check_model(cfg.model.spec)
    _check_detector(cfg.detector.spec)
    if not cfg.out:
        raise UsageError("the output folder is missing: pass --out DIR (or set out in the config)")
    if not cfg.source:
        raise UsageError("the source is missing: pass SOURCE (or set source in the config)")
    if args.from_label_studio:
        from jobs.label_studio import pull_source

        client = _client(cfg.source, args.retries)
        source, pid = pull_source(client, args.from_label_studio, cfg.out, args.document_root, args.ls_boxes)
        push_url, args.project = cfg.source, str(pid)
    else:
        source = open_source(cfg.source, root=args.root)
    if push_url and not args.project:
        raise SourceError("--to-label-studio needs --project")
    summary = run_caption(cfg, source, resume=args.resume or args.force_resume, retry_failed=args.retry_failed,
                          force_resume=args.force_resume, dry_run=args.dry_run)
    if summary.dry_run:
        failed = ("redone: counted in to do" if args.retry_failed else
                  "kept: counted in already done; --retry-failed redoes them")
        print(f"dry run: {summary.total} images in the source; {summary.skipped} already done, "
              f"{summary.processed} to do; {summary.failed} have error rows ({failed}); "
              f"{summary.runner_reason}; nothing written")
        return 0
    for part in summary.set_aside:
        print(f"roiscribe caption: set aside an unreadable part file (its images were redone): {part}", file=sys.stderr)
    if summary.duplicates_removed:
        print(f"roiscribe caption: {summary.duplicates_removed} duplicate rows found (an image written twice); "
              "the newest of each was kept", file=sys.stderr)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())) or "nothing new"
    print(f"{summary.processed} images processed ({counts}), {summary.skipped} already done; "
          f"{summary.regions} regions; {summary.images_per_s:.2f} images/s; {summary.runner_reason}; "
          f"output: {summary.out}")
    if push_url:
        args.url = push_url
        return _push(args, Path(cfg.out))
    return 0


def _client(url: str, retries: int = 5):
    from sinks.label_studio import LabelStudio, api_token

    return LabelStudio(url, api_token(), retries=retries)


def _push(args, out: Path) -> int:
    """Push a caption output (streamed from its Parquet parts) or write it as task files."""
    from sinks.label_studio import ImageRefs, LabelStudioError, PushConfig, push, write_task_files

    task_files = getattr(args, "task_files", None)
    mode = args.images or ("local-files" if args.document_root else "url" if task_files else "upload")
    try:
        images = ImageRefs(mode, args.document_root, args.url_prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if task_files is None and not (args.url and args.project):
        raise UsageError("push needs --url and --project (or --task-files DIR to write task files instead)")
    calibration = None
    if args.calibration is not None:
        from pipeline.calibrate import Calibration

        try:
            calibration = Calibration.load(args.calibration)
        except (OSError, ValueError) as e:
            raise UsageError(f"--calibration {args.calibration}: {e}") from None
    try:
        if task_files is not None:
            report = write_task_files(out, task_files, images, args.model_version, args.chunk_size,
                                      args.max_relations, calibration)
        else:
            cfg = PushConfig(args.url, args.project, images, model_version=args.model_version,
                             chunk_size=args.chunk_size, max_relations=args.max_relations, calibration=calibration)
            report = push(out, cfg, client=_client(args.url, args.retries))
    except LabelStudioError as e:
        print(f"roiscribe push: {e}", file=sys.stderr)
        return 1
    print(f"{'wrote task files to ' + str(task_files) if task_files else 'pushed to ' + args.url}: {report.summary()}")
    for kind, lines in (("rejected", [f"{e.key}: {e.reason}" for e in report.rejected]),
                        ("warning", report.warnings())):
        for line in lines[:20]:
            print(f"  {kind} {line}", file=sys.stderr)
        if len(lines) > 20:
            print(f"  ... and {len(lines) - 20} more ({kind})", file=sys.stderr)
    return 1 if report.rejected else 0


def cmd_push(args) -> int:
    return _push(args, args.out)


def cmd_ml_backend(args) -> int:
    import logging
    import time

    from jobs.ml_backend import BackendConfig, Predictor, basic_auth_from_env, check_exposure, serve

    job = job_config(args)
    _check_model(job.model.spec)
    _check_detector(job.detector.spec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    user, password = basic_auth_from_env()
    try:  # refused before the model loads
        backend = BackendConfig(label_studio_url=args.label_studio_url, document_root=args.document_root,
                                model_version=args.model_version, user=user, password=password)
        check_exposure(args.host, backend, args.allow_unauthenticated)
    except ValueError as e:
        raise UsageError(str(e)) from None
    server = serve(Predictor(job, backend), args.host, args.port, allow_unauthenticated=args.allow_unauthenticated)
    auth = f"basic auth as {user!r}" if user else "NO authentication"
    print(f"roiscribe ML backend on http://{args.host}:{server.server_port} (model {job.model.spec}; {auth}); "
          "connect it in Label Studio: project Settings -> Model"
          + (" with Basic Auth and the same user and password" if user else ""), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
    return 0


def cmd_show(args) -> int:
    from sinks.preview import render_previews

    page = render_previews(args.out, args.preview_dir or args.out / "preview", limit=args.limit)
    print(f"previews: {page}")
    return 0


def cmd_demo(args) -> int:
    from PIL import Image

    path = resources.files("jobs") / "assets" / "shapes.png"
    with resources.as_file(path) as p:
        image = Image.open(p).convert("RGB")
    loaded = _model_spec(args).load()
    print(f"model: {args.model} ({loaded.config.name}); image: {path.name} {image.size[0]}x{image.size[1]}")
    if str(args.model).startswith("random:"):
        print("note: random weights, so the answers are noise")
    from model.engine import ImageJob, RegionEngine, RegionPrompt
    from model.vision import normalize_boxes
    from pipeline.compose import AnswerTokens, Templates

    names = list(SAMPLE_BOXES)
    boxes = [SAMPLE_BOXES[n] for n in names]
    prompts = [RegionPrompt(Templates().caption_brief, (i,), AnswerTokens().caption) for i in range(len(boxes))]
    job = ImageJob(image, normalize_boxes(boxes, *image.size), prompts)
    answers = RegionEngine(loaded, _engine(args)).run([job])[0]
    for i, (name, gen) in enumerate(zip(names, answers), 1):
        print(f"region{i} {boxes[i - 1]} (drawn: {name}): {gen.text!r}")
    return 0


def cmd_describe(args) -> int:
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(Image.open(args.image)).convert("RGB")
    except (OSError, ValueError) as e:
        print(f"roiscribe describe: cannot read image {args.image}: {e}", file=sys.stderr)
        return 2
    w, h = image.size
    for box in args.box:
        if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
            print(f"roiscribe describe: box {box} lies outside the {w}x{h} image", file=sys.stderr)
            return 2
    loaded = _model_spec(args).load()
    print(_describe(loaded, image, args.box, args.question, _engine(args)))
    return 0


def cmd_apply_delta(args) -> int:
    from tqdm import tqdm

    from model.checkpoint import apply_delta

    bar = tqdm(desc="applying delta", unit="shard")

    def progress(done, total):
        bar.total = total
        bar.update(1)

    out = apply_delta(args.base, args.delta, args.out, progress=progress)
    bar.close()
    print(f"merged checkpoint written to {out}")
    return 0


def cmd_train(args) -> int:
    from model.train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.ray:
        from jobs.train import train_on_ray

        final = train_on_ray(cfg, workers=args.workers, use_gpu=args.gpu)
    else:
        final = train(cfg)
    print(f"checkpoint: {final}")
    return 0


def cmd_pretrain(args) -> int:
    from synth.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig.from_file(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    print(f"checkpoint: {pretrain(cfg)}")
    return 0


def cmd_world(args) -> int:
    from synth.dataset import write_dataset_parallel

    files = write_dataset_parallel(args.out, range(args.seed, args.seed + args.count), args.workers,
                                   val_fraction=args.val_fraction)
    print(f"{args.count} images written under {args.out}; conversations: {', '.join(files)}")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from jobs.config import DetectorSpec
    from pipeline.postprocess import PostProcess
    from pipeline.stages import PipelineConfig
    from synth.evaluate import evaluate_world, read_ground_truth

    truths = read_ground_truth(args.data, args.limit)
    spec = _model_spec(args)
    config = PipelineConfig(engine=_engine(args), batch_size=args.batch_size,
                            postprocess=PostProcess(score_threshold=args.score_threshold,
                                                    duplicate_iou=None if args.duplicate_iou == OFF else args.duplicate_iou))
    detector = None
    if args.detector != "none":
        _check_detector(args.detector or "demo")
        detector = DetectorSpec(args.detector or "demo", spec.device).build()
    scores = evaluate_world(truths, spec.load(), config, detector)
    print(json.dumps(scores, indent=2))
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2))
    return 0


def cmd_calibrate(args) -> int:
    from jobs.config import DetectorSpec
    from pipeline.calibrate import format_report
    from pipeline.postprocess import PostProcess
    from pipeline.stages import PipelineConfig
    from synth.calibrate import calibrate_world
    from synth.evaluate import read_ground_truth

    spec = _model_spec(args)
    out = args.out
    if out is None:
        from model.checkpoint import RANDOM, SHIPPED

        if spec.spec == SHIPPED or spec.spec.startswith(RANDOM) or not Path(spec.spec).is_dir():
            raise UsageError(f"--model {spec.spec} is not a checkpoint directory to write the calibration next to; "
                             "pass --out FILE")
        out = Path(spec.spec) / "calibration.json"
    if not 0 < args.holdout < 1:
        raise UsageError(f"--holdout must be between 0 and 1, got {args.holdout}")
    if args.precision is not None and not 0 < args.precision <= 1:
        raise UsageError(f"--precision must be in (0, 1], got {args.precision}")
    if args.per_class and args.precision is None:
        raise UsageError("--per-class tunes per-class thresholds for --precision; give --precision too")
    truths = read_ground_truth(args.data, args.limit)
    check = read_ground_truth(args.check, args.limit) if args.check else None
    _check_detector(args.detector or "demo")
    detector = DetectorSpec(args.detector or "demo", spec.device).build()
    config = PipelineConfig(engine=_engine(args), batch_size=args.batch_size,
                            postprocess=PostProcess(score_threshold=args.score_threshold))
    calibration = calibrate_world(truths, spec.load(), config, detector, check, args.holdout, args.seed, args.jitter,
                                  args.precision, args.per_class)
    calibration.fitted_on |= {"data": str(args.data), "check": str(args.check) if args.check else None,
                              "model": spec.spec, "detector": args.detector or "demo",
                              "score_threshold": args.score_threshold}
    print(format_report(calibration.metrics["checked"], calibration.metrics["signals_auroc"]))
    print(f"({calibration.metrics['how']}; fitted on {calibration.fitted_on['answers']} answers)")
    if calibration.thresholds:
        print(f"thresholds for precision {args.precision} on the checked answers: "
              + ", ".join(f"{k}={v:g}" for k, v in calibration.thresholds.items()))
    print(f"calibration written to {calibration.save(out)}")
    return 0


def cmd_export(args) -> int:
    from pipeline.calibrate import Calibration

    if not (args.out / "data").is_dir():
        raise UsageError(f"{args.out} holds no caption output (no {args.out / 'data'})")
    calibration = Calibration.load(args.calibration) if args.calibration else None
    return _export(args.out, args, calibration, str(args.calibration) if args.calibration else None)


def cmd_pseudo_label(args) -> int:
    """``caption`` (every flag of it), then ``export`` with the policy flags; with ``--calibration``
    the rows carry calibrated probabilities, which the export filters on."""
    rc = cmd_caption(args)
    if rc != 0 or getattr(args, "dry_run", False):
        return rc
    config = job_config(args)
    return _export(Path(config.out), args, None, None, tuned_by=config.calibration)


def _export(out: Path, args, calibration, calibration_path: str | None, tuned_by: str | None = None) -> int:
    """Export with the policy flags; thresholds default to those tuned with the calibration used
    (``calibration``, or the job's, ``tuned_by``), then 0.5."""
    from pipeline.calibrate import Calibration
    from sinks.exports import KINDS, Policy, export

    thresholds = dict(Policy().min_probability)
    tuned = calibration if calibration is not None else Calibration.load(tuned_by) if tuned_by else None
    if tuned is not None and tuned.thresholds:
        thresholds |= {k: v for k, v in tuned.thresholds.items() if k.partition(":")[0] in thresholds}
        print(f"thresholds tuned with the calibration: " + ", ".join(f"{k}={v:g}" for k, v in tuned.thresholds.items()))
    explicit = {}
    for item in args.min_probability:
        if "=" not in item:
            raise UsageError(f"--min-probability {item}: expected KIND=P or KIND:CLASS=P")
        kind, _, value = item.rpartition("=")  # a class name may hold "="
        base, colon, label = kind.partition(":")
        if base not in Policy().min_probability:
            raise UsageError(f"--min-probability {item}: unknown kind {base!r}; expected one of "
                             f"{', '.join(sorted(Policy().min_probability))}")
        if colon and (base == "relation" or not label):
            raise UsageError(f"--min-probability {item}: a class threshold is KIND:CLASS=P with KIND a region or an "
                             "answer kind (a relation has two regions)")
        try:
            explicit[kind] = float(value)
        except ValueError:
            raise UsageError(f"--min-probability {item}: expected KIND=P with P a number in [0, 1]") from None
        if not 0 <= explicit[kind] <= 1:
            raise UsageError(f"--min-probability {item}: P must be in [0, 1]")
    for kind in [k for k in explicit if ":" not in k]:  # a kind's own threshold replaces its tuned class ones
        thresholds = {k: v for k, v in thresholds.items() if not k.startswith(f"{kind}:")}
    thresholds |= explicit
    policy = Policy(thresholds, args.min_area, args.max_per_image, args.max_per_class, args.val_fraction,
                    args.mask_rejected)
    manifest = export(out, policy, calibration, calibration_path)
    print(f"exported {manifest['images_exported']} images to {out / 'exports'} ({manifest['probability']})")
    for kind in (*KINDS, "action"):
        c = manifest["counts"].get(kind)
        if c:
            print(f"  {kind:<9} {c['accepted']:>7} accepted of {c['proposed']:>7}; rejected: "
                  + (", ".join(f"{n} {why}" for why, n in c["rejected_by_reason"].items()) or "none"))
    return 0


def cmd_corrections(args) -> int:
    from sinks.label_studio import LabelStudioError
    from sinks.label_studio.corrections import export_corrections

    try:
        manifest = export_corrections(_client(args.url, args.retries), args.project, args.out, args.document_root)
    except LabelStudioError as e:
        print(f"roiscribe corrections: {e}", file=sys.stderr)
        return 1
    print(f"{manifest['annotated']} of {manifest['tasks']} tasks annotated; {manifest['images_exported']} exported to "
          f"{args.out / 'exports'}" + "".join(f"; skipped: {n} {why}" for why, n in manifest["images_skipped"].items()))
    return 0


COMMANDS = {"caption": cmd_caption, "show": cmd_show, "demo": cmd_demo, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "export": cmd_export, "pseudo-label": cmd_pseudo_label, "corrections": cmd_corrections, "describe": cmd_describe, "train": cmd_train, "world": cmd_world,
            "apply-delta": cmd_apply_delta, "push": cmd_push, "ml-backend": cmd_ml_backend,
            "pretrain": cmd_pretrain}


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 the command ran and something failed (a push with rejected rows, or an
    unexpected error, shown with its traceback); 2 unusable arguments or config (a message only)."""
    from jobs.caption import ResourceError, ResumeMismatchError
    from jobs.sources import SourceError
    from model.configfile import ConfigError
    from sinks.label_studio.errors import LabelStudioError
    from sinks.parquet import OutputLockedError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, SourceError, ResourceError, ResumeMismatchError, OutputLockedError,
            FileExistsError) as e:
        print(f"roiscribe {args.command}: {e}", file=sys.stderr)
        return 2
    except LabelStudioError as e:  # the server refused, or could not be reached: its message says which
        print(f"roiscribe {args.command}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- a bug or an environment failure: the traceback, then one line
        import traceback

        traceback.print_exc()
        print(f"roiscribe {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
