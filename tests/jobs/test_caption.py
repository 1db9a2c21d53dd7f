"""The main job on a real local Ray cluster, against the in-process run of the same stages."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from jobs.caption import ResourceError, check_resources, choose_runner, run_caption
from jobs.config import DetectorSpec, JobConfig, ModelSpec, RunnerConfig
from jobs.sources import open_source
from model.config import EngineConfig
from pipeline.compose import ComposeConfig
from sinks.parquet import read_rows

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SMALL = dict(model=ModelSpec("random:tiny"), engine=EngineConfig(max_new_tokens=3), batch_size=2,
             compose=ComposeConfig(attributes=("color",), max_pairs=2))


def job(source, out, mode="local", **kw) -> JobConfig:
    runner = kw.pop("runner", RunnerConfig(mode=mode))
    return JobConfig(source=str(source), out=str(out), runner=runner, **{**SMALL, **kw})


def rows_by_id(out) -> dict:
    rows = read_rows(out).to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an image was written twice"
    return {r["image_id"]: r for r in rows}


def same_rows(a: dict, b: dict) -> None:
    """Equal rows, floats to 1e-4 (batches of different shapes round differently), timings aside."""
    assert sorted(a) == sorted(b)
    for key in a:
        ra, rb = dict(a[key]), dict(b[key])
        for k in ("timings", "processed_by"):
            ra.pop(k), rb.pop(k)
        assert json.dumps(ra, sort_keys=True, default=str) == json.dumps(rb, sort_keys=True, default=str) or \
            _close(ra, rb), key


def _close(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y))
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= 1e-4
    return x == y


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from jobs.ray_cluster import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


def test_ray_rows_equal_in_process_rows_and_annotate(ray_local, coco_world, tmp_path):
    """One pipeline under every runner: annotate(), the local runner, Ray with one actor pool and
    Ray with a separate detect pool (pixels travelling in the batch) give the same rows."""
    from detectors import build_detector
    from pipeline import annotate
    from pipeline.arrow import to_table

    source = open_source(str(coco_world))
    inproc = run_caption(job(coco_world, tmp_path / "a"), source, progress=False)
    on_ray = run_caption(job(coco_world, tmp_path / "b", "ray"), source, progress=False)
    two_pools = run_caption(job(coco_world, tmp_path / "c", runner=RunnerConfig(mode="ray", detect_actors=1)),
                            source, progress=False)
    assert inproc.counts == on_ray.counts == two_pools.counts == {"ok": 6, "error": 1}
    assert (inproc.runner, on_ray.runner, two_pools.runner) == ("local", "ray", "ray")
    a, b, c = rows_by_id(tmp_path / "a"), rows_by_id(tmp_path / "b"), rows_by_id(tmp_path / "c")
    same_rows(a, b)
    same_rows(a, c)
    assert {r["processed_by"] for r in b.values()} != {"in-process"}
    cfg = job(coco_world, "")
    results = annotate([it.uri for it in source.items], build_detector(source.given_spec), cfg.model.load(), cfg)
    direct = {row["image_id"]: row for row in to_table(results).to_pylist()}
    ids = {it.uri: it.image_id for it in source.items}  # annotate() names images by their uri
    direct = {ids[k]: {**v, "image_id": ids[k], "detector": a[ids[k]]["detector"], "model": a[ids[k]]["model"],
                       "templates_version": a[ids[k]]["templates_version"]} for k, v in direct.items()}
    same_rows(a, direct)
    assert a["99"]["status"] == "error" and a["99"]["error"].startswith("decode: ")
    assert all(a[str(k)]["num_regions"] > 0 for k in range(6))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["schema"] == "roiscribe/2" and manifest["counts"] == {"ok": 6, "error": 1}
    config = manifest["config"]
    assert config["model"] == {"spec": "random:tiny", "clip": None, "device": "cpu", "dtype": "float32"}
    assert config["engine"]["max_new_tokens"] == 3 and config["engine"]["max_prompts"] == 256
    assert config["detector"]["spec"] == f"given:coco:{coco_world}" and config["runner"]["mode"] == "ray"
    assert manifest["last_run"]["runner"] == "ray" and "ray" in manifest["versions"]


def test_a_killed_describe_actor_does_not_lose_or_double_images(ray_local, coco_world, tmp_path):
    import psutil

    killed = []

    def describe_actor_pids():
        pids = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "DescribeActor" in " ".join(p.info["cmdline"] or []):
                pids.append(p.info["pid"])
        return pids

    finished = threading.Event()

    def kill_describe_actor():
        while not finished.is_set():
            pids = describe_actor_pids()
            if pids:
                time.sleep(3.0)  # let it load its model and start on a batch
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:  # gone meanwhile: look again
                    continue
                killed.append(pids[0])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_describe_actor)
    killer.start()
    try:
        summary = run_caption(job(coco_world, tmp_path / "out", "ray", batch_size=1), open_source(str(coco_world)),
                              progress=False)
    finally:
        finished.set()
        killer.join()
    assert killed, "the test never found the describe actor to kill"
    assert summary.counts == {"ok": 6, "error": 1}
    assert len(rows_by_id(tmp_path / "out")) == 7


def test_resources_that_cannot_fit_are_refused():
    with pytest.raises(ResourceError, match="need 4.5 CPUs"):
        check_resources(RunnerConfig(describe_actors=4, detect_actors=1), {"CPU": 2.0})
    with pytest.raises(ResourceError, match="2 describe actors x 1 GPUs"):
        check_resources(RunnerConfig(describe_actors=2, gpus_per_describe_actor=1.0), {"CPU": 8.0, "GPU": 1.0})
    assert check_resources(RunnerConfig(describe_actors=2), {"CPU": 2.0}) == (2, 0.0)


def test_a_ray_job_whose_pools_cannot_fit_is_refused_before_it_starts(ray_local, coco_world, tmp_path):
    """The job itself checks the cluster (2 CPUs, no GPU here) before any actor is asked for:
    otherwise it would wait forever for actors that can never be placed."""
    import time

    source = open_source(str(coco_world))
    for runner, message in ((RunnerConfig(mode="ray", describe_actors=3), "need 3 CPUs"),
                            (RunnerConfig(mode="ray", gpus_per_describe_actor=1.0), "x 1 GPUs do not fit the cluster's 0 GPUs")):
        out = tmp_path / message.split()[-1]
        t = time.monotonic()
        with pytest.raises(ResourceError, match=message):
            run_caption(job(coco_world, out, runner=runner), source, progress=False)
        assert time.monotonic() - t < runner.actor_start_timeout_s  # refused, not timed out waiting
        assert not list(out.glob("*.parquet"))


def test_describe_actors_auto_fill_the_cluster():
    auto = RunnerConfig()
    assert auto.actors({"CPU": 2.0}, batches=100) == (2, 0.0)
    assert auto.actors({"CPU": 16.0}, batches=3) == (3, 0.0)  # never more actors than batches
    assert auto.actors({"CPU": 16.0, "GPU": 4.0}, batches=100) == (4, 1.0)  # one per GPU
    assert RunnerConfig(detect_actors=1, detect_cpus=1.0).actors({"CPU": 4.0}, 100) == (3, 0.0)
    assert RunnerConfig(describe_actors=5).actors({"CPU": 1.0}, 1) == (5, 0.0)  # as asked (then refused)


def test_runner_auto_runs_small_jobs_in_process(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    auto = RunnerConfig(local_max_images=100)
    assert choose_runner(auto, 100)[0] == "local" and "in process" in choose_runner(auto, 100)[1]
    assert choose_runner(auto, 101)[0] == "ray"
    assert choose_runner(RunnerConfig(mode="auto", address="ray://head:10001"), 1)[0] == "ray"
    assert choose_runner(RunnerConfig(mode="ray"), 1)[0] == "ray"
    assert choose_runner(RunnerConfig(mode="local"), 10**9)[0] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # inside `ray job submit`
    assert choose_runner(auto, 1)[0] == "ray"


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_killed_driver_then_resume_writes_every_image_once(coco_world, tmp_path):
    out = tmp_path / "out"
    args = ["caption", str(coco_world), "--out", str(out), "--model", "random:tiny", "--max-new-tokens", "3",
            "--attributes", "color", "--max-pairs", "0", "--batch-size", "1", "--rows-per-part", "1", "--no-ray"]
    proc = _cli(*args)
    data = out / "data"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(data.glob("part-*.parquet")) if data.exists() else []) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = rows_by_id(out)
    assert 2 <= len(partial) < 7, "the driver should die mid-job"
    done = _cli(*args, "--resume")
    stdout, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr
    rows = rows_by_id(out)
    assert sorted(rows) == sorted(["0", "1", "2", "3", "4", "5", "99"])
    assert f"{7 - len(partial)} images processed" in stdout and f"{len(partial)} already done" in stdout


def test_mixed_folder_one_row_per_file_exit_zero_and_bad_arguments(tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(folder / "good.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("hello")
    (folder / "sub").mkdir()
    Image.new("L", (20, 20)).save(folder / "sub" / "gray.png")
    out = tmp_path / "out"
    r = _cli("caption", str(folder), "--out", str(out), "--model", "random:tiny", "--detector", "given", "--no-ray",
             "--max-new-tokens", "2")
    stdout, stderr = r.communicate(timeout=300)
    assert r.returncode == 0, stderr
    rows = rows_by_id(out)
    root = os.path.realpath(folder)
    assert {k: v["status"] for k, v in rows.items()} == {
        f"{root}/good.png": "ok", f"{root}/empty.jpg": "error", f"{root}/notes.txt": "error", f"{root}/sub/gray.png": "ok"}
    assert "2 error, 2 ok" in stdout
    again = _cli("caption", str(folder), "--out", str(out), "--model", "random:tiny", "--detector", "given", "--no-ray")
    assert again.wait(timeout=300) == 2 and "--resume" in again.stderr.read()
    missing = _cli("caption", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"), "--no-ray")
    assert missing.wait(timeout=300) == 2 and "does not exist" in missing.stderr.read()


def test_retry_failed_replaces_error_rows(coco_world, tmp_path):
    import shutil

    root = tmp_path / "world"
    shutil.copytree(coco_world.parent, root)
    source = str(root / "coco.json")
    cfg = job(source, tmp_path / "out")
    run_caption(cfg, open_source(source), progress=False)
    assert rows_by_id(tmp_path / "out")["99"]["status"] == "error"
    shutil.copy(root / "imgs" / "0.png", root / "imgs" / "broken.png")  # the file is fixed
    again = run_caption(cfg, open_source(source), retry_failed=True, progress=False)
    assert (again.processed, again.skipped, again.counts) == (1, 6, {"ok": 1})
    rows = rows_by_id(tmp_path / "out")
    assert len(rows) == 7 and rows["99"]["status"] == "ok"


def _manifest(coco_world, path):
    """A CSV manifest of the COCO world's images (ids as the COCO file gives them)."""
    images = json.loads(coco_world.read_text())["images"]
    path.write_text("image_id,uri\n" + "".join(f"{im['id']},{coco_world.parent / im['file_name']}\n" for im in images))
    return path


def test_a_manifest_on_ray_written_by_the_workers_resumed_and_planned(ray_local, coco_world, tmp_path):
    """A manifest read by Ray Data in the workers and parts committed by the workers give the rows
    the in-process runner gives; each part carries its commit record and the manifest's counts are
    their sum. An output missing a part is planned (--dry-run: nothing written) and resumed on Ray:
    only the missing images are done, and each image ends up once."""
    from sinks.parquet import part_files, read_commit

    manifest = _manifest(coco_world, tmp_path / "m.csv")
    source = open_source(str(manifest), root=coco_world.parent)
    local = run_caption(job(manifest, tmp_path / "a", detector=DetectorSpec("given"), rows_per_part=2), source,
                        progress=False)
    cfg = job(manifest, tmp_path / "b", "ray", detector=DetectorSpec("given"), rows_per_part=2)
    on_ray = run_caption(cfg, source, progress=False)
    assert local.counts == on_ray.counts == {"ok": 6, "error": 1} and on_ray.processed == 7
    same_rows(rows_by_id(tmp_path / "a"), rows_by_id(tmp_path / "b"))
    records = [read_commit(p) for p in part_files(tmp_path / "b")]
    assert sum(r["rows"] for r in records) == 7 and all(r["written_by"] for r in records)
    manifest_json = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest_json["rows"] == 7 and manifest_json["counts"] == {"ok": 6, "error": 1}

    lost = part_files(tmp_path / "b")[0]
    lost_rows = read_commit(lost)["rows"]
    lost.unlink()  # as if the job had stopped before this part
    before = sorted(p.name for p in (tmp_path / "b" / "data").iterdir())
    for runner in ("local", "ray"):
        plan = run_caption(replace(cfg, runner=RunnerConfig(mode=runner)), source, resume=True, dry_run=True,
                           progress=False)
        assert (plan.dry_run, plan.total, plan.skipped, plan.processed) == (True, 7, 7 - lost_rows, lost_rows)
    assert sorted(p.name for p in (tmp_path / "b" / "data").iterdir()) == before
    resumed = run_caption(cfg, source, resume=True, progress=False)
    assert (resumed.processed, resumed.skipped) == (lost_rows, 7 - lost_rows)
    same_rows(rows_by_id(tmp_path / "a"), rows_by_id(tmp_path / "b"))


def test_images_that_kill_their_worker_become_error_rows(ray_local, tmp_path, monkeypatch):
    """The driver's side of a worker-killing input on Ray. No input can crash a worker on demand
    here, so one Ray Data execution (``RayRunner._pass``) is stood in for by one that plans with the
    real ``plan_block`` against the real index and commits with the real ``commit_part``, but drops
    every batch holding the poison image, as Ray Data does once a batch has killed its actor
    ``max_task_retries + 1`` times (``max_errored_blocks = -1``). The rest is the real code: the lost
    images are found by planning again against the output, retried one at a time, and the one that
    still kills its worker becomes an error row that says why."""
    import ray
    from PIL import Image

    import jobs.caption as caption
    from pipeline.arrow import to_table
    from pipeline.records import ImageResult
    from sinks.parquet import commit_part, next_part_number

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(5):
        Image.new("RGB", (8, 8)).save(folder / f"{k}.png")
    poison = os.path.realpath(folder / "3.png")
    passes = []

    def one_pass(self, source, out, index, retry_failed, progress, cfg, dead, totals):
        passes.append((cfg.batch_size, dead is not None))
        index, tally, written = ray.get(index), caption.Tally(), 0
        (out / "data").mkdir(parents=True, exist_ok=True)
        seq = next_part_number(out / "data")
        for raw in source.reader.blocks():
            todo, counts = caption.plan_block(raw, source.reader, index, retry_failed)
            tally.add(counts)
            for start in range(0, todo.num_rows, cfg.batch_size):
                batch = todo.slice(start, cfg.batch_size)
                if dead:
                    rows = caption.lost_rows(batch, cfg, dead)
                elif poison in batch.column("image_id").to_pylist():
                    continue  # the batch's actor died every time: Ray Data drops the block
                else:
                    rows = to_table([ImageResult(r["image_id"], r["uri"], "ok") for r in batch.to_pylist()])
                record = commit_part(out / "data", seq, rows)
                progress.committed(record)
                written += record["rows"]
        return tally, written

    monkeypatch.setattr(caption.RayRunner, "_pass", one_pass)
    cfg = job(folder, tmp_path / "out", batch_size=2, runner=RunnerConfig(mode="ray", max_task_retries=2))
    summary = run_caption(cfg, open_source(str(folder)), progress=False)
    assert passes == [(2, False), (1, False), (1, True)]  # all; the lost batch (2.png, 3.png) alone; 3.png as error
    rows = rows_by_id(tmp_path / "out")  # each exactly once
    assert len(rows) == 5 and summary.counts == {"ok": 4, "error": 1} and summary.processed == 5
    assert rows[poison]["status"] == "error" and "died 3 times" in rows[poison]["error"]
