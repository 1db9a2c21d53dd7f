"""Bulk push: throughput and the driver's peak memory, N tasks with predictions into a real, freshly
started Label Studio.

Starts its own server (``sinks.label_studio.server``: own virtualenv, 127.0.0.1, prediction
validation on). For each N given, writes a caption output folder of N rows (3 regions each: box,
caption, colour choice; 2 relations; local-files images; a manifest with fingerprints), then runs
``roiscribe push``'s code on it twice, each in a fresh process: the first push creates the tasks,
the second is the idempotent no-op (one paged listing, nothing sent). Each process reports its
wall time and its peak resident memory (``ru_maxrss``) and how much of it the push added over the
process after its imports (``RSS before``). ``--mode list`` pushes the rows as one in-memory list
instead (what push did before it streamed), for comparison.

    python -m sinks.label_studio.server install
    python -m benchmarks.label_studio_push --tasks 10000 100000 --chunk-size 500    # from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow")
PREDICATES = ("left of", "right of", "above", "below")
WIDTH, HEIGHT = 200, 100  # the benchmark images' size, in pixels
MANIFEST = {"schema": "roiscribe/1",
            "fingerprints": {"model": "f7585f5f0a1b", "detector": "b7e747e5c2d3", "config": "f9d86028e4f5"},
            "versions": {"roiscribe": "bench"}, "config": {"model": {"spec": "demo"}, "detector": {"spec": "demo"}}}


def make_row(k: int, uri: str, n_regions: int = 3) -> dict:
    """Row ``k`` of the workload (``sinks.parquet`` schema): boxes, captions, a colour, an unparsed
    material, relations (the rows the Label Studio tests push)."""
    regions = []
    for i in range(n_regions):
        x1, y1, color = 10.0 + 50 * i + (k % 7), 5.0 + (k % 11), COLORS[(k + i) % 4]
        caption = f"a {color} thing number {k}-{i}"
        regions.append({"region_id": i, "box": [x1, y1, x1 + 30.5, y1 + 40.25], "label": ["circle", "star"][i % 2],
                        "class_id": i % 2, "score": 0.5 + 0.1 * i, "caption": caption,
                        "answers": [{"name": "caption", "value": caption, "raw": "", "status": "ok"},
                                    {"name": "color", "value": color, "raw": color, "status": "ok"},
                                    {"name": "material", "value": None, "raw": "???", "status": "unknown"}]})
    relations = [{"subject": i, "predicate": PREDICATES[(k + i) % 4], "object": i + 1, "raw": "", "status": "ok"}
                 for i in range(n_regions - 1)]
    return {"image_id": f"img/{k:06d}.png", "uri": uri, "width": WIDTH, "height": HEIGHT, "status": "ok",
            "error": None, "num_regions": n_regions, "regions": regions, "relations": relations,
            "detector": "yolo:/x/detector.pt", "model": "/x/gpt4roi", "templates_version": "v1"}


def write_output(out: Path, n: int, images: list[str], rows_per_part: int = 1000) -> None:
    """An output folder of ``n`` rows, written part by part (never all rows at once)."""
    from sinks.parquet import ParquetSink

    with ParquetSink(out, rows_per_part) as sink:
        for start in range(0, n, rows_per_part):
            sink.write([make_row(k, images[k % len(images)]) for k in range(start, min(n, start + rows_per_part))])
    (out / "manifest.json").write_text(json.dumps(MANIFEST))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    """One push in this process; prints a JSON line with its time and memory."""
    import label_studio_sdk  # noqa: F401 -- imported before the baseline: the push's own memory is what is measured
    import pyarrow.parquet  # noqa: F401

    from sinks.label_studio import ImageRefs, PushConfig, push
    from sinks.label_studio.server import TOKEN

    before = _rss_mib()
    rows = args.out
    if args.mode == "list":
        from sinks.parquet import read_rows

        rows = read_rows(args.out).to_pylist()
    cfg = PushConfig(args.url, args.project, ImageRefs("local-files", args.document_root), chunk_size=args.chunk_size)
    t = time.perf_counter()
    report = push(rows, cfg, token=TOKEN, progress=False)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"created": report.tasks_created, "present": report.already_present, "seconds": seconds,
                      "rss_before_mib": before, "peak_mib": peak, "version": report.model_version}))


def run_child(out: Path, url: str, project: str, root: Path, chunk: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.label_studio_push", "--child", str(out), "--url", url, "--project",
           project, "--document-root", str(root), "--chunk-size", str(chunk), "--mode", mode]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[10000, 100000], help="row counts, each its own project")
    ap.add_argument("--chunk-size", type=int, default=500)
    ap.add_argument("--mode", choices=("stream", "list"), default="stream",
                    help="stream: push the output folder (what `roiscribe push` does); list: the rows as one list")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--project", help=argparse.SUPPRESS)
    ap.add_argument("--document-root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        args.out = args.child
        return child(args)

    from PIL import Image

    from sinks.label_studio import LabelStudio
    from sinks.label_studio.server import TOKEN, Server, install

    install()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "docs" / "imgs").mkdir(parents=True)
        images = []
        for k in range(8):
            path = root / "docs" / "imgs" / f"{k}.png"
            Image.new("RGB", (WIDTH, HEIGHT), (30 * k, 90, 160)).save(path)
            images.append(str(path))
        server = Server(root / "data", root / "docs")
        t = time.perf_counter()
        server.start()
        print(f"server up in {time.perf_counter() - t:.1f} s at {server.url}", flush=True)
        try:
            for n in args.tasks:
                out = root / f"out-{n}"
                t = time.perf_counter()
                write_output(out, n, images)
                print(f"{n} rows written in {time.perf_counter() - t:.1f} s", flush=True)
                project = f"bench-{n}-{args.mode}"
                first = run_child(out, server.url, project, root / "docs", args.chunk_size, args.mode)
                print(f"{n}: first push {first}", flush=True)
                second = run_child(out, server.url, project, root / "docs", args.chunk_size, args.mode)
                print(f"{n}: second push {second}", flush=True)
                client = LabelStudio(server.url, TOKEN)
                total = client.task_count(client.project(project)["id"])
                results.append((n, first, second, total))
        finally:
            server.stop()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; chunk {args.chunk_size}; "
          f"mode {args.mode}; model version {results[0][1]['version']!r}")
    print("| rows | push | created / present | time | tasks/s | driver peak RSS | added by the push |")
    print("|---|---|---|---|---|---|---|")
    for n, first, second, total in results:
        for name, r in (("first", first), ("second", second)):
            print(f"| {n:,} | {name} | {r['created']:,} / {r['present']:,} | {r['seconds']:.1f} s | "
                  f"{n / r['seconds']:,.0f} | {r['peak_mib']:.0f} MiB | {r['peak_mib'] - r['rss_before_mib']:.0f} MiB |")
        assert total == n, f"{total} tasks on the server for {n} rows"


if __name__ == "__main__":
    main()
