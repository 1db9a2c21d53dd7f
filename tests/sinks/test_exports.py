"""Pseudo-label exports (sinks/exports.py): the policy on a hand-built row, then a real caption
output exported and each export read by the tool that consumes it: the conversations by
``roiscribe train`` (one training step), the YOLO set by ultralytics (one epoch, offline), the COCO
json by the caption job's COCO source."""

import json
import math
from pathlib import Path

import pytest

from pipeline.arrow import result_to_row
from pipeline.records import Answer, ImageResult, Regions, RelationAnswer
from sinks.exports import Policy, decide, export


def _answer(value, p):
    lp = math.log(p)
    return Answer(value, value or "???", "ok" if value else "unknown", lp, lp)


def hand_row():
    """Four regions: 0 sure (0.9), 1 unsure (0.2), 2 sure but tiny, 3 sure and another circle;
    answers with set confidences; relations 0->3 (sure), 0->1 (to a rejected region), 3->0 (unsure)."""
    regions = Regions.from_boxes([[0, 0, 50, 50], [60, 0, 100, 40], [0, 60, 4, 64], [50, 50, 100, 100]],
                                 ["circle", "star", "square", "circle"], scores=[0.9, 0.2, 0.95, 0.8])
    answers = [
        {"caption": _answer("a red circle", 0.9), "color": _answer("red", 0.95), "shape": _answer("circle", 0.3)},
        {"caption": _answer("a star", 0.9), "color": _answer("blue", 0.9)},
        {"caption": _answer("a square", 0.9), "color": _answer(None, 0.9)},
        {"caption": _answer("a green circle", 0.6), "color": _answer("green", 0.99)},
    ]
    relations = [RelationAnswer(0, "left of", 3, "", "ok", math.log(0.9), math.log(0.9)),
                 RelationAnswer(0, "above", 1, "", "ok", math.log(0.9), math.log(0.9)),
                 RelationAnswer(3, "right of", 0, "", "ok", math.log(0.4), math.log(0.4))]
    return result_to_row(ImageResult("a.png", "a.png", "ok", width=100, height=100, regions=regions, answers=answers,
                                     relations=relations))


def test_the_policy_keeps_and_rejects_with_reasons():
    d = decide(hand_row(), Policy(min_area=25.0, max_per_class=1))
    reasons = [g["reason"] for g in d["regions"]]
    assert reasons[0] is None
    assert reasons[1] == "probability 0.20 < 0.50"
    assert reasons[2] == "area 16 px < 25"
    assert reasons[3] == "class-cap: 'circle' already has 1 more probable regions"
    kept = d["regions"][0]["answers"]
    assert kept["caption"]["reason"] is None and kept["color"]["reason"] is None
    assert kept["shape"]["reason"] == "probability 0.30 < 0.50"
    assert kept["caption"]["probability"] == pytest.approx(0.9)  # uncalibrated: exp(mean log-prob)
    assert d["regions"][1]["answers"]["color"]["reason"] == "region-rejected"
    assert d["regions"][2]["answers"]["color"]["reason"].startswith("unparsed")
    assert [r["reason"] for r in d["relations"]] == ["region-rejected"] * 3  # region 3 went to the class cap
    assert {k for g in d["regions"] for a in g["answers"].values() for k in a} <= {"value", "said", "probability",
                                                                                     "reason"}
    # without the class cap, the relation between two kept regions stands, the unsure one does not
    d = decide(hand_row(), Policy(min_area=25.0))
    assert [r["reason"] for r in d["relations"]] == [None, "region-rejected", "probability 0.40 < 0.50"]
    d = decide(hand_row(), Policy(max_per_image=1))
    assert [g["reason"] for g in d["regions"]] == [
        "image-cap: 1 more probable regions kept", "probability 0.20 < 0.50", None, "image-cap: 1 more probable regions kept"]


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A real caption output (the demo models) over 6 unseen world scenes."""
    from jobs.cli import main
    from synth.dataset import write_dataset

    world = write_dataset(tmp_path_factory.mktemp("pl-world"), range(9_400_000, 9_400_006))
    out = tmp_path_factory.mktemp("pl") / "out"
    assert main(["caption", str(world / "images"), "--out", str(out), "--no-ray", "--max-pairs", "2"]) == 0
    return out


def test_a_class_threshold_applies_to_that_class_only():
    """``region:circle``: the circles' own threshold (region 3, a circle at 0.8, goes; the star and the
    square keep the kind's); ``color:circle``: the colour answers about circles."""
    d = decide(hand_row(), Policy(min_probability={"region": 0.5, "region:circle": 0.85, "color:circle": 0.96}))
    assert [g["reason"] for g in d["regions"]] == [None, "probability 0.20 < 0.50", None, "probability 0.80 < 0.85"]
    assert d["regions"][0]["answers"]["color"]["reason"] == "probability 0.95 < 0.96"
    assert d["regions"][0]["answers"]["caption"]["reason"] is None
    d = decide(hand_row(), Policy(min_probability={"region": 0.1, "region:star": 0.5}))
    assert [g["reason"] for g in d["regions"]] == [None, "probability 0.20 < 0.50", None, None]


def test_exports_count_every_proposal_and_keep_what_the_policy_keeps(output):
    manifest = export(output, Policy(min_probability={"region": 0.5, "relation": 0.9}))
    exports = output / "exports"
    assert json.loads((exports / "manifest.json").read_text()) == manifest
    for kind, c in manifest["counts"].items():
        assert c["accepted"] + c["rejected"] == c["proposed"] and sum(c["rejected_by_reason"].values()) == c["rejected"]
    decisions = [json.loads(line) for line in (exports / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == 6
    assert manifest["counts"]["region"]["proposed"] == sum(len(d["regions"]) for d in decisions)
    kept = [[g for g in d["regions"] if g["reason"] is None] for d in decisions]
    conversations = [json.loads(line) for line in (exports / "conversations.jsonl").read_text().splitlines()]
    assert [len(c["boxes"]) for c in conversations] == [len(k) for k in kept if k]
    coco = json.loads((exports / "coco.json").read_text())
    assert len(coco["annotations"]) == sum(map(len, kept)) == manifest["counts"]["region"]["accepted"]
    # a stricter policy replaces the export whole
    strict = export(output, Policy(min_probability={"region": 0.99}))
    assert strict["counts"]["region"]["accepted"] < manifest["counts"]["region"]["accepted"]
    assert len(json.loads((exports / "coco.json").read_text())["annotations"]) == strict["counts"]["region"]["accepted"]
    assert not (output / "exports.partial").exists()


def test_the_conversations_train_a_step(output, tmp_path):
    from model.train import TrainConfig, read_conversations, train

    export(output)
    records = read_conversations([output / "exports" / "conversations.jsonl"])
    assert records and all(len(r["boxes"]) >= 1 for r in records)
    questions = {t["value"] for r in records for t in r["conversations"] if t["from"] == "human"}
    assert "What is the relationship between <region1> and <region2>?" in questions  # two-region turns too
    cfg = TrainConfig(data=[str(output / "exports" / "conversations.jsonl")], out=str(tmp_path / "run"),
                      init="random:tiny", max_steps=1, save_every=1, batch_size=2, max_turns=4, warmup_steps=0)
    final = train(cfg, progress=False)
    assert final is not None and final.name == "checkpoint-1"


def test_the_yolo_set_trains_an_ultralytics_detector_for_an_epoch(output, tmp_path):
    from detectors.ultralytics_backend import offline_environment

    offline_environment()
    from ultralytics import YOLO

    export(output)
    moved = tmp_path / "moved"  # an export is self-contained: moved elsewhere, it still trains
    (output / "exports").rename(moved)
    data = moved / "yolo" / "data.yaml"
    import demo

    model = YOLO(str(Path(demo.__file__).parent / "detector.yaml"))  # the shipped detector's layout, untrained
    model.train(data=str(data), epochs=1, imgsz=128, batch=4, device="cpu", workers=0, project=str(tmp_path),
                name="yolo", plots=False, val=True, amp=False, verbose=False)
    assert (tmp_path / "yolo" / "weights" / "last.pt").is_file()


def _constant_calibration(**wanted):
    """A calibration giving each kind one probability whatever the signals."""
    from pipeline.calibrate import FEATURES, Calibration, KindCalibrator

    return Calibration({k: KindCalibrator(list(FEATURES), [0.0] * len(FEATURES), [1.0] * len(FEATURES),
                                          [0.0] * len(FEATURES), math.log(p / (1 - p))) for k, p in wanted.items()})


def test_calibrated_answers_of_an_unsure_box_are_judged_on_their_own(tmp_path):
    """A box below the region threshold is left out of the detector exports, but a calibrated
    answer about it (whose probability already counts an answer about no object as wrong) is kept
    when it is sure enough; what the area or a cap removed goes whole; uncalibrated answers follow
    their region (the first test)."""
    from PIL import Image

    from sinks.exports import write_exports

    calibration = _constant_calibration(region=0.4, color=0.9, caption=0.3, relation=0.9)
    d = decide(hand_row(), Policy(), calibration)
    assert [g["reason"] for g in d["regions"]] == ["probability 0.40 < 0.50"] * 4
    assert [g["answers"]["color"]["reason"] for g in d["regions"]] == [None, None, "unparsed: '???'", None]
    assert all(g["answers"]["caption"]["reason"] == "probability 0.30 < 0.50" for g in d["regions"])
    assert [r["reason"] for r in d["relations"]] == [None, None, None]
    cut = decide(hand_row(), Policy({"region": 0.3, "caption": 0.2}, min_area=25.0, max_per_class=1), calibration)
    assert [g["reason"] for g in cut["regions"]] == [
        None, None, "area 16 px < 25", "class-cap: 'circle' already has 1 more probable regions"]
    assert [g["answers"]["caption"]["reason"] for g in cut["regions"]] == [None, None, "region-rejected",
                                                                          "region-rejected"]
    assert [r["reason"] for r in cut["relations"]] == ["region-rejected", None, "region-rejected"]

    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    d["uri"] = str(tmp_path / "a.png")
    manifest = write_exports(tmp_path / "exports", [d])
    assert manifest["images_exported"] == 0 and manifest["conversations"] == 1  # nothing for the detector
    conversation = json.loads((tmp_path / "exports" / "conversations.jsonl").read_text())
    assert conversation["boxes"] == [d["regions"][k]["box"] for k in (0, 1, 3)]
    turns = conversation["conversations"]
    assert [(q["regions"], a["value"]) for q, a in zip(turns[::2], turns[1::2])] == [
        ([0], "red"), ([1], "blue"), ([2], "green"), ([0, 2], "region1 is left of region2"),
        ([0, 1], "region1 is above region2"), ([2, 0], "region1 is right of region2")]
    assert not list((tmp_path / "exports" / "yolo" / "labels").glob("*/*.txt"))


def test_the_conversations_teach_the_words_the_model_said(tmp_path):
    """An answer parsed to its vocabulary's canonical value ("nothing" -> "none") is exported as the
    model said it: the student learns the teacher's phrasing, not the parser's."""
    from PIL import Image

    from sinks.exports import write_exports

    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    regions = Regions.from_boxes([[0, 0, 50, 50]], ["circle"], scores=[0.9])
    answers = [{"action": Answer("none", " nothing", "ok", -0.01, -0.01), "color": _answer("red", 0.95),
                "material": Answer("wood", "wood stone triangle", "ok", -0.01, -0.01)}]  # a run-on answer
    row = result_to_row(ImageResult(str(tmp_path / "a.png"), str(tmp_path / "a.png"), "ok", width=100, height=100,
                                    regions=regions, answers=answers))
    d = decide(row, Policy())
    assert d["regions"][0]["answers"]["action"]["value"] == "none"
    write_exports(tmp_path / "exports", [d])
    turns = json.loads((tmp_path / "exports" / "conversations.jsonl").read_text())["conversations"]
    said = {q["value"]: a["value"] for q, a in zip(turns[::2], turns[1::2])}
    assert said == {"What is <region1> doing?": "nothing", "What is the color of <region1>?": "red",
                    "What is <region1> made of?": "wood"}


def test_yolo_and_coco_classes_are_the_detectors_own_numbers(tmp_path):
    """A detector's class ids stay its numbers (so the detector that made the labels fine-tunes on
    them without its head scrambled); a person's label (no id) takes the lowest free number."""
    from PIL import Image

    from sinks.exports import write_exports

    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")

    def region(k, label, class_id):
        return {"region_id": k, "label": label, "class_id": class_id, "box": [10.0 * k, 0.0, 10.0 * k + 10, 10.0],
                "area": 100.0, "probability": 0.9, "reason": None, "answers": {}}

    decisions = [{"image_id": "a", "uri": str(tmp_path / "a.png"), "width": 100, "height": 100, "relations": [],
                  "regions": [region(0, "star", 3), region(1, "square", 1), region(2, "blob", -1),
                              region(3, "star", 3)]}]
    manifest = write_exports(tmp_path / "exports", decisions)
    assert manifest["classes"] == ["blob", "square", "class2", "star"]
    yaml = (tmp_path / "exports" / "yolo" / "data.yaml").read_text()
    assert '  1: "square"\n' in yaml and '  3: "star"\n' in yaml and '  2: "class2"\n' in yaml
    labels = [p.read_text().split() for p in (tmp_path / "exports" / "yolo" / "labels").glob("*/*.txt")]
    assert [line[::5] for line in labels] == [["3", "1", "0", "3"]]
    coco = json.loads((tmp_path / "exports" / "coco.json").read_text())
    assert [a["category_id"] for a in coco["annotations"]] == [4, 2, 1, 4]
    assert coco["categories"] == [{"id": 1, "name": "blob"}, {"id": 2, "name": "square"}, {"id": 4, "name": "star"}]


def test_mask_rejected_paints_out_the_proposals_not_kept_and_only_those(tmp_path):
    """With ``mask_rejected`` an image with a rejected proposal is a PNG copy in which that box (but
    not where a kept box covers it) is the background around it; an image with nothing rejected
    stays a link to the original; without the option every image is a link."""
    import numpy as np
    from PIL import Image

    from sinks.exports import write_exports

    pixels = np.full((100, 100, 3), 40, np.uint8)
    pixels[10:40, 10:40] = (250, 0, 0)  # the rejected object
    pixels[30:60, 30:60] = (0, 250, 0)  # the kept one, overlapping it
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.png")

    def region(k, box, reason):
        return {"region_id": k, "label": "square", "class_id": 0, "box": box, "area": 900.0,
                "probability": 0.9 if reason is None else 0.2, "reason": reason, "answers": {}}

    decisions = [{"image_id": "a", "uri": str(tmp_path / "a.png"), "width": 100, "height": 100, "relations": [],
                  "regions": [region(0, [30.0, 30.0, 60.0, 60.0], None),
                              region(1, [10.0, 10.0, 40.0, 40.0], "probability 0.20 < 0.50")]},
                 {"image_id": "b", "uri": str(tmp_path / "b.png"), "width": 100, "height": 100, "relations": [],
                  "regions": [region(0, [30.0, 30.0, 60.0, 60.0], None)]}]
    manifest = write_exports(tmp_path / "exports", decisions, val_fraction=0, mask_rejected=True)
    assert manifest["yolo_images_masked"] == 1
    a, b = sorted((tmp_path / "exports" / "yolo" / "images" / "train").iterdir())
    assert not a.is_symlink() and a.suffix == ".png" and b.is_symlink()
    masked = np.asarray(Image.open(a).convert("RGB"))
    assert (masked[30:60, 30:60] == pixels[30:60, 30:60]).all()  # the kept box untouched
    assert (masked[60:] == pixels[60:]).all() and (masked[:, 60:] == pixels[:, 60:]).all()  # outside untouched
    painted = masked[10:30, 10:30].astype(float)
    assert abs(painted.mean((0, 1)) - 40).max() < 3  # the red object is now the grey around it
    assert (tmp_path / "exports" / "yolo" / "labels" / "train" / f"{a.stem}.txt").read_text().count("\n") == 1
    write_exports(tmp_path / "exports", decisions, val_fraction=0)
    assert all(p.is_symlink() for p in (tmp_path / "exports" / "yolo" / "images" / "train").iterdir())
    # an image that cannot be masked now (broken, or another size since it was captioned) is left out of
    # the YOLO set and counted; its conversation and COCO entry stay
    (tmp_path / "a.png").write_bytes(b"not an image any more")
    manifest = write_exports(tmp_path / "exports", decisions, val_fraction=0, mask_rejected=True)
    assert manifest["images_skipped"] == {"yolo: not masked: the image cannot be decoded now": 1}
    assert manifest["images_exported"] == 2 and manifest["conversations"] == 2
    assert len(list((tmp_path / "exports" / "yolo" / "labels" / "train").iterdir())) == 1
    Image.fromarray(pixels[:50]).save(tmp_path / "a.png")
    manifest = write_exports(tmp_path / "exports", decisions, val_fraction=0, mask_rejected=True)
    assert manifest["images_skipped"] == {"yolo: not masked: the image changed size since it was captioned": 1}


def test_the_coco_json_is_a_source_the_caption_job_reads(output):
    from jobs.sources import open_source

    export(output)
    coco = output / "exports" / "coco.json"
    images = json.loads(coco.read_text())["images"]
    root = str(Path(images[0]["file_name"]).parent)  # the images live beside the world, not the export
    source = open_source(str(coco), root=root)
    assert source.coco == coco and len(source.items) == len(images)


def test_the_export_command(output, capsys):
    from jobs.cli import main

    assert main(["export", str(output), "--min-probability", "relation=0.95", "--max-per-image", "2",
                 "--mask-rejected"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((output / "exports" / "manifest.json").read_text())
    assert manifest["policy"]["min_probability"]["relation"] == 0.95 and manifest["policy"]["max_per_image"] == 2
    assert manifest["policy"]["mask_rejected"] and manifest["yolo_images_masked"] > 0
    assert f"exported {manifest['images_exported']} images" in printed and "region" in printed
    assert main(["export", str(output), "--min-probability", "colour=0.5"]) == 2
    assert "unknown kind 'colour'" in capsys.readouterr().err
    for bad in ("relation:circle=0.5", "region:=0.5", "region:circle=1.5"):
        assert main(["export", str(output), "--min-probability", bad]) == 2, bad
    assert main(["export", str(output / "nothing")]) == 2


def test_a_push_with_a_calibration_scores_each_item_and_the_whole_prediction(output, tmp_path):
    """Constant calibrators (one probability per kind) make the wiring exact: each box, caption and
    choice pushed carries its kind's probability, the prediction the product over its items."""
    from jobs.cli import main
    from pipeline.calibrate import FEATURES, Calibration, KindCalibrator

    wanted = {"region": 0.9, "caption": 0.8, "color": 0.7, "shape": 0.6, "material": 0.95, "relation": 0.5}
    kinds = {k: KindCalibrator(list(FEATURES), [0.0] * len(FEATURES), [1.0] * len(FEATURES), [0.0] * len(FEATURES),
                               math.log(p / (1 - p))) for k, p in wanted.items()}
    path = Calibration(kinds).save(tmp_path / "calibration.json")
    folder = tmp_path / "tasks"
    assert main(["push", str(output), "--task-files", str(folder), "--calibration", str(path),
                 "--document-root", "/", "--max-relations", "2"]) == 0
    tasks = [t for f in sorted(folder.glob("tasks-*.json")) for t in json.loads(f.read_text())]
    assert len(tasks) == 6
    checked = 0
    for task in tasks:
        (pred,) = task["predictions"]
        product = 1.0
        for item in pred["result"]:
            if item["type"] == "relation":
                product *= wanted["relation"]
                continue
            kind = item["from_name"]
            if kind in wanted:
                assert item["score"] == pytest.approx(wanted[kind]), item
                product *= wanted[kind]
                checked += 1
        assert pred["score"] == pytest.approx(product)
    assert checked > 20


def test_a_job_run_with_a_calibration_writes_probabilities_that_export_and_push_use(output, tmp_path):
    """``caption --calibration``: every region, answer and relation row gets its probability (the
    Parquet columns); ``export`` and ``push`` then use them without being given the file."""
    import pyarrow.parquet as pq

    from jobs.cli import main
    from pipeline.calibrate import FEATURES, Calibration, KindCalibrator
    from sinks.parquet import part_files

    wanted = {"region": 0.9, "caption": 0.8, "color": 0.7, "shape": 0.6, "material": 0.95, "relation": 0.5}
    kinds = {k: KindCalibrator(list(FEATURES), [0.0] * len(FEATURES), [1.0] * len(FEATURES), [0.0] * len(FEATURES),
                               math.log(p / (1 - p))) for k, p in wanted.items()}
    path = Calibration(kinds).save(tmp_path / "calibration.json")
    images = Path(json.loads((output / "manifest.json").read_text())["config"]["source"])
    out = tmp_path / "calibrated"
    assert main(["caption", str(images), "--out", str(out), "--no-ray", "--max-pairs", "2",
                 "--calibration", str(path)]) == 0
    rows = [r for part in part_files(out) for r in pq.read_table(part).to_pylist()]
    regions = [g for r in rows for g in r["regions"]]
    assert regions and all(g["probability"] == pytest.approx(0.9) for g in regions)
    answers = [a for g in regions for a in g["answers"] if a["value"] is not None]
    assert all(a["probability"] == pytest.approx(wanted[a["name"]]) for a in answers if a["name"] in wanted)
    assert all(a["probability"] is None for a in answers if a["name"] not in wanted)  # no calibrator: none
    relations = [x for r in rows for x in r["relations"] if x["predicate"]]
    assert relations and all(x["probability"] == pytest.approx(0.5) for x in relations)
    # export without --calibration uses the rows' probabilities: a 0.85 caption threshold rejects every caption
    manifest = export(out, Policy(min_probability={"caption": 0.85}))
    assert manifest["counts"]["caption"]["accepted"] == 0 and manifest["counts"]["region"]["accepted"] == len(regions)
    folder = tmp_path / "tasks"
    assert main(["push", str(out), "--task-files", str(folder), "--document-root", "/"]) == 0
    scores = [i["score"] for f in folder.glob("tasks-*.json") for t in json.loads(f.read_text())
              for i in t["predictions"][0]["result"] if i.get("from_name") == "region"]
    assert scores and all(s == pytest.approx(0.9) for s in scores)
    # pseudo-label: the same caption job, then the export, in one command; the thresholds default to
    # those tuned with the calibration (`calibrate --precision`)
    tuned = Calibration(kinds, thresholds={"caption": 0.85}).save(tmp_path / "tuned.json")
    labelled = tmp_path / "pseudo"
    assert main(["pseudo-label", str(images), "--out", str(labelled), "--no-ray", "--max-pairs", "2",
                 "--calibration", str(tuned), "--max-per-image", "1"]) == 0
    manifest = json.loads((labelled / "exports" / "manifest.json").read_text())
    assert manifest["counts"]["caption"]["accepted"] == 0 and manifest["counts"]["region"]["accepted"] == 6
    assert manifest["counts"]["region"]["proposed"] == len(regions)
    # a flag wins over the tuned threshold
    assert main(["export", str(labelled), "--calibration", str(tuned), "--min-probability", "caption=0.8",
                 "--max-per-image", "1"]) == 0
    manifest = json.loads((labelled / "exports" / "manifest.json").read_text())
    assert manifest["counts"]["caption"]["accepted"] == 6
    # tuned per-class region thresholds (1.0: a class never precise enough) apply; a flag for the
    # kind replaces them, a flag for one class only that class's
    classes = sorted({g["label"] for g in regions})
    tuned = Calibration(kinds, thresholds={f"region:{c}": 1.0 for c in classes}).save(tmp_path / "per-class.json")
    assert main(["export", str(labelled), "--calibration", str(tuned)]) == 0
    manifest = json.loads((labelled / "exports" / "manifest.json").read_text())
    assert manifest["counts"]["region"]["accepted"] == 0
    assert manifest["policy"]["min_probability"][f"region:{classes[0]}"] == 1.0
    assert main(["export", str(labelled), "--calibration", str(tuned), "--min-probability", "region=0.5"]) == 0
    manifest = json.loads((labelled / "exports" / "manifest.json").read_text())
    assert manifest["counts"]["region"]["accepted"] == len(regions)
    assert not any(":" in k for k in manifest["policy"]["min_probability"])
    assert main(["export", str(labelled), "--calibration", str(tuned), "--min-probability", f"region:{classes[0]}=0"]) == 0
    manifest = json.loads((labelled / "exports" / "manifest.json").read_text())
    assert manifest["counts"]["region"]["accepted"] == sum(g["label"] == classes[0] for g in regions) > 0
    # another calibration would mix two kinds of probabilities in one output: a resume refuses it
    kinds["region"] = KindCalibrator(list(FEATURES), [0.0] * len(FEATURES), [1.0] * len(FEATURES),
                                     [0.0] * len(FEATURES), 0.0)
    other = Calibration(kinds).save(tmp_path / "other.json")
    assert main(["caption", str(images), "--out", str(out), "--no-ray", "--max-pairs", "2", "--resume",
                 "--calibration", str(other)]) == 2
