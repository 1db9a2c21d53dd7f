"""README's commands, run from the command line as a user runs them, on a tiny world: ``world``,
``caption`` then ``show`` (the quickstart), ``evaluate``, ``calibrate``, ``pretrain``, ``train`` and
``apply-delta``."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from jobs.cli import main

WORLD_SEEDS = (9_100_000, 4)  # first seed, count: scenes no model was trained on


def run(*args, cwd=None):
    exe = shutil.which("roiscribe")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``roiscribe world``: a 4-image world (one part; 1 image kept for YOLO validation)."""
    out = tmp_path_factory.mktemp("cmd") / "world"
    seed, count = WORLD_SEEDS
    r = run("world", "--out", str(out), "--count", str(count), "--seed", str(seed), "--val-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    assert f"{count} images written under {out}" in r.stdout
    return out


def test_world_writes_images_conversations_ground_truth_and_a_yolo_set(world):
    from synth.world import generate_scene

    part = world / "part0"
    truths = [json.loads(line) for line in (part / "ground_truth.jsonl").read_text().splitlines()]
    assert [t["seed"] for t in truths] == list(range(WORLD_SEEDS[0], WORLD_SEEDS[0] + WORLD_SEEDS[1]))
    scene = generate_scene(WORLD_SEEDS[0])  # deterministic per seed
    assert [o["box"] for o in truths[0]["objects"]] == [list(o.box) for o in scene.objects]
    assert all((part / t["image"]).is_file() for t in truths)
    assert len((part / "conversations.jsonl").read_text().splitlines()) == 4
    assert len(list((part / "yolo" / "labels" / "val").iterdir())) == 1
    assert len(list((part / "yolo" / "labels" / "train").iterdir())) == 3


def test_caption_then_show_renders_every_image_with_its_captions(world, tmp_path):
    from sinks.parquet import read_rows

    images, out = world / "part0" / "images", tmp_path / "captions"
    r = run("caption", str(images), "--out", str(out), "--max-new-tokens", "12", "--attributes", "color",
            "--max-pairs", "0")
    assert r.returncode == 0, r.stderr
    rows = read_rows(out).to_pylist()
    assert len(rows) == 4 and {row["status"] for row in rows} == {"ok"}
    r = run("show", str(out))
    assert r.returncode == 0, r.stderr
    page = out / "preview" / "index.html"
    assert r.stdout.strip() == f"previews: {page}"
    assert sorted(p.name for p in page.parent.glob("*.jpg")) == [f"{n:05d}.jpg" for n in range(4)]
    text = page.read_text()
    captions = [reg["caption"] for row in rows for reg in row["regions"]]
    assert captions and all(c and c in text for c in captions)


def test_evaluate_scores_the_demo_models_and_writes_json(world, tmp_path, capsys):
    scores_file = tmp_path / "scores.json"
    r = run("evaluate", "--data", str(world), "--limit", "3", "--json", str(scores_file), "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    scores = json.loads(scores_file.read_text())
    assert json.loads(r.stdout) == scores
    assert scores["images"] == 3 and set(scores) == {"images", "ground_truth_boxes", "detector", "detector_boxes"}
    assert scores["detector"]["mAP50"] >= 0.8 and scores["ground_truth_boxes"]["color"] >= 0.9
    # without a detector, the model alone (in process: the same entry point, without a second start-up)
    assert main(["evaluate", "--data", str(world), "--limit", "1", "--detector", "none", "--model", "random:tiny",
                 "--max-new-tokens", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"images", "ground_truth_boxes"}


def test_calibrate_fits_checks_and_writes_the_calibration(world, tmp_path, capsys):
    from pipeline.calibrate import Calibration

    out = tmp_path / "calibration.json"
    r = run("calibrate", "--data", str(world), "--holdout", "0.5", "--out", str(out), "--precision", "0.9")
    assert r.returncode == 0, r.stderr
    assert "ECE before" in r.stdout and "AUROC of each signal alone" in r.stdout
    assert f"calibration written to {out}" in r.stdout
    calibration = Calibration.load(out)
    assert set(calibration.kinds) >= {"color", "shape", "material", "caption", "region"}
    assert calibration.fitted_on["images"] == 4 and calibration.fitted_on["model"] == "demo"
    assert calibration.metrics["how"] == "checked on a held-out 50% of the images (seed 0)"
    # thresholds tuned on the checked answers: one per kind checked, each a point of the grid
    assert set(calibration.thresholds) == set(calibration.metrics["checked"]) - {"all"}
    assert all(0 <= t < 1 and round(t * 20, 6) == int(round(t * 20)) for t in calibration.thresholds.values())
    assert "thresholds for precision 0.9 on the checked answers: " in r.stdout
    # fitted on the proposals a job with a lower --score-threshold keeps: more regions asked about
    low = tmp_path / "low.json"
    r = run("calibrate", "--data", str(world), "--holdout", "0.5", "--out", str(low), "--score-threshold", "0.01",
            "--precision", "0.9", "--per-class")
    assert r.returncode == 0, r.stderr
    fitted = Calibration.load(low)
    # per-class region thresholds only for classes with 30 checked regions (the logic: test_calibrate)
    assert {k.partition(":")[0] for k in fitted.thresholds} <= set(fitted.metrics["checked"])
    assert fitted.fitted_on["score_threshold"] == 0.01 and calibration.fitted_on["score_threshold"] == 0.25
    assert fitted.fitted_on["answers"] > calibration.fitted_on["answers"]
    r = run("calibrate", "--data", str(world))  # the shipped model is no directory to write next to
    assert r.returncode == 2 and "pass --out FILE" in r.stderr
    assert main(["calibrate", "--data", str(world), "--out", str(low), "--per-class"]) == 2
    assert "give --precision too" in capsys.readouterr().err


def test_pretrain_from_a_config_file(world, tmp_path):
    from model.checkpoint import load_pretrained

    config = tmp_path / "configs" / "pretrain.toml"
    config.parent.mkdir()
    shutil.copytree(world, config.parent / "world")  # `world` is read relative to the config file
    config.write_text('world = "world"\nout = "run"\ninit = "random:tiny"\nsteps = 5\nbatch_size = 2\n'
                      'warmup_steps = 1\nsave_every = 2\n')
    r = run("pretrain", "--config", str(config), "--steps", "2", cwd=tmp_path)  # `out` is relative to the cwd
    assert r.returncode == 0, r.stderr
    final = tmp_path / "run" / "checkpoint-2"
    assert f"checkpoint: {final.relative_to(tmp_path)}" in r.stdout
    assert set(torch.load(final / "pretrain_state.pt", weights_only=True)) == {"heads", "optimizer", "scheduler", "step"}
    assert load_pretrained(final).config.name == "tiny"


def test_train_from_a_config_file_and_refuse_unknown_keys(world, tmp_path, capsys):
    from model.checkpoint import load_pretrained

    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "train.toml"
    config.write_text(f'data = ["{world.name}/part0/conversations.jsonl"]\nout = "{tmp_path / "run"}"\n'
                      'init = "random:tiny"\nmax_steps = 9\nbatch_size = 2\nmax_turns = 2\nwarmup_steps = 1\n')
    shutil.copytree(world, folder / world.name)  # `data` is read relative to the config file
    r = run("train", "--config", str(config), "--max-steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    final = tmp_path / "run" / "checkpoint-2"
    assert f"checkpoint: {final}" in r.stdout
    assert json.loads((final / "train_config.json").read_text())["max_steps"] == 2
    assert load_pretrained(final).config.name == "tiny"

    config.write_text(config.read_text().replace("max_turns", "max_turn"))
    assert main(["train", "--config", str(config)]) == 2  # in process, as above
    err = capsys.readouterr().err
    assert "max_turn" in err and "valid options" in err and "Traceback" not in err


def _write_bin_shards(folder, state: dict, n: int) -> None:
    """An HF-style sharded checkpoint: pytorch_model-0000K-of-0000N.bin and its index."""
    folder.mkdir()
    keys, weight_map = list(state), {}
    for k in range(n):
        name = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin"
        part = {key: state[key] for key in keys[k::n]}
        torch.save(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_apply_delta_merges_a_base_and_a_delta(tmp_path):
    """A LLaMA-shaped base (32000-row vocabulary, as the command assumes) and a delta with the 6
    added rows, the projector and the region module: target = base + delta, the rest raw."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).half()  # noqa: E731
    base = {"model.embed_tokens.weight": rand(32000, 4), "lm_head.weight": rand(32000, 4),
            "model.layers.0.self_attn.q_proj.weight": rand(4, 4), "model.norm.weight": rand(4)}
    delta = {"model.embed_tokens.weight": rand(32006, 4), "lm_head.weight": rand(32006, 4),
             "model.layers.0.self_attn.q_proj.weight": rand(4, 4), "model.norm.weight": rand(4),
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(2),
             "model.mm_projector.weight": rand(4, 3), "model.spi_module.mlvl_fuse.0.weight": rand(3, 3)}
    _write_bin_shards(tmp_path / "llama", base, 2)
    _write_bin_shards(tmp_path / "delta", delta, 3)
    (tmp_path / "delta" / "config.json").write_text('{"model_type": "llava"}')

    out = tmp_path / "merged"
    r = run("apply-delta", "--base", str(tmp_path / "llama"), "--delta", str(tmp_path / "delta"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"merged checkpoint written to {out}" in r.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(delta) - {"model.layers.0.self_attn.rotary_emb.inv_freq"}
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llava"}
    for key, file in index.items():
        with safe_open(str(out / file), "pt") as f:
            merged = f.get_tensor(key)
        want = delta[key].clone()
        if key in base:
            want[: base[key].shape[0]] += base[key]
        assert torch.equal(merged, want), key
