"""The caption job against hostile input and careless use: nothing lost, nothing doubled.

Each test reproduces a way the job used to lose or double rows (or hang, or die) and checks the
guarantee README states. The in-process runner is used: the rules live in the shared stages and
in the output folder, the same under Ray (tests/jobs/test_caption.py shows the runners agree)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jobs.caption import ResumeMismatchError, run_caption
from jobs.config import DetectorSpec, JobConfig, ModelSpec, RunnerConfig
from jobs.sources import open_source
from model.config import EngineConfig
from pipeline.compose import ComposeConfig
from sinks.parquet import OutputLock, OutputLockedError, part_files, read_rows


def job(source, out, **kw) -> JobConfig:
    base = dict(model=ModelSpec("random:tiny"), detector=DetectorSpec("given"), engine=EngineConfig(max_new_tokens=2),
                compose=ComposeConfig(attributes=("color",), max_pairs=0), runner=RunnerConfig(mode="local"),
                rows_per_part=2)
    return JobConfig(source=str(source), out=str(out), **{**base, **kw})


def rows(out) -> dict:
    table = read_rows(out).to_pylist()
    ids = [r["image_id"] for r in table]
    assert len(ids) == len(set(ids)), "an image was written twice"
    return {r["image_id"]: r for r in table}


def png(color=(200, 30, 30), size=(40, 30)) -> bytes:
    f = io.BytesIO()
    Image.new("RGB", size, color).save(f, "PNG")
    return f.getvalue()


def hostile_folder(root: Path) -> Path:
    folder = root / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(png())
    (folder / "sub" / "good2.png").write_bytes(png((0, 0, 200)))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes(png()[:60])
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    data = bytearray(tiff.getvalue())
    data[8:40] = bytes(range(32))  # a mangled first IFD
    (folder / "mangled.tif").write_bytes(bytes(data))
    os.mkfifo(folder / "pipe.png")
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(png((10, 200, 10)))  # not UTF-8
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    return folder


def test_a_hostile_folder_gives_one_row_per_entry_and_resume_adds_nothing(tmp_path):
    folder = hostile_folder(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.cli", "caption", str(folder), "--out", str(out), "--model", "random:tiny",
           "--detector", "given", "--max-new-tokens", "2", "--runner", "local", "--rows-per-part", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = rows(out)
    entries = [p for p in folder.rglob("*") if not p.is_dir()]
    assert len(got) == len(entries) == 9
    status = {Path(k).name: v["status"] for k, v in got.items()}
    ok = {k for k, v in got.items() if v["status"] == "ok"}
    assert len(ok) == 3 and any(k.startswith("file://") for k in ok), status  # the non-UTF-8 name decoded
    reasons = {Path(k).name: v["error"] for k, v in got.items() if v["status"] == "error"}
    assert "not a regular file" in reasons["pipe.png"] and "file not found" in reasons["dangling.png"]
    assert reasons["empty.jpg"] == "decode: empty file (0 bytes)"
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "0 images processed" in again.stdout and "9 already done" in again.stdout
    assert len(rows(out)) == 9


def test_a_second_job_on_the_same_output_is_refused_naming_the_holder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png())
    out = tmp_path / "out"
    with OutputLock(out):
        with pytest.raises(OutputLockedError, match=f"'pid': {os.getpid()}|\"pid\": {os.getpid()}"):
            run_caption(job(tmp_path / "in", out), open_source(str(tmp_path / "in")), progress=False)
        r = subprocess.run([sys.executable, "-m", "jobs.cli", "caption", str(tmp_path / "in"), "--out", str(out),
                            "--model", "random:tiny", "--detector", "given", "--runner", "local"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "being written by another job" in r.stderr and str(os.getpid()) in r.stderr
    assert not part_files(out)
    run_caption(job(tmp_path / "in", out), open_source(str(tmp_path / "in")), progress=False)  # free again
    assert len(rows(out)) == 1


def test_an_empty_part_is_set_aside_and_its_images_redone(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(4):
        (folder / f"{k}.png").write_bytes(png((k * 50, 0, 0)))
    out = tmp_path / "out"
    run_caption(job(folder, out), open_source(str(folder)), progress=False)
    first = part_files(out)[0]
    lost = set(read_rows(out).to_pylist()[0:2][i]["image_id"] for i in range(2))
    first.write_bytes(b"")  # a power loss after the rename, before the data reached the disk
    summary = run_caption(job(folder, out), open_source(str(folder)), resume=True, progress=False)
    assert summary.set_aside == [str(out / "corrupt" / first.name)] and summary.processed == 2
    assert set(rows(out)) == {os.path.realpath(folder / f"{k}.png") for k in range(4)}
    assert lost <= set(rows(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["last_run"]["parts_set_aside"] == summary.set_aside and manifest["rows"] == 4


def test_duplicate_rows_are_counted_and_removed(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        (folder / f"{k}.png").write_bytes(png())
    out = tmp_path / "out"
    run_caption(job(folder, out), open_source(str(folder)), progress=False)
    parts = part_files(out)
    copy = parts[0].with_name("part-000099-dupe0000.parquet")
    copy.write_bytes(parts[0].read_bytes())  # two rows written twice (e.g. a crash mid-retry)
    summary = run_caption(job(folder, out), open_source(str(folder)), resume=True, progress=False)
    assert summary.duplicates_removed == 2 and summary.processed == 0
    assert len(rows(out)) == 3
    assert json.loads((out / "manifest.json").read_text())["last_run"]["duplicates_removed"] == 2


def test_resume_refuses_another_source_model_or_config(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png())
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.png").write_bytes(png())
    out = tmp_path / "out"
    run_caption(job(folder, out), open_source(str(folder)), progress=False)
    with pytest.raises(ResumeMismatchError, match="written from the source"):
        run_caption(job(other, out), open_source(str(other)), resume=True, progress=False)
    with pytest.raises(ResumeMismatchError, match="another model 'random:demo'"):
        run_caption(job(folder, out, model=ModelSpec("random:demo")), open_source(str(folder)), resume=True,
                    progress=False)
    with pytest.raises(ResumeMismatchError, match="answering config"):
        run_caption(job(folder, out, engine=EngineConfig(max_new_tokens=3)), open_source(str(folder)), resume=True,
                    progress=False)
    # the same source spelled another way, from another working directory, is the same source
    monkeypatch.chdir(tmp_path)
    same = run_caption(job("in", out), open_source("in"), resume=True, progress=False)
    assert same.processed == 0 and same.skipped == 1
    forced = run_caption(job(other, out), open_source(str(other)), resume=True, force_resume=True, progress=False)
    assert forced.processed == 1 and len(rows(out)) == 2


def test_given_boxes_people_drew_are_kept_as_drawn(tmp_path):
    from dataclasses import replace

    from jobs.caption import job_for_source
    from jobs.sources import Source, SourceItem

    drawn = Source([SourceItem("a", "a.png")], "label-studio", given="given:labelstudio:x.json", drawn=True)
    cfg = job_for_source(job("x", "y"), drawn)
    post = cfg.postprocess
    assert (post.nms_iou, post.duplicate_iou, post.max_regions, post.score_threshold) == (None, None, None, 0.0)
    assert cfg.detector.spec == "given:labelstudio:x.json"
    detected = job_for_source(job("x", "y"), replace(drawn, drawn=False))
    assert detected.postprocess.nms_iou == 0.7


def test_a_malformed_given_box_is_that_image_error_row(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(4):
        (folder / f"{k}.png").write_bytes(png((40 * k, 90, 90), (64, 48)))
    anns = [{"id": 1, "image_id": 0, "category_id": 1, "bbox": ["a", 1, 2, 3]},   # a string coordinate
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},         # three numbers
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 4, 20, 20]},    # fine
            {"id": 4, "image_id": 3, "category_id": "x", "bbox": [4, 4, 20, 20]}]  # a bad class id
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": k, "file_name": f"imgs/{k}.png"} for k in range(4)],
                                "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    summary = run_caption(job(coco, tmp_path / "out", batch_size=4), open_source(str(coco)), progress=False)
    assert summary.counts == {"ok": 1, "error": 3}
    got = rows(tmp_path / "out")
    assert got["2"]["status"] == "ok" and got["2"]["num_regions"] == 1
    assert "annotation 1 has bbox ['a', 1, 2, 3]" in got["0"]["error"] and got["0"]["error"].startswith("detect: ")
    assert "annotation 2 has bbox [1, 2, 3]" in got["1"]["error"] and "category_id 'x'" in got["3"]["error"]
