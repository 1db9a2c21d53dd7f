"""Calibrated confidence (pipeline/calibrate.py, synth/calibrate.py): metrics and the fit on
hand-built data, labels from hand-built results, and a test-sized fit on the demo model's real
answers."""

import json
import math

import numpy as np
import pytest

from pipeline.calibrate import Calibration, Example, KindCalibrator, auroc, ece, evaluate
from synth.calibrate import calibrate_world, world_examples
from pipeline.records import Answer, ImageResult, Regions, RelationAnswer
from synth.evaluate import GroundTruth


def test_ece_and_auroc_on_hand_counted_cases():
    assert ece([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert ece([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    # two bins: 0.25 with 1/4 right (exact), 0.85 with 2/4 right (off by 0.35), each half the answers
    assert ece([0.25] * 4 + [0.85] * 4, [True, False, False, False, True, True, False, False]) == pytest.approx(0.175)
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5] * 4, [True, False, True, False]) == 0.5  # ties count half
    assert auroc([0.9, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert math.isnan(auroc([0.3, 0.4], [True, True]))


def _examples(n, seed, kind="color", bias=-0.5):
    """Answers whose chance of being right is sigmoid(2 * min_logprob_z + bias), while their mean
    log-prob says 0.95 for all: an overconfident model with one informative signal."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    p = 1 / (1 + np.exp(-(2 * z + bias)))
    right = rng.random(n) < p
    return [Example(kind, {"mean_logprob": math.log(0.95), "min_logprob": float(zi), "detector_score": 0.9,
                           "caption_agrees": 0.5, "label_agrees": 0.5, "geometry_agrees": 0.5, "overlap": 0.0,
                           "jitter_agrees": 0.5}, bool(r))
            for zi, r in zip(z, right)], p


def test_the_fit_recovers_the_probability_and_calibrates_held_out_answers():
    fit, _ = _examples(4000, seed=0)
    check, truth = _examples(2000, seed=1)
    c = KindCalibrator.fit(fit)
    got = np.array([c.probability(e.features) for e in check])
    assert np.abs(got - truth).max() < 0.05  # the true probability of each answer
    calibration = Calibration({"color": c})
    m = evaluate(calibration, check)["color"]
    assert m["ece_before"] > 0.3 and m["ece_after"] < 0.03
    assert m["auroc_before"] == 0.5 and m["auroc_after"] > 0.75  # the baseline ranks nothing here
    # the only informative signal carries the weight
    weights = dict(zip(c.features, c.weights))
    assert weights["min_logprob"] > 1.0 and all(abs(w) < 1e-6 for f, w in weights.items() if f != "min_logprob")


def test_a_kind_with_only_right_answers_gets_their_rate(tmp_path):
    examples = [Example("shape", {"mean_logprob": -0.1 * k, "min_logprob": -0.2, "detector_score": 0.5,
                                  "caption_agrees": 1.0, "label_agrees": 1.0, "geometry_agrees": 1.0, "overlap": 0.0,
                                  "jitter_agrees": 1.0}, True)
                for k in range(20)]
    calibration = Calibration.fit(examples)
    assert calibration.probability("shape", examples[3].features) > 0.999
    assert calibration.probability("relation", examples[3].features) is None  # never fitted
    loaded = Calibration.load(calibration.save(tmp_path / "calibration.json"))
    assert loaded.probability("shape", examples[5].features) == calibration.probability("shape", examples[5].features)
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a roiscribe calibration"):
        Calibration.load(tmp_path / "other.json")


def _answer(value, lp=-0.1):
    return Answer(value, value or "", "ok", lp, lp * 2)


def test_answers_are_labelled_by_the_ground_truth_they_match():
    """Region 0 matches object 0 (IoU 1): its colour is right, its shape wrong, its caption names
    a colour the direct answer does not. Region 1 matches nothing: all its answers are wrong. The
    relation 0 -> 2 links two real objects with the true predicate; 0 -> 1 names the false one."""
    truth = GroundTruth("img.png", 100, 100, [
        {"box": [0, 0, 40, 40], "color": "red", "shape": "circle", "material": "metal", "size": "large"},
        {"box": [60, 60, 90, 90], "color": "blue", "shape": "star", "material": "wood", "size": "small"},
        {"box": [0, 60, 30, 95], "color": "green", "shape": "square", "material": "wood", "size": "small"},
    ], {"0,2": "above", "2,0": "below"})
    regions = Regions.from_boxes([[0, 0, 40, 40], [50, 0, 60, 10], [0, 60, 30, 95]], ["circle", "star", "square"],
                                 scores=[0.9, 0.3, 0.8])
    answers = [
        {"color": _answer("red"), "shape": _answer("star"), "material": _answer("metal"),
         "caption": _answer("a large blue metal circle")},
        {"color": _answer("red"), "shape": _answer("star"), "material": _answer("wood"),
         "caption": _answer("a small red wood star")},
        {"color": _answer("green"), "shape": _answer("square"), "material": _answer("wood"),
         "caption": _answer("a small green wood square")},
    ]
    relations = [RelationAnswer(0, "above", 2, "region1 is above region2", "ok", -0.2, -0.4),
                 RelationAnswer(0, "left", 1, "region1 is left of region2", "ok", -0.2, -0.4)]
    result = ImageResult("img.png", "img.png", "ok", width=100, height=100, regions=regions, answers=answers,
                         relations=relations)
    got = [(e.kind, e.correct) for e in world_examples([result], [truth])]
    assert got == [("color", True), ("shape", False), ("material", True), ("caption", False), ("region", True),
                   ("color", False), ("shape", False), ("material", False), ("caption", False), ("region", False),
                   ("color", True), ("shape", True), ("material", True), ("caption", True), ("region", True),
                   ("relation", True), ("relation", False)]
    first = {e.kind: e.features for e in world_examples([result], [truth])[:5]}
    relation = [e.features for e in world_examples([result], [truth]) if e.kind == "relation"]
    assert [f["geometry_agrees"] for f in relation] == [1.0, 0.5]  # region 0 is above 2; "left" is no predicate
    assert first["color"]["geometry_agrees"] == 0.5  # not a relation
    assert first["color"]["caption_agrees"] == 0.0  # the caption says blue, the answer red
    assert first["shape"]["label_agrees"] == 0.0  # labelled circle, answered star
    assert first["material"]["caption_agrees"] == 1.0 and first["material"]["label_agrees"] == 0.5
    assert first["caption"]["caption_agrees"] == pytest.approx(1 / 3)  # colour no, shape no, material yes
    assert first["color"]["detector_score"] == pytest.approx(0.9)


@pytest.mark.parametrize("predicate, a, b, want", [
    ("left of", [0, 0, 10, 10], [20, 0, 30, 10], 1.0),  # apart, side by side
    ("right of", [0, 0, 10, 10], [20, 0, 30, 10], 0.0),  # the centres lie the other way
    ("overlapping", [0, 0, 10, 10], [20, 0, 30, 10], 0.0),  # apart
    ("left of", [0, 0, 10, 10], [12, 30, 22, 40], 0.5),  # left, but more above than left
    ("above", [0, 0, 10, 10], [12, 30, 22, 40], 1.0),
    ("overlapping", [0, 0, 10, 10], [5, 5, 15, 15], 1.0),
    ("left of", [0, 0, 10, 10], [5, 5, 15, 15], 0.5),  # intersecting: only consistent
    ("below", [0, 0, 10, 10], [5, 5, 15, 15], 0.0),
    ("larger than", [0, 0, 20, 20], [0, 0, 10, 10], 1.0),
    ("smaller than", [0, 0, 20, 20], [0, 0, 10, 10], 0.0),
    ("inside", [2, 2, 4, 4], [0, 0, 10, 10], 1.0),
    ("inside", [0, 0, 10, 10], [2, 2, 4, 4], 0.0),
    ("holding", [0, 0, 10, 10], [20, 0, 30, 10], 0.5),  # boxes cannot tell
    (None, [0, 0, 10, 10], [20, 0, 30, 10], 0.5),
    ("left of", [0, 0, 10, 10], [20, 20, 30, 30], 1.0),  # as far right as down: the horizontal decides,
    ("above", [0, 0, 10, 10], [20, 20, 30, 30], 0.5),  # as synth.world.relation does
    ("left of", [2, 0, 2, 10], [5, 0, 10, 10], 0.5),  # a box of no area says nothing
])
def test_geometry_agreement_reads_the_predicate_off_the_boxes(predicate, a, b, want):
    from pipeline.calibrate import geometry_agreement

    assert geometry_agreement(predicate, a, b) == want


@pytest.mark.parametrize("boxes, want", [
    ([[0, 0, 10, 10]], [0.0]),  # alone in its image
    ([[0, 0, 10, 10], [20, 20, 30, 30]], [0.0, 0.0]),  # apart
    ([[0, 0, 10, 10], [10, 0, 20, 10]], [0.0, 0.0]),  # touching edges cover nothing
    ([[0, 0, 10, 10], [5, 0, 15, 10]], [0.5, 0.5]),
    ([[0, 0, 10, 10], [2, 2, 4, 4]], [0.04, 1.0]),  # the small box lies inside the large one
    ([[0, 0, 10, 10], [0, 0, 10, 10]], [1.0, 1.0]),  # a duplicate detection
    ([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 8, 10]], [0.8, 0.5, 1.0]),  # the most covering box counts
    ([[3, 3, 3, 9], [0, 0, 10, 10]], [0.0, 0.0]),  # a box of no area
])
def test_overlap_is_the_largest_share_of_a_box_another_box_covers(boxes, want):
    from pipeline.calibrate import box_overlap

    assert [box_overlap(boxes, r) for r in range(len(boxes))] == pytest.approx(want)


def test_regions_and_relations_carry_their_overlap():
    """Region 1 is half covered by region 2; region 0 is alone. A relation takes the larger of its
    two regions' overlaps."""
    from pipeline.calibrate import region_signals, relation_signals

    regions = Regions.from_boxes([[0, 0, 20, 20], [50, 50, 70, 70], [60, 50, 80, 70]], ["circle", "star", "square"],
                                 scores=[0.9, 0.8, 0.7])
    answers = [{"color": _answer("red"), "caption": _answer("a red circle")}, {"shape": _answer("star")},
               {"material": _answer("wood")}]
    relations = [RelationAnswer(0, "left of", 1, "", "ok", -0.2, -0.4), RelationAnswer(0, "above", 0, "", "ok", -0.2, -0.4)]
    result = ImageResult("img.png", "img.png", "ok", width=100, height=100, regions=regions, answers=answers,
                         relations=relations)
    assert {k: f["overlap"] for k, f in region_signals(result, 0).items()} == {"color": 0.0, "caption": 0.0,
                                                                                 "region": 0.0}
    assert {k: f["overlap"] for k, f in region_signals(result, 1).items()} == {"shape": 0.5, "region": 0.5}
    assert [relation_signals(result, rel)["overlap"] for rel in relations] == [0.5, 0.0]
    # a calibration fitted before the signal existed reads only its own signals: it still applies
    from pipeline.calibrate import FEATURES

    older = [f for f in FEATURES if f != "overlap"]
    n = len(older)
    calibration = Calibration({"region": KindCalibrator(older, [0.0] * n, [1.0] * n, [0.1] * n, 0.0)})
    assert 0.0 < calibration.probability("region", region_signals(result, 1)["region"]) < 1.0


def test_a_test_sized_fit_on_the_demo_models_answers_lowers_the_held_out_error(tmp_path_factory):
    """The demo model and detector on 40 unseen scenes: fitted on 70% of the images, checked on the
    other 30%, the calibrated probabilities are better calibrated than exp(mean log-prob)."""
    from detectors import build_detector
    from model.checkpoint import load_model
    from pipeline.stages import PipelineConfig
    from synth.dataset import write_dataset
    from synth.evaluate import read_ground_truth

    folder = write_dataset(tmp_path_factory.mktemp("calibration-world"), range(9_300_000, 9_300_040))
    calibration = calibrate_world(read_ground_truth(folder), load_model("demo"), PipelineConfig(), build_detector("demo"),
                                  holdout=0.3, seed=0)
    checked = calibration.metrics["checked"]
    assert set(checked) >= {"color", "shape", "material", "caption", "relation", "region", "all"}
    assert checked["all"]["ece_after"] < checked["all"]["ece_before"], checked["all"]
    assert checked["all"]["examples"] > 150
    assert set(calibration.metrics["signals_auroc"]["color"]) == {"mean_logprob", "min_logprob", "detector_score",
                                                                  "caption_agrees", "label_agrees", "geometry_agrees",
                                                                  "overlap", "jitter_agrees"}


def test_jitter_agreement_asks_again_about_moved_boxes(tmp_path_factory):
    """Without noise the second pass asks exactly the same questions about exactly the same boxes,
    so every answer agrees; with noise some answers of the demo model change, and the change is a
    signal of a wrong answer."""
    from detectors import build_detector
    from model.checkpoint import load_model
    from synth.calibrate import jitter_agreement
    from pipeline.flow import annotate
    from pipeline.stages import PipelineConfig
    from synth.dataset import write_dataset
    from synth.evaluate import read_ground_truth

    truths = read_ground_truth(write_dataset(tmp_path_factory.mktemp("jitter-world"), range(9_300_100, 9_300_106)))
    model, config = load_model("demo"), PipelineConfig()
    results = annotate([t.image for t in truths], build_detector("demo"), model, config)
    same = jitter_agreement(results, model, config, jitter=0.0)
    values = [v for agree in same for r, answers in agree.items() if r != "relations" for v in answers.values()]
    assert values and all(v == 1.0 for v in values)
    assert all(v == 1.0 for agree in same for v in agree["relations"].values())
    moved = jitter_agreement(results, model, config, jitter=0.3)
    values = [v for agree in moved for r, answers in agree.items() if r != "relations" for v in answers.values()]
    assert 0.0 in values and 1.0 in values
    examples = world_examples(results, truths, jitter=moved)
    assert {e.features["jitter_agrees"] for e in examples if e.kind == "color"} <= {0.0, 1.0}


class _Stated:
    """A stand-in calibration whose probability is the example's own ``p`` (hand-built records)."""

    def probability(self, kind, features):
        return features["p"] if kind != "action" else None


def test_thresholds_reach_the_asked_precision_on_validation_answers():
    from pipeline.calibrate import thresholds_for_precision

    def group(kind, p, right, wrong):
        return [Example(kind, {"p": p}, True)] * right + [Example(kind, {"p": p}, False)] * wrong

    color = group("color", 0.2, 0, 4) + group("color", 0.4, 2, 2) + group("color", 0.6, 9, 1) + group("color", 0.8, 10, 0)
    relation = group("relation", 0.3, 1, 9) + group("relation", 0.7, 6, 4) + group("relation", 0.9, 1, 1)
    examples = color + relation + group("action", 0.9, 5, 0)
    # colour: p >= 0.45 keeps 20 answers, 19 right (0.95); p >= 0.25 keeps 24, 21 right (0.875)
    assert thresholds_for_precision(_Stated(), examples, 0.95) == {"color": 0.45, "relation": 0.7}
    assert thresholds_for_precision(_Stated(), examples, 0.99)["color"] == 0.65  # only the 0.8 answers: all right
    assert thresholds_for_precision(_Stated(), examples, 0.85)["color"] == 0.25
    # relation never reaches 0.95: the best precision keeping a tenth of its answers (7 of 12 for any
    # threshold 0.35-0.7, the highest taken; p >= 0.75 keeps 2 of 22, under a tenth); action: no calibrator
    assert "action" not in thresholds_for_precision(_Stated(), examples, 0.95)


def test_region_thresholds_per_class_where_one_class_is_over_trusted():
    """The region probability is fitted on all classes at once: on these validation regions the
    hexagon boxes at 0.8 are right 6 times in 10 while the circles at 0.8 always are. Each class gets
    its own threshold; one that never reaches the precision gets 1.0 (none kept); a class with too
    few examples gets none (the kind's own applies)."""
    from pipeline.calibrate import thresholds_for_precision

    def group(label, p, right, wrong):
        return [Example("region", {"p": p}, True, label)] * right + [Example("region", {"p": p}, False, label)] * wrong

    examples = (group("circle", 0.8, 30, 0) + group("circle", 0.4, 15, 15) + group("hexagon", 0.8, 30, 20)
                + group("hexagon", 0.95, 6, 4) + group("star", 0.8, 10, 0))
    got = thresholds_for_precision(_Stated(), examples, 0.95, per_class=True, min_class_examples=20)
    assert got["region:circle"] == 0.45  # keeps the 30 circles at 0.8, all right
    assert got["region:hexagon"] == 1.0  # 60 % right at best: no threshold reaches 0.95
    assert "region:star" not in got  # 10 examples: too few for a class of its own
    # all classes pooled, 0.95 is never reached: p >= 0.45 up to 0.8 keeps 100 regions, 76 right (the
    # best precision keeping a tenth of them, the highest such threshold taken); p >= 0.85 keeps 10 of 130
    assert got["region"] == 0.8
    assert set(thresholds_for_precision(_Stated(), examples, 0.95, per_class=True)) == {
        "region", "region:circle", "region:hexagon"}
    assert set(thresholds_for_precision(_Stated(), examples, 0.95)) == {"region"}  # one per kind unless asked


def test_isotonic_regression_pools_adjacent_violators_by_hand():
    from pipeline.calibrate import isotonic

    xs, ys = isotonic(np.array([4.0, 1.0, 3.0, 2.0]), np.array([1, 1, 1, 0]))
    # sorted: (1, 1) (2, 0) violate -> one block of rate 0.5 at 1.5; (3, 1) (4, 1) -> rate 1 at 3.5
    assert xs == [1.5, 3.5] and ys == [0.5, 1 - 1e-3]


def test_the_isotonic_step_fixes_what_the_logistic_curve_cannot_follow(tmp_path):
    """Right answers 60 % of the time below a log-prob of -1, 97 % above it: a step no logistic curve
    fits; the isotonic correction does, on answers it was not fitted on."""
    rng = np.random.default_rng(0)

    def examples(n):
        lp = rng.uniform(-3, 0, n)
        right = rng.random(n) < np.where(lp < -1, 0.6, 0.97)
        return [Example("shape", {"mean_logprob": float(v), "min_logprob": float(v), "detector_score": 0.9,
                                  "caption_agrees": 0.5, "label_agrees": 0.5, "geometry_agrees": 0.5, "overlap": 0.0,
                           "jitter_agrees": 0.5}, bool(r))
                for v, r in zip(lp, right)]

    fit, check = examples(6000), examples(6000)
    plain = Calibration({"shape": KindCalibrator.fit(fit, isotonic_from=10 ** 9)})
    corrected = Calibration.fit(fit)
    assert corrected.kinds["shape"].iso_x and not plain.kinds["shape"].iso_x
    before, after = evaluate(plain, check)["shape"]["ece_after"], evaluate(corrected, check)["shape"]["ece_after"]
    assert before > 0.05 and after < 0.02
    # too few examples of a kind for the isotonic step: the logistic fit alone
    assert not Calibration.fit(fit[:100]).kinds["shape"].iso_x
    # saved and loaded with the correction; a version-1 file (no correction) still reads
    loaded = Calibration.load(corrected.save(tmp_path / "c.json"))
    assert loaded.probability("shape", fit[0].features) == corrected.probability("shape", fit[0].features)
    data = json.loads((tmp_path / "c.json").read_text())
    data["format_version"] = 1
    for kind in data["kinds"].values():
        del kind["iso_x"], kind["iso_y"]
    (tmp_path / "v1.json").write_text(json.dumps(data))
    assert Calibration.load(tmp_path / "v1.json").probability("shape", fit[0].features) == pytest.approx(
        plain.probability("shape", fit[0].features), abs=1e-9)


def test_a_calibrated_probability_is_never_exactly_0_or_1():
    """So that a threshold of 1.0 (a class never precise enough) keeps nothing, even where the
    logistic curve saturates in floating point."""
    from pipeline.calibrate import FEATURES

    n = len(FEATURES)
    features = {f: 0.0 for f in FEATURES}
    sure = KindCalibrator(list(FEATURES), [0.0] * n, [1.0] * n, [0.0] * n, 60.0)
    never = KindCalibrator(list(FEATURES), [0.0] * n, [1.0] * n, [0.0] * n, -60.0)
    assert 0.99 < sure.probability(features) < 1.0 and 0.0 < never.probability(features) < 0.01
