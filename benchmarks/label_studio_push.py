"""Bulk push throughput: N tasks with predictions into a real, freshly started Label Studio.

Starts its own server (``sinks.label_studio.server``: own virtualenv, 127.0.0.1, prediction
validation on), pushes N rows (3 regions each: box, caption, colour choice; 2 relations) with
local-files image references, then pushes them again (the idempotent no-op path: one listing,
nothing sent), and prints tasks/s for both.

    python -m sinks.label_studio.server install
    python -m benchmarks.label_studio_push --tasks 10000 --chunk-size 500    # from the repository root
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow")
PREDICATES = ("left of", "right of", "above", "below")
WIDTH, HEIGHT = 200, 100  # the benchmark images' size, in pixels


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
    return {"image_id": f"img/{k:05d}.png", "uri": uri, "width": WIDTH, "height": HEIGHT, "status": "ok",
            "error": None, "num_regions": n_regions, "regions": regions, "relations": relations,
            "detector": "yolo:/x/detector.pt", "model": "/x/gpt4roi", "templates_version": "v1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--chunk-size", type=int, default=500)
    args = ap.parse_args()

    from PIL import Image

    from sinks.label_studio import ImageRefs, LabelStudio, PushConfig, push
    from sinks.label_studio.server import TOKEN, Server, install

    install()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "docs" / "imgs").mkdir(parents=True)
        images = []
        for k in range(8):
            path = root / "docs" / "imgs" / f"{k}.png"
            Image.new("RGB", (WIDTH, HEIGHT), (30 * k, 90, 160)).save(path)
            images.append(str(path))
        rows = [make_row(k, images[k % len(images)]) for k in range(args.tasks)]
        server = Server(root / "data", root / "docs")
        t = time.perf_counter()
        server.start()
        print(f"server up in {time.perf_counter() - t:.1f} s at {server.url}")
        try:
            cfg = PushConfig(server.url, "bench", ImageRefs("local-files", str(root / "docs")), model_version="bench",
                             chunk_size=args.chunk_size)
            t = time.perf_counter()
            report = push(rows, cfg, token=TOKEN, progress=True)
            first = time.perf_counter() - t
            t = time.perf_counter()
            again = push(rows, cfg, token=TOKEN, progress=False)
            second = time.perf_counter() - t
            total = LabelStudio(server.url, TOKEN).task_count(report.project_id)
        finally:
            server.stop()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; chunk {args.chunk_size}")
    print(f"first push : {report.tasks_created} tasks in {first:.1f} s = {report.tasks_created / first:.0f} tasks/s")
    print(f"second push: {again.already_present} already present, {again.tasks_created} created, in {second:.1f} s "
          f"= {args.tasks / second:.0f} tasks/s checked")
    print(f"tasks on the server: {total}")


if __name__ == "__main__":
    main()
