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
    r = run("demo", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("region")]
    assert [l.split()[0] for l in lines] == ["region1", "region2", "region3"]


def test_describe_answers_and_refuses_bad_input(tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    r = run("describe", str(image), "--box", "5,5,30,30", "--max-new-tokens", "3", "What is <region1>?")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    r = run("describe", str(image), "--box", "5,5,90,30", "What is <region1>?")
    assert r.returncode == 2 and "outside the 60x40 image" in r.stderr
    r = run("describe", str(image), "--box", "5,5,4,30", "What is <region1>?")
    assert r.returncode == 2 and "x2 > x1" in r.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    r = run("describe", str(text), "--box", "1,1,2,2", "What is <region1>?")
    assert r.returncode == 2 and "cannot read image" in r.stderr
    r = run("describe", str(image), "--box", "5,5,30,30", "--model", "nonesuch", "What is <region1>?")
    assert r.returncode == 2 and "valid presets" in r.stderr


def test_duplicate_iou_option(capsys):
    import pytest

    from jobs.cli import build_parser

    parser = build_parser()
    base = ["caption", "imgs", "--out", "o"]
    assert parser.parse_args(base).duplicate_iou == 0.8
    assert parser.parse_args(base + ["--duplicate-iou", "off"]).duplicate_iou is None
    assert parser.parse_args(base + ["--duplicate-iou", "0.6"]).duplicate_iou == 0.6
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--duplicate-iou", "2"])
    assert "expected an IoU in (0, 1] or 'off'" in capsys.readouterr().err
