"""Scoring against ground truth (synth/evaluate.py), on hand-made boxes whose scores are worked
out by hand below, then once end to end with the demo models on world scenes."""

import math

import numpy as np
import pytest

from pipeline.records import Answer, ImageResult, Regions, RelationAnswer
from synth.evaluate import GroundTruth, answer_scores, detection_scores, iou_matrix, match

# Boxes are 10 px high, side by side, so each IoU is the overlap of two x-intervals over their union.
BOX = {x: [x, 0, x + 10, 10] for x in range(0, 60)}


def regions(*items):
    """Regions from (x, class, score) triples: box BOX[x]."""
    return Regions.from_boxes([BOX[x] for x, _, _ in items], [c for _, c, _ in items], [s for _, _, s in items],
                              detector="hand")


def truth(*objects, relations=None, image="img.png"):
    """Ground truth from (x, shape[, color, material, size]) tuples."""
    objs = []
    for x, shape, *rest in objects:
        color, material, size = rest or ("red", "metal", "small")
        objs.append({"shape": shape, "color": color, "material": material, "size": size, "box": BOX[x]})
    return GroundTruth(image, 100, 10, objs, relations or {})


def test_iou_of_intervals():
    ious = iou_matrix(np.array([BOX[0]], float), np.array([BOX[0], BOX[1], BOX[6], BOX[10]], float))
    assert ious.shape == (1, 4) and ious[0].tolist() == pytest.approx([1.0, 9 / 11, 4 / 16, 0.0])


def test_match_is_greedy_by_score_at_iou_half():
    gt = np.array([BOX[0], BOX[20]], float)
    # the higher score takes the object even with the lower IoU; the other box is left unmatched
    assert match(regions((1, "", 0.6), (2, "", 0.9)), gt) == {1: 0}
    # IoU 4/16 = 0.25 is no match, whatever the score; IoU 9/11 is
    assert match(regions((26, "", 0.95), (21, "", 0.5)), gt) == {1: 1}
    assert match(regions((26, "", 0.95)), gt, iou=0.2) == {0: 1}
    # a box whose best object is taken falls back to its second best (IoU 0.9 -> 0.89 here)
    overlapping = np.array([[0, 0, 10, 10], [0, 0, 10, 8]], float)
    pred = Regions.from_boxes([[0, 0, 10, 10], [0, 0, 10, 9]], scores=[0.9, 0.8])
    assert match(pred, overlapping) == {0: 0, 1: 1}
    assert match(Regions.empty(), gt) == {} and match(regions((0, "", 1.0)), np.zeros((0, 4))) == {}


def detections():
    """Two images, circles and squares. Worked by hand (IoU 0.5, class-aware):

    image 1, truth: circle @0, square @20
      0.9 circle @0   TP        0.8 circle @1   FP (duplicate)
      0.7 square @20  TP        0.1 square @40  FP (on nothing; below the 0.25 threshold)
    image 2, truth: circle @0, square @20
      0.95 square @0  FP (right place, wrong class)
      0.6 square @22  TP (IoU 8/12)
      0.5 circle @6   FP (IoU 4/16 = 0.25 with the circle)

    circle AP: ranked TP FP FP of 2 objects -> 0.5 x 1 + 0.5 x 0 = 0.5
    square AP: ranked FP TP TP FP of 2 objects -> precision 2/3 up to recall 1 -> 2/3
    at score >= 0.25: TP 3, FP 3 -> precision 0.5, recall 3/4
    """
    preds = [regions((0, "circle", 0.9), (1, "circle", 0.8), (20, "square", 0.7), (40, "square", 0.1)),
             regions((0, "square", 0.95), (22, "square", 0.6), (6, "circle", 0.5))]
    truths = [truth((0, "circle"), (20, "square")), truth((0, "circle"), (20, "square"))]
    return preds, truths


def test_detection_scores_by_hand():
    scores = detection_scores(*detections())
    assert scores["AP50_per_class"] == pytest.approx({"circle": 0.5, "square": 2 / 3})
    assert scores["mAP50"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert (scores["precision"], scores["recall"]) == pytest.approx((0.5, 0.75))
    assert (scores["images"], scores["objects"]) == (2, 4)
    # the threshold only moves precision/recall: at 0.05 the square on nothing counts too
    low = detection_scores(*detections(), score_threshold=0.05)
    assert (low["precision"], low["recall"], low["mAP50"]) == pytest.approx((3 / 7, 0.75, scores["mAP50"]))


def test_detection_scores_perfect_and_empty():
    preds, truths = detections()
    exact = [t.regions for t in truths]
    perfect = detection_scores(exact, truths)
    assert (perfect["mAP50"], perfect["precision"], perfect["recall"]) == (1.0, 1.0, 1.0)
    nothing = detection_scores([Regions.empty(), Regions.empty()], truths)
    assert (nothing["mAP50"], nothing["precision"], nothing["recall"]) == (0.0, 0.0, 0.0)
    # a class the ground truth never has costs precision but has no AP of its own
    odd = detection_scores([exact[0], regions((40, "star", 0.9))], truths)
    assert odd["AP50_per_class"] == {"circle": 0.5, "square": 0.5}
    assert (odd["precision"], odd["recall"]) == pytest.approx((2 / 3, 0.5))
    assert math.isnan(detection_scores([], [])["mAP50"])


def answers(color, shape, material, caption):
    conf = (-0.1, -0.2)
    return {"color": Answer(color, color or "?", "ok", *conf), "shape": Answer(shape, shape or "?", "ok", *conf),
            "material": Answer(material, material or "?", "ok" if material else "unknown", *conf),
            "caption": Answer(caption, caption, "ok", *conf)}


def test_answer_scores_by_hand():
    """Image 1: three objects; the model's regions are in another order, one object is missed and
    one box barely touches it (IoU 2/18) with right answers that must not count. Image 2 failed:
    its object counts wrong on every attribute.

    color 2/4, shape 1/4, material 1/4, size 1/4; relations: 1 of the 2 between matched regions.
    """
    truths = [
        truth((0, "circle", "red", "metal", "small"), (20, "square", "blue", "wood", "large"),
              (40, "star", "green", "stone", "medium"),
              relations={"0,1": "left of", "1,0": "right of", "0,2": "left of", "2,0": "right of"}),
        truth((0, "circle", "red", "metal", "small"), image="broken.png"),
    ]
    found = Regions.from_boxes([BOX[20], BOX[1], BOX[48]])  # object 1, object 0, next to object 2
    ok = ImageResult("a", "img.png", "ok", regions=found, answers=[
        answers("blue", "circle", "wood", "a large blue wood circle"),  # object 1: color, material, size right
        answers("red", "circle", None, "a medium red circle"),  # object 0: color, shape right
        answers("green", "star", "stone", "a medium green stone star"),  # no object (IoU 0.11)
    ], relations=[
        RelationAnswer(1, "left of", 0, "", "ok", -0.1, -0.1),  # object 0 left of object 1: right
        RelationAnswer(0, "left of", 1, "", "ok", -0.1, -0.1),  # object 1 left of object 0: wrong
        RelationAnswer(2, "right of", 1, "", "ok", -0.1, -0.1),  # a region with no object: not scored
    ])
    failed = ImageResult("b", "broken.png", "error", "decode: broken")
    scores = answer_scores([ok, failed], truths)
    assert scores == {"color": 2 / 4, "shape": 1 / 4, "material": 1 / 4, "size": 1 / 4, "relation": 1 / 2,
                      "counts": {"color": 4, "shape": 4, "material": 4, "size": 4, "relation": 2}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from synth.dataset import write_dataset
    from synth.evaluate import read_ground_truth

    folder = write_dataset(tmp_path_factory.mktemp("world"), range(9_100_000, 9_100_003))
    return read_ground_truth(folder)


@pytest.fixture(scope="module")
def demo_model():
    from model.checkpoint import load_model

    return load_model("demo")


def test_evaluate_world_with_exact_boxes_as_the_detector_scores_one(world, demo_model):
    """A 'detector' that returns the ground truth scores 1 everywhere, and the model then answers
    on the same boxes as on the ground truth's own."""
    from detectors.given import GivenBoxes
    from model.config import EngineConfig
    from pipeline.stages import PipelineConfig
    from synth.evaluate import evaluate_world

    config = PipelineConfig(engine=EngineConfig(max_new_tokens=12))
    model_only = evaluate_world(world, demo_model, config)
    assert set(model_only) == {"images", "ground_truth_boxes"} and model_only["images"] == 3
    n_objects = sum(len(t.objects) for t in world)
    assert model_only["ground_truth_boxes"]["counts"]["color"] == n_objects
    assert model_only["ground_truth_boxes"]["color"] >= 0.9  # the demo model's colours are near perfect

    exact = GivenBoxes({t.image: t.regions for t in world})
    scores = evaluate_world(world, demo_model, config, exact)
    d = scores["detector"]
    assert (d["mAP50"], d["precision"], d["recall"], d["objects"]) == (1.0, 1.0, 1.0, n_objects)
    assert scores["detector_boxes"] == scores["ground_truth_boxes"] == model_only["ground_truth_boxes"]


def test_evaluate_world_with_the_demo_detector(world, demo_model):
    from detectors import build_detector
    from model.config import EngineConfig
    from pipeline.stages import PipelineConfig
    from synth.evaluate import evaluate_world

    scores = evaluate_world(world, demo_model, PipelineConfig(engine=EngineConfig(max_new_tokens=12)),
                            build_detector("demo"))
    d = scores["detector"]
    assert d["objects"] == sum(len(t.objects) for t in world) and d["images"] == 3
    assert d["mAP50"] >= 0.8 and d["precision"] >= 0.7 and d["recall"] >= 0.8, d
    assert scores["detector_boxes"]["counts"]["color"] == d["objects"]  # missed objects count, as wrong
    assert scores["detector_boxes"]["color"] >= 0.8
