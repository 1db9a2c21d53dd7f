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
    p.add_argument("--model-version", default=None, help="prediction model_version (default: from the output's provenance)")
    p.add_argument("--chunk-size", type=int, default=500, help="tasks per import request")
    p.add_argument("--retries", type=int, default=5,
                   help="read retries (exponential backoff from 1 s) while the server is unreachable")


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


def _iou_or_off(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected an IoU in (0, 1] or 'off', got {text!r}")
    return value


_DUPLICATE_HELP = ("drop a box that overlaps a higher-scoring box of another class by more than this IoU "
                   "(one region per object; 'off' keeps both; default 0.8)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="demo (the shipped model), a preset name (random weights) or a local checkpoint directory")
    p.add_argument("--clip", default=None, help="local CLIP directory, for checkpoints in the official layout")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--max-new-tokens", type=int, default=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roiscribe",
        description="Region-level annotation with GPT4RoI: captions, attributes and relations for detector boxes.",
    )
    parser.add_argument("--version", action="version", version=f"roiscribe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    caption = sub.add_parser("caption", help="the main job: caption every image of a source into Parquet")
    caption.add_argument("source", help="a folder, a glob, a .parquet/.csv manifest or a COCO .json")
    caption.add_argument("--out", type=Path, required=True, help="output folder (Parquet parts + manifest.json)")
    caption.add_argument("--model", default="demo", help="demo (shipped), a preset (random weights) or a checkpoint dir")
    caption.add_argument("--clip", default=None, help="local CLIP directory, for checkpoints in the official layout")
    caption.add_argument("--detector", default="demo", help="demo (shipped), yolo:PATH, torchvision:ARCH:PATH, ...")
    caption.add_argument("--device", default="auto")
    caption.add_argument("--batch-size", type=int, default=8, help="images per detect / describe call")
    caption.add_argument("--max-new-tokens", type=int, default=32)
    caption.add_argument("--score-threshold", type=float, default=0.25)
    caption.add_argument("--max-regions", type=int, default=50)
    caption.add_argument("--duplicate-iou", type=_iou_or_off, default=0.8, help=_DUPLICATE_HELP)
    caption.add_argument("--captions", default="brief", help="comma list of brief, detailed")
    caption.add_argument("--attributes", default="color,shape,material,action", help="comma list ('' for none)")
    caption.add_argument("--max-pairs", type=int, default=8, help="relation questions per image (0: none)")
    caption.add_argument("--rows-per-part", type=int, default=500, help="rows per Parquet part file")
    caption.add_argument("--resume", action="store_true", help="skip images already written in --out")
    caption.add_argument("--retry-failed", action="store_true", help="reprocess images whose rows are errors")
    caption.add_argument("--no-ray", action="store_true", help="run every stage in this process")
    caption.add_argument("--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS or a local one)")
    caption.add_argument("--detect-actors", type=int, default=1)
    caption.add_argument("--describe-actors", type=int, default=1)
    caption.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per describe actor (0: 1 if the cluster has GPUs)")
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
    push.add_argument("--url", required=True, help="the Label Studio server, e.g. http://127.0.0.1:8080")
    _add_label_studio_args(push, project_required=True)

    backend = sub.add_parser("ml-backend", help="serve the engine as a Label Studio ML backend (draw a box, get its description)")
    backend.add_argument("--host", default="127.0.0.1")
    backend.add_argument("--port", type=int, default=9090)
    backend.add_argument("--detector", default="demo", help="for pre-annotating whole images (no drawn box)")
    backend.add_argument("--label-studio-url", default=None, help="the server whose uploaded images tasks point at")
    backend.add_argument("--document-root", default=None, help="the server's local-files document root")
    backend.add_argument("--model-version", default="roiscribe-interactive")
    _add_model_args(backend)

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
    evaluate.add_argument("--detector", default=None, help="detector spec (default: the shipped demo detector)")
    evaluate.add_argument("--limit", type=int, default=200, help="images to score (default 200)")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the scores here")
    evaluate.add_argument("--score-threshold", type=float, default=0.25, help="detector score kept for captioning")
    evaluate.add_argument("--duplicate-iou", type=_iou_or_off, default=0.8, help=_DUPLICATE_HELP)
    _add_model_args(evaluate)

    delta = sub.add_parser("apply-delta", help="merge the released GPT4RoI delta into a local LLaMA-7B")
    delta.add_argument("--base", type=Path, required=True, help="local LLaMA-7B directory (HF layout)")
    delta.add_argument("--delta", type=Path, required=True, help="local GPT4RoI-7B-delta-V0 directory")
    delta.add_argument("--out", type=Path, required=True, help="where to write the merged checkpoint")
    return parser


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _default_detector_spec() -> str | None:
    from jobs.caption import demo_dir

    path = demo_dir() / "detector.pt"
    return f"yolo:{path}" if path.is_file() else None


def _load(args):
    import torch
    from model.checkpoint import load_model

    device = _device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    from jobs.caption import resolve_model_spec

    return load_model(resolve_model_spec(args.model), clip=args.clip, device=device, dtype=dtype)


def _describe(loaded, image, boxes_px, question: str, max_new_tokens: int) -> str:
    """One question about regions of one image; ``<regionN>`` is the N-th box."""
    from model.engine import EngineConfig, ImageJob, RegionEngine, RegionPrompt
    from model.vision import normalize_boxes

    boxes = normalize_boxes(boxes_px, *image.size)
    job = ImageJob(image, boxes, [RegionPrompt(question, tuple(range(len(boxes))))])
    return RegionEngine(loaded, EngineConfig(max_new_tokens=max_new_tokens)).run([job])[0][0].text


def cmd_caption(args) -> int:
    from detectors.postprocess import PostProcess
    from jobs.caption import CaptionConfig, ResourceError, run_caption
    from jobs.sources import SourceError, open_source
    from pipeline.compose import ComposeConfig
    from sinks.label_studio import LabelStudioError

    def names(text: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in text.split(",") if n.strip())

    push_url = args.to_label_studio
    try:
        if args.from_label_studio:
            from jobs.label_studio import pull_source

            client = _client(args.source, args.retries)
            source, pid = pull_source(client, args.from_label_studio, args.out, args.document_root, args.ls_boxes)
            push_url, args.project = args.source, str(pid)
        else:
            source = open_source(args.source)
        if push_url and not args.project:
            raise SourceError("--to-label-studio needs --project")
        cfg = CaptionConfig(
            source=args.source, out=str(args.out), model=args.model, clip=args.clip, detector=args.detector,
            device=args.device, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            compose=ComposeConfig(captions=names(args.captions), attributes=names(args.attributes),
                                  relations=args.max_pairs > 0, max_pairs=args.max_pairs),
            postprocess=PostProcess(score_threshold=args.score_threshold, max_regions=args.max_regions,
                                    duplicate_iou=args.duplicate_iou),
            use_ray=not args.no_ray, address=args.address, detect_actors=args.detect_actors,
            describe_actors=args.describe_actors, gpus_per_describe_actor=args.gpus_per_actor,
            rows_per_part=args.rows_per_part,
        )
        summary = run_caption(cfg, source, resume=args.resume, retry_failed=args.retry_failed)
    except (SourceError, FileExistsError, ResourceError, LabelStudioError) as e:
        print(f"roiscribe caption: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())) or "nothing new"
    print(f"{summary.processed} images processed ({counts}), {summary.skipped} already done; "
          f"{summary.regions} regions; {summary.images_per_s:.2f} images/s; output: {summary.out}")
    if push_url:
        args.url = push_url
        return _push(args, args.out)
    return 0


def _client(url: str, retries: int = 5):
    from sinks.label_studio import LabelStudio, api_token

    return LabelStudio(url, api_token(), retries=retries)


def _push(args, out: Path) -> int:
    from sinks.label_studio import ImageRefs, LabelStudioError, PushConfig, push
    from sinks.parquet import read_rows

    mode = args.images or ("local-files" if args.document_root else "upload")
    try:
        rows = read_rows(out).to_pylist()
        if not rows:
            raise LabelStudioError(f"{out} holds no rows to push (run `roiscribe caption` first)")
        cfg = PushConfig(args.url, args.project, ImageRefs(mode, args.document_root, args.url_prefix),
                         model_version=args.model_version, chunk_size=args.chunk_size)
        report = push(rows, cfg, client=_client(args.url, args.retries))
    except LabelStudioError as e:
        print(f"roiscribe push: {e}", file=sys.stderr)
        return 1
    print(f"pushed to {args.url}: {report.summary()}")
    for err in report.rejected[:20]:
        print(f"  rejected {err.key}: {err.reason}", file=sys.stderr)
    if len(report.rejected) > 20:
        print(f"  ... and {len(report.rejected) - 20} more rejected rows", file=sys.stderr)
    return 1 if report.rejected else 0


def cmd_push(args) -> int:
    return _push(args, args.out)


def cmd_ml_backend(args) -> int:
    import logging
    import time

    from jobs.ml_backend import BackendConfig, Predictor, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = BackendConfig(model=args.model, detector=args.detector, device=args.device,
                        label_studio_url=args.label_studio_url, document_root=args.document_root,
                        model_version=args.model_version, max_new_tokens=args.max_new_tokens)
    server = serve(Predictor(cfg), args.host, args.port)
    print(f"roiscribe ML backend on http://{args.host}:{server.server_port} (model {args.model}); "
          "connect it in Label Studio: project Settings -> Model", flush=True)
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
    loaded = _load(args)
    print(f"model: {args.model} ({loaded.config.name}); image: {path.name} {image.size[0]}x{image.size[1]}")
    if args.model not in ("demo",) and not Path(str(args.model)).exists():
        print("note: a preset name means random weights, so the answers are noise")
    from model.engine import EngineConfig, ImageJob, RegionEngine, RegionPrompt
    from model.vision import normalize_boxes

    names = list(SAMPLE_BOXES)
    boxes = [SAMPLE_BOXES[n] for n in names]
    prompts = [RegionPrompt("What can you tell me about the region indicated by <region1> in the image?", (i,))
               for i in range(len(boxes))]
    job = ImageJob(image, normalize_boxes(boxes, *image.size), prompts)
    answers = RegionEngine(loaded, EngineConfig(max_new_tokens=args.max_new_tokens)).run([job])[0]
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
    loaded = _load(args)
    print(_describe(loaded, image, args.box, args.question, args.max_new_tokens))
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


def _raw_detections(detector, uris):
    """Detections for mAP, scored as detectors are: clipped and class-aware NMS, kept down to a very
    low score, no cross-class duplicate suppression (that is the job's choice, not the detector's)."""
    from detectors.postprocess import PostProcess, postprocess
    from pipeline import ImageSource, decode_image

    keep_all = PostProcess(score_threshold=0.001, max_regions=100, duplicate_iou=None)
    out = []
    for start in range(0, len(uris), 16):
        images = [decode_image(ImageSource(u)) for u in uris[start:start + 16]]
        out += [postprocess(r, im.width, im.height, keep_all) for im, r in zip(images, detector.detect(images))]
    return out


def cmd_evaluate(args) -> int:
    import json

    from detectors import GivenBoxes, build_detector
    from model.engine import EngineConfig
    from pipeline import AnnotateConfig, annotate
    from synth.evaluate import answer_scores, detection_scores, read_ground_truth

    truths = read_ground_truth(args.data, args.limit)
    loaded = _load(args)
    from detectors.postprocess import PostProcess

    config = AnnotateConfig(engine=EngineConfig(max_new_tokens=args.max_new_tokens),
                            postprocess=PostProcess(score_threshold=args.score_threshold,
                                                    duplicate_iou=args.duplicate_iou))
    uris = [t.image for t in truths]
    scores = {"images": len(truths)}
    given = GivenBoxes({t.image: t.regions for t in truths})
    scores["ground_truth_boxes"] = answer_scores(annotate(uris, given, loaded, config), truths)
    detector_spec = args.detector or _default_detector_spec()
    if detector_spec:
        detector = build_detector(detector_spec, device=_device(args.device))
        from detectors.postprocess import postprocess

        raw = _raw_detections(detector, uris)
        scores["detector"] = detection_scores(raw, truths, args.score_threshold)
        # precision and recall of the boxes the job keeps (duplicates of one object removed)
        kept = [postprocess(r, t.width, t.height, config.postprocess) for r, t in zip(raw, truths)]
        job = detection_scores(kept, truths, args.score_threshold)
        scores["detector"] |= {"precision": job["precision"], "recall": job["recall"],
                               "precision_before_duplicates": scores["detector"]["precision"]}
        scores["detector_boxes"] = answer_scores(annotate(uris, detector, loaded, config), truths)
    print(json.dumps(scores, indent=2))
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2))
    return 0


COMMANDS = {"caption": cmd_caption, "show": cmd_show, "demo": cmd_demo, "evaluate": cmd_evaluate, "describe": cmd_describe, "train": cmd_train, "world": cmd_world,
            "apply-delta": cmd_apply_delta, "push": cmd_push, "ml-backend": cmd_ml_backend,
            "pretrain": cmd_pretrain}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"roiscribe {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
