"""The main job in process vs on Ray, and the driver's memory as the input grows.

    python -m benchmarks.pipeline --images 200                 # throughput, in process vs Ray
    python -m benchmarks.pipeline --images 200 2000 --memory   # driver peak RSS, Ray mode

Images come from the synthetic world (``synth``), so the demo detector and model see what they
were trained on. Each run is a fresh ``roiscribe caption`` process, which records its own peak RSS
in the output's manifest (the driver only: Ray's actors are other processes).
"""

from __future__ import annotations

import argparse
import json
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


def run(source: Path, out: Path, ray: bool, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobs.cli", "caption", str(source), "--out", str(out), *extra]
    if not ray:
        cmd.append("--no-ray")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"caption failed: {proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    job_s = manifest["last_run"]["seconds"]
    return {"mode": "ray" if ray else "in-process", "images": manifest["rows"], "wall_s": round(seconds, 1),
            "job_s": job_s, "images_per_s": manifest["rows"] / job_s,
            "driver_peak_rss_mib": manifest["last_run"]["driver_peak_rss_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[200])
    ap.add_argument("--memory", action="store_true", help="Ray mode only, one run per --images value")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "roiscribe-bench")
    ap.add_argument("extra", nargs="*", help="more `roiscribe caption` flags, after --")
    args = ap.parse_args()
    results = []
    for n in args.images:
        source = make_images(args.work / f"images-{n}", n)
        modes = [True] if args.memory else [False, True]
        for ray in modes:
            out = args.work / f"out-{n}-{'ray' if ray else 'local'}-{time.time_ns()}"
            r = run(source, out, ray, args.extra)
            results.append(r)
            print(f"{r['mode']:>10}: {r['images']} images in {r['job_s']:.1f} s = {r['images_per_s']:.2f} images/s; "
                  f"driver peak RSS {r['driver_peak_rss_mib']:.0f} MiB")
    if not args.memory and len(results) == 2:
        print(f"Ray / in-process throughput: {results[1]['images_per_s'] / results[0]['images_per_s']:.2f}")
    if args.memory and len(results) >= 2:
        print(f"driver peak RSS {results[-1]['images']} vs {results[0]['images']} images: "
              f"{results[-1]['driver_peak_rss_mib'] / results[0]['driver_peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
