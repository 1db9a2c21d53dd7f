"""The main job in process vs on Ray vs auto, and the driver's memory as the input grows.

    python -m benchmarks.pipeline --images 200                 # local, ray, auto: 3 interleaved runs each
    python -m benchmarks.pipeline --images 200 2000 --memory   # driver peak RSS, Ray

Images come from the synthetic world (``synth``), so the demo detector and model see what they
were trained on. Each run is a fresh ``roiscribe caption`` process, which records its own peak RSS
in the output's manifest (the driver only: Ray's actors are other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, count: int) -> Path:
    from PIL import Image

    from synth.world import generate_scene

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        path = folder / f"{k:06d}.png"
        if not path.exists():
            Image.fromarray(generate_scene(900_000 + k).image).save(path)
    return folder


def run(source: Path, out: Path, runner: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobs.cli", "caption", str(source), "--out", str(out), "--runner", runner, *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"caption failed: {proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    last = manifest["last_run"]
    return {"runner": runner, "ran": last["runner"], "images": manifest["rows"], "wall_s": seconds,
            "job_s": last["seconds"], "driver_peak_rss_mib": last["driver_peak_rss_mib"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[200])
    ap.add_argument("--runners", nargs="+", default=["local", "ray", "auto"], choices=("local", "ray", "auto"))
    ap.add_argument("--repeats", type=int, default=3, help="runs per runner, interleaved (A B C A B C ...)")
    ap.add_argument("--memory", action="store_true", help="Ray only, one run per --images value: driver peak RSS")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "roiscribe-bench")
    ap.add_argument("extra", nargs="*", help="more `roiscribe caption` flags, after --")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"command: {' '.join(sys.argv)}")
    if args.memory:
        results = []
        for n in args.images:
            source = make_images(args.work / f"images-{n}", n)
            r = run(source, args.work / f"out-{n}-mem-{time.time_ns()}", "ray", args.extra)
            results.append(r)
            print(f"ray: {n} images, job {r['job_s']:.1f} s, driver peak RSS {r['driver_peak_rss_mib']:.0f} MiB")
        if len(results) >= 2:
            print(f"driver peak RSS {results[-1]['images']} vs {results[0]['images']} images: "
                  f"{results[-1]['driver_peak_rss_mib'] / results[0]['driver_peak_rss_mib']:.2f}x")
        return
    for n in args.images:
        source = make_images(args.work / f"images-{n}", n)
        run(source, args.work / f"out-{n}-warmup-{time.time_ns()}", "local", args.extra)  # page cache, .pyc
        runs: dict[str, list[dict]] = {r: [] for r in args.runners}
        for _ in range(args.repeats):
            for runner in args.runners:
                runs[runner].append(run(source, args.work / f"out-{n}-{runner}-{time.time_ns()}", runner, args.extra))
        print(f"\n{n} images, {args.repeats} runs each (wall time of the whole `roiscribe caption` command):")
        for runner, rs in runs.items():
            walls = [r["wall_s"] for r in rs]
            print(f"  {runner:>5} (ran {rs[0]['ran']}): wall {spread(walls)}, "
                  f"{n / statistics.median(walls):.2f} images/s; job {spread([r['job_s'] for r in rs])}; "
                  f"driver peak RSS {statistics.median([r['driver_peak_rss_mib'] for r in rs]):.0f} MiB")
        if "local" in runs:
            base = statistics.median([r["wall_s"] for r in runs["local"]])
            for runner in (r for r in runs if r != "local"):
                print(f"  {runner} / local wall time: {statistics.median([r['wall_s'] for r in runs[runner]]) / base:.2f}x")


if __name__ == "__main__":
    main()
