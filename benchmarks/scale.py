"""Jobs of any size: the driver's peak memory and the time to the first processed image, fresh
and resumed, as the manifest grows (issue 18).

    python -m benchmarks.scale --rows 100000 1000000 10000000 --work /tmp/scale

For each size N it builds (once, under ``--work``):

* a Parquet manifest of N rows (``image_id``, ``uri``): distinct ids over a few real PNG files,
  each repeated (the job decodes them; what is measured is the driver, not the images);
* a resume output: N - ``--left`` rows already written as committed parts (``commit_part``, the
  same writer the job uses; ``--done-part-rows`` rows each), ``--left`` images still to do.

Then it runs ``roiscribe caption`` on Ray (a fresh local cluster per run, the random ``tiny``
model, the given-boxes detector with no boxes, so each image is decoded and written) twice:

* fresh: into an empty output, stopped ``--window`` seconds after its first part is committed (or
  after ``--max-s`` seconds);
* resume: ``--resume`` over the prepared output, to the end (the ``--left`` images).

and reports, per run, the driver's peak RSS (sampled every 50 ms with psutil: the driver process
only, Ray's workers are other processes), the seconds from the command's start to its first
committed part (``--rows-per-part`` rows; the first *image* is done no later), and for the resume
the total wall time. A part's mtime is when it was renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROW_GROUP = 65_536  # manifest row groups: the driver reads the first one to check the manifest


def make_images(folder: Path, count: int = 4) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(count):
        path = folder / f"{k}.png"
        if not path.exists():
            Image.new("RGB", (64, 48), (60 * k, 90, 200 - 40 * k)).save(path)
        names.append(f"images/{k}.png")
    return names


def make_manifest(work: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / f"manifest-{rows}.parquet"
    if path.exists():
        return path
    names = make_images(work / "images")
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("image_id", pa.string()), ("uri", pa.string())])) as writer:
        for start in range(0, rows, 1_000_000):
            ids = [f"img-{k:09d}" for k in range(start, min(rows, start + 1_000_000))]
            uris = [names[k % len(names)] for k in range(start, start + len(ids))]
            writer.write_table(pa.table({"image_id": ids, "uri": uris}), row_group_size=ROW_GROUP)
    os.replace(tmp, path)
    return path


def make_done_output(work: Path, manifest: Path, rows: int, left: int, part_rows: int) -> Path:
    """An output whose first rows - left images are written (status ok, no regions), as the job
    writes them; copied fresh for each run (the resume adds to it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.arrow import SCHEMA
    from sinks.parquet import commit_part

    base = work / f"done-{rows}-{left}"
    if not (base / "complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        (base / "data").mkdir(parents=True)
        done, seq = rows - left, 1
        with pq.ParquetFile(manifest) as f:
            for batch in f.iter_batches(batch_size=part_rows):
                n = min(batch.num_rows, done - (seq - 1) * part_rows)
                if n <= 0:
                    break
                ids = batch.column("image_id").slice(0, n)
                table = pa.Table.from_arrays(
                    [ids if c.name == "image_id" else pa.array(["ok"] * n) if c.name == "status" else
                     pa.array([0] * n, pa.int32()) if c.name == "num_regions" else pa.nulls(n, c.type) for c in SCHEMA],
                    schema=SCHEMA)
                commit_part(base / "data", seq, table)
                seq += 1
        (base / "complete").write_text("")
    return base


def run(manifest: Path, out: Path, resume: bool, window: float, rows_per_part: int, max_s: float = 1e9) -> dict:
    import psutil

    cmd = [sys.executable, "-m", "jobs.cli", "caption", str(manifest), "--out", str(out), "--runner", "ray",
           "--model", "random:tiny", "--detector", "given", "--max-new-tokens", "1", "--max-pairs", "0",
           "--attributes", "color", "--rows-per-part", str(rows_per_part), "--batch-size", "16"]
    cmd += ["--resume"] if resume else []
    before = {p.name for p in (out / "data").glob("part-*.parquet")} if (out / "data").is_dir() else set()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    driver, peak, first = psutil.Process(proc.pid), 0, None
    while proc.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if first is None and (out / "data").is_dir():
            new = [p for p in (out / "data").glob("part-*.parquet") if p.name not in before]
            if new:
                first = min(p.stat().st_mtime for p in new) - t0
        waited = time.time() - t0
        if not resume and ((first is not None and waited > first + window) or waited > max_s):
            proc.send_signal(signal.SIGINT)  # enough: the driver has run past its first part
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    wall = time.time() - t0
    if resume and proc.returncode:
        raise SystemExit(f"the resume failed:\n{stderr[-3000:]}")
    return {"driver_peak_rss_mib": round(peak / 2**20, 1), "first_part_s": round(first, 2) if first else None,
            "wall_s": round(wall, 1), "summary": next((line for line in stdout.splitlines() if "images processed" in line), "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/roiscribe-scale"))
    parser.add_argument("--left", type=int, default=1000, help="images left to do in the resume output")
    parser.add_argument("--done-part-rows", type=int, default=50_000, help="rows per part of the resume output")
    parser.add_argument("--rows-per-part", type=int, default=100, help="the jobs' parts")
    parser.add_argument("--window", type=float, default=20.0, help="seconds a fresh job runs after its first part")
    parser.add_argument("--max-s", type=float, default=1e9,
                        help="stop a fresh job after this many seconds even before its first part")
    parser.add_argument("--skip", choices=("fresh", "resume"), default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}))
    for rows in args.rows:
        t = time.time()
        manifest = make_manifest(args.work, rows)
        result = {"rows": rows, "build_manifest_s": round(time.time() - t, 1)}
        if args.skip != "fresh":
            out = args.work / f"fresh-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            result["fresh"] = run(manifest, out, False, args.window, args.rows_per_part, args.max_s)
            shutil.rmtree(out, ignore_errors=True)
        if args.skip != "resume":
            t = time.time()
            base = make_done_output(args.work, manifest, rows, args.left, args.done_part_rows)
            result["build_done_output_s"] = round(time.time() - t, 1)
            out = args.work / f"resume-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(base, out)
            result["resume"] = run(manifest, out, True, 0, args.rows_per_part)
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
