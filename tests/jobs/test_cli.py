import shutil
import subprocess
import sys

import numpy as np
from PIL import Image



def run(*args):
    exe = shutil.which("roiscribe")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("roiscribe ")
    r = run("--help")
    assert r.returncode == 0
    for command in ("demo", "describe", "apply-delta"):
        assert command in r.stdout


def test_demo_describes_the_three_sample_regions():
    """The shipped model names each drawn shape: every region is asked about its own box."""
    r = run("demo")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("region")]
    assert [l.split()[0] for l in lines] == ["region1", "region2", "region3"]
    answers = [l.rsplit(": ", 1)[1] for l in lines]
    for answer, color, shape in zip(answers, ("red", "blue", "green"), ("circle", "square", "triangle")):
        assert color in answer and shape in answer, lines


CAPTION = "What can you tell me about the region indicated by <region1> in the image?"


def test_describe_answers_and_refuses_bad_input(tmp_path):
    from PIL import ImageDraw

    from model.checkpoint import load_model
    from model.engine import ImageJob, RegionEngine, RegionPrompt

    # a wide picture (360 x 120): with width and height mixed up, the red square's box would
    # cover a strip across the top instead
    wide = Image.new("RGB", (360, 120), (128, 128, 128))
    draw = ImageDraw.Draw(wide)
    draw.rectangle((20, 20, 100, 100), fill=(220, 40, 40))
    draw.ellipse((140, 20, 220, 100), fill=(40, 170, 60))
    wide.save(tmp_path / "wide.png")
    r = run("describe", str(tmp_path / "wide.png"), "--box", "20,20,100,100", CAPTION)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    answer = r.stdout.strip()
    assert "red" in answer and "square" in answer, answer
    box = [[20 / 360, 20 / 120, 100 / 360, 100 / 120]]  # normalised by hand
    direct = RegionEngine(load_model("demo")).run([ImageJob(wide, box, [RegionPrompt(CAPTION, (0,))])])[0][0]
    assert answer == direct.text

    image = tmp_path / "img.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    r = run("describe", str(image), "--box", "5,5,90,30", "What is <region1>?")
    assert r.returncode == 2 and "outside the 60x40 image" in r.stderr
    r = run("describe", str(image), "--box", "5,5,4,30", "What is <region1>?")
    assert r.returncode == 2 and "x2 > x1" in r.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    r = run("describe", str(text), "--box", "1,1,2,2", "What is <region1>?")
    assert r.returncode == 2 and "cannot read image" in r.stderr
    r = run("describe", str(image), "--box", "5,5,30,30", "--model", "nonesuch", "What is <region1>?")
    assert r.returncode == 2 and "valid presets" in r.stderr and "Traceback" not in r.stderr
    r = run("describe", str(image), "--box", "5,5,30,30", "--model", "tiny", "What is <region1>?")
    assert r.returncode == 2 and "write random:tiny" in r.stderr


def test_describe_gives_each_region_its_own_box(tmp_path):
    """``<regionN>`` is the N-th ``--box``: with the red square left of the green circle the shipped
    model says so, and the boxes given the other way round turn the answer around."""
    from PIL import ImageDraw

    wide = Image.new("RGB", (360, 120), (128, 128, 128))
    draw = ImageDraw.Draw(wide)
    draw.rectangle((20, 20, 100, 100), fill=(220, 40, 40))
    draw.ellipse((140, 20, 220, 100), fill=(40, 170, 60))
    wide.save(tmp_path / "wide.png")
    question = "What is the relationship between <region1> and <region2>?"
    square, circle = "20,20,100,100", "140,20,220,100"
    r = run("describe", str(tmp_path / "wide.png"), "--box", square, "--box", circle, question)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "region1 is left of region2"
    r = run("describe", str(tmp_path / "wide.png"), "--box", circle, "--box", square, question)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "region1 is right of region2"


def test_an_unexpected_error_is_a_traceback_and_exit_1(tmp_path):
    """Only bad arguments or config exit 2; a failure inside (here a corrupt checkpoint) shows its
    traceback and a one-line summary, so a bug is never reported as a usage error."""
    image = tmp_path / "img.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    r = run("describe", str(image), "--box", "5,5,30,30", "--model", str(broken), "What is <region1>?")
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("roiscribe describe failed: ")


def test_caption_reads_a_config_file_and_flags_override_it(tmp_path):
    import json

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(folder / "a.png")
    config = tmp_path / "job.toml"
    config.write_text(f"""
source = "{folder}"
out = "{tmp_path / 'out'}"
batch_size = 4
[model]
spec = "random:tiny"
[detector]
spec = "given"
[engine]
max_new_tokens = 2
max_prompts = 32
[compose]
attributes = ["color"]
max_pairs = 3
[runner]
mode = "local"
""")
    r = run("caption", "--config", str(config), "--max-pairs", "0", "--out", str(tmp_path / "flagged"))
    assert r.returncode == 0, r.stderr
    assert "runner local" in r.stdout
    manifest = json.loads((tmp_path / "flagged" / "manifest.json").read_text())
    c = manifest["config"]
    assert (c["source"], c["batch_size"], c["compose"]["max_pairs"], c["compose"]["relations"]) == (str(folder), 4, 0, False)
    assert c["engine"] == {**c["engine"], "max_new_tokens": 2, "max_prompts": 32}
    assert c["model"] == {"spec": "random:tiny", "clip": None, "device": "cpu", "dtype": "float32"}
    assert c["compose"]["attributes"] == ["color"] and c["detector"]["spec"] == "given"
    assert {"torch", "transformers", "pyarrow"} <= set(manifest["versions"])
    assert not (tmp_path / "out").exists()

    config.write_text(config.read_text().replace("max_prompts = 32", "max_prompt = 32"))
    r = run("caption", "--config", str(config))
    assert r.returncode == 2 and "unknown option engine.max_prompt" in r.stderr and "max_prompts" in r.stderr
    assert "Traceback" not in r.stderr
    config.write_text(config.read_text().replace("max_prompt = 32", "").replace('mode = "local"', 'mode = "fast"'))
    r = run("caption", "--config", str(config))
    assert r.returncode == 2 and "runner mode 'fast'" in r.stderr


def test_duplicate_iou_option(capsys):
    import pytest

    from jobs.cli import build_parser

    parser = build_parser()
    from jobs.cli import job_config

    base = ["caption", "imgs", "--out", "o"]
    assert job_config(parser.parse_args(base)).postprocess.duplicate_iou == 0.8
    assert job_config(parser.parse_args(base + ["--duplicate-iou", "off"])).postprocess.duplicate_iou is None
    assert job_config(parser.parse_args(base + ["--duplicate-iou", "0.6"])).postprocess.duplicate_iou == 0.6
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--duplicate-iou", "2"])
    assert "expected an IoU in (0, 1] or 'off'" in capsys.readouterr().err
