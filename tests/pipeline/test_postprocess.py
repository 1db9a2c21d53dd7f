"""Every post-processing rule on hand-made boxes, with exact outputs and exact drop counts."""

from dataclasses import replace

import numpy as np
import pytest

from pipeline.postprocess import PostProcess, postprocess
from pipeline.records import Regions

W, H = 100, 80
NONE = PostProcess(score_threshold=0.0, nms_iou=None, duplicate_iou=None, max_regions=None)  # every rule off


def regions(boxes, scores=None, names=None, dropped=None):
    n = len(boxes)
    names = names if names is not None else ["a"] * n
    scores = scores if scores is not None else [0.9] * n
    ids = [ord(c[0]) if c else -1 for c in names]
    return Regions(np.array(boxes, dtype=np.float64), scores, ids, names, "test", dict(dropped or {}))


def run(r, **cfg):
    return postprocess(r, W, H, replace(NONE, **cfg))


def test_all_rules_off_keeps_everything_sorted_by_score():
    r = regions([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], scores=[0.2, 0.9, 0.5])
    out = run(r)
    np.testing.assert_array_equal(out.scores, np.float32([0.9, 0.5, 0.2]))
    np.testing.assert_array_equal(out.boxes, np.float32([[5, 5, 20, 20], [1, 1, 2, 2], [0, 0, 10, 10]]))
    assert out.dropped == {} and out.detector == "test"


def test_nan_and_inf_in_boxes_or_scores_are_invalid():
    r = regions([[0, 0, 10, 10], [np.nan, 0, 10, 10], [0, 0, np.inf, 10], [0, 0, 5, 5]],
                scores=[0.5, 0.5, 0.5, np.nan])
    out = run(r)
    np.testing.assert_array_equal(out.boxes, np.float32([[0, 0, 10, 10]]))
    assert out.dropped == {"invalid": 3}


def test_inverted_boxes_are_counted_apart_from_degenerate_ones():
    r = regions([[10, 0, 5, 10], [0, 10, 10, 5], [3, 3, 3, 9], [3, 3, 9, 3], [1, 1, 4, 4]])
    out = run(r)
    np.testing.assert_array_equal(out.boxes, np.float32([[1, 1, 4, 4]]))
    assert out.dropped == {"inverted": 2, "degenerate": 2}


def test_clipping_to_the_image_and_boxes_that_clip_to_nothing():
    r = regions([[-10, -5, 50, 200], [90, 70, 150, 120], [120, 10, 140, 30], [10, -20, 20, 0]])
    out = run(r)
    np.testing.assert_array_equal(out.boxes, np.float32([[0, 0, 50, 80], [90, 70, 100, 80]]))
    assert out.dropped == {"degenerate": 2}  # right of the image; above it
    unclipped = run(r, clip=False)
    assert len(unclipped) == 4 and unclipped.boxes[0].tolist() == [-10, -5, 50, 200]


def test_score_threshold_keeps_scores_equal_to_it():
    r = regions([[0, 0, 5, 5]] * 4, scores=[0.1, 0.25, 0.3, 0.2499])
    out = run(r, score_threshold=0.25)
    np.testing.assert_array_equal(out.scores, np.float32([0.3, 0.25]))
    assert out.dropped == {"low_score": 2}


def test_allow_and_deny_lists_match_class_names():
    r = regions([[0, 0, 5, 5]] * 5, scores=[0.5, 0.4, 0.3, 0.2, 0.1], names=["cat", "dog", "car", "cat", ""])
    allowed = run(r, allow_classes=("cat", "dog"))
    assert allowed.class_names == ["cat", "dog", "cat"] and allowed.dropped == {"class_filtered": 2}
    denied = run(r, deny_classes=("cat",))
    assert denied.class_names == ["dog", "car", ""] and denied.dropped == {"class_filtered": 2}
    both = run(r, allow_classes=["cat", "dog"], deny_classes=["dog"])  # lists become tuples; deny wins
    assert both.class_names == ["cat", "cat"] and both.dropped == {"class_filtered": 3}
    assert PostProcess(allow_classes=["cat"]).allow_classes == ("cat",)


def test_min_area_in_pixels_and_as_a_fraction_of_the_image():
    r = regions([[0, 0, 10, 10], [0, 0, 9, 10], [0, 0, 40, 20], [0, 0, 40, 19.75]])  # 100, 90, 800, 790 px
    by_px = run(r, min_area_px=100)
    np.testing.assert_array_equal(by_px.areas(), np.float32([100, 800, 790]))
    assert by_px.dropped == {"small": 1}
    by_frac = run(r, min_area_frac=0.1)  # 10% of 100 x 80 = 800 px
    np.testing.assert_array_equal(by_frac.areas(), np.float32([800]))
    assert by_frac.dropped == {"small": 3}


def test_min_area_is_measured_after_clipping():
    r = regions([[-90, 0, 10, 10]])  # 1000 px raw, 100 px inside the image
    assert run(r, min_area_px=101).dropped == {"small": 1}


def test_nms_is_class_aware():
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]]  # IoU(0, 1) = 90 / 110
    r = regions(boxes, scores=[0.9, 0.8, 0.7, 0.6], names=["a", "a", "b", "a"])
    out = run(r, nms_iou=0.5)
    assert out.class_names == ["a", "b", "a"] and out.dropped == {"nms": 1}
    np.testing.assert_array_equal(out.boxes, np.float32([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]))
    assert run(r, nms_iou=0.9).dropped == {}  # 0.818 is not above 0.9


def test_a_box_of_another_class_on_the_same_object_is_a_duplicate():
    # IoU(0, 1) = 90 / 110 = 0.818 (classes a, b); IoU(0, 2) = 50 / 150 = 0.33 (class c)
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10], [50, 50, 60, 60]]
    r = regions(boxes, scores=[0.7, 0.9, 0.8, 0.6], names=["a", "b", "c", "a"])
    out = run(r, duplicate_iou=0.8)
    assert out.class_names == ["b", "c", "a"] and out.dropped == {"duplicate": 1}  # the higher score wins
    np.testing.assert_array_equal(out.boxes[0], np.float32([1, 0, 11, 10]))
    assert run(r, duplicate_iou=0.85).dropped == {}
    assert run(r, duplicate_iou=0.3).dropped == {"duplicate": 2}  # box 2 overlaps box 1 by 0.43
    # same-class boxes are NMS's business, counted under their own rule first
    same = regions(boxes[:2], scores=[0.7, 0.9], names=["a", "a"])
    assert run(same, nms_iou=0.7, duplicate_iou=0.7).dropped == {"nms": 1}


def test_duplicate_iou_is_on_by_default_and_checked():
    assert PostProcess().duplicate_iou == 0.8
    with pytest.raises(ValueError, match="duplicate_iou"):
        PostProcess(duplicate_iou=1.5)


def test_nms_between_equal_scores_keeps_the_first_index():
    r = regions([[1, 0, 11, 10], [0, 0, 10, 10], [0, 1, 10, 11]], scores=[0.5, 0.5, 0.5])
    out = run(r, nms_iou=0.5)
    np.testing.assert_array_equal(out.boxes, np.float32([[1, 0, 11, 10]]))
    assert out.dropped == {"nms": 2}


def test_max_regions_keeps_the_highest_scores():
    r = regions([[i, 0, i + 1, 1] for i in range(6)], scores=[0.1, 0.6, 0.3, 0.9, 0.2, 0.5])
    out = run(r, max_regions=3)
    np.testing.assert_array_equal(out.scores, np.float32([0.9, 0.6, 0.5]))
    np.testing.assert_array_equal(out.boxes[:, 0], np.float32([3, 1, 5]))
    assert out.dropped == {"over_max": 3}
    assert len(run(r, max_regions=0)) == 0


def test_equal_scores_keep_their_original_order():
    r = regions([[i, 0, i + 1, 1] for i in range(5)], scores=[0.5, 0.7, 0.5, 0.7, 0.5])
    out = run(r)
    np.testing.assert_array_equal(out.boxes[:, 0], np.float32([1, 3, 0, 2, 4]))
    assert out.class_ids.tolist() == [ord("a")] * 5


def test_counts_accumulate_and_the_input_is_untouched():
    r = regions([[0, 0, 10, 10], [np.nan, 0, 1, 1], [0, 0, 1, 1]], scores=[0.9, 0.9, 0.1],
                dropped={"invalid": 2, "upstream": 1})
    before = r.boxes.copy()
    out = run(r, score_threshold=0.5)
    assert out.dropped == {"invalid": 3, "upstream": 1, "low_score": 1}
    assert r.dropped == {"invalid": 2, "upstream": 1}
    np.testing.assert_array_equal(r.boxes, before)


def test_default_config_applies_every_rule_in_order():
    boxes = ([[np.nan, 0, 1, 1], [5, 5, 1, 1], [200, 0, 300, 10], [0, 0, 10, 10], [0, 0, 1, 1],
              [0, 0, 10, 10], [1, 0, 11, 10]] + [[20 + i, 20, 21 + i, 21] for i in range(60)])
    scores = [0.9, 0.9, 0.9, 0.1, 0.9, 0.99, 0.98] + [0.5 - i * 0.001 for i in range(60)]
    names = ["a", "a", "a", "a", "skip", "a", "a"] + ["a"] * 60
    out = postprocess(regions(boxes, scores, names), W, H, PostProcess(deny_classes=("skip",)))
    assert out.dropped == {"invalid": 1, "inverted": 1, "degenerate": 1, "low_score": 1,
                           "class_filtered": 1, "nms": 1, "over_max": 11}
    assert len(out) == 50 and out.scores[0] == np.float32(0.99) and out.scores[1] == np.float32(0.5)


def test_empty_regions_pass_through():
    out = postprocess(Regions.empty("x"), W, H, PostProcess())
    assert len(out) == 0 and out.detector == "x" and out.dropped == {}


@pytest.mark.parametrize("kwargs, fragment", [
    ({"nms_iou": 0.0}, "nms_iou"),
    ({"nms_iou": 1.5}, "nms_iou"),
    ({"score_threshold": float("nan")}, "score_threshold"),
    ({"min_area_frac": 2.0}, "min_area_frac"),
    ({"max_regions": -1}, "max_regions"),
])
def test_bad_configs_say_which_field(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        PostProcess(**kwargs)


def test_a_bare_string_class_list_is_refused():
    with pytest.raises(TypeError, match=r"\('cat',\)"):
        PostProcess(allow_classes="cat")


def test_image_size_must_be_positive():
    with pytest.raises(ValueError, match="width=0"):
        postprocess(Regions.empty(), 0, 10, PostProcess())
