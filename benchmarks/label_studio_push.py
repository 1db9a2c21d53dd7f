"""Bulk push throughput: N tasks with predictions into a real, freshly started Label Studio.

Starts its own server (tests/ls_server.py: own virtualenv, 127.0.0.1, prediction validation on),
pushes N rows (3 regions each: box, caption, colour choice; 2 relations) with local-files image
references, then pushes them again (the idempotent no-op path: one listing, nothing sent), and
prints tasks/s for both.

    python -m tests.ls_server install
    python benchmarks/label_studio_push.py --tasks 10000 --chunk-size 500
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# the repository root first: benchmarks/pipeline.py must not shadow the pipeline package
sys.path[:1] = [str(Path(__file__).resolve().parents[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--chunk-size", type=int, default=500)
    args = ap.parse_args()

    from PIL import Image

    from sinks.label_studio import ImageRefs, LabelStudio, PushConfig, push
    from tests.ls_server import TOKEN, Server, install
    from tests.sinks.test_label_studio import make_row

    install()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "docs" / "imgs").mkdir(parents=True)
        images = []
        for k in range(8):
            path = root / "docs" / "imgs" / f"{k}.png"
            Image.new("RGB", (200, 100), (30 * k, 90, 160)).save(path)
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
            total = LabelStudio(server.url, TOKEN).get("/api/tasks", "count", project=report.project_id,
                                                      page_size=1, include="id")["total"]
        finally:
            server.stop()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; chunk {args.chunk_size}")
    print(f"first push : {report.tasks_created} tasks in {first:.1f} s = {report.tasks_created / first:.0f} tasks/s")
    print(f"second push: {again.already_present} already present, {again.tasks_created} created, in {second:.1f} s "
          f"= {args.tasks / second:.0f} tasks/s checked")
    print(f"tasks on the server: {total}")


if __name__ == "__main__":
    main()
