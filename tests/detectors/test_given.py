"""Given boxes: from the caller, from a COCO json, from a Label Studio export."""

import json

import numpy as np
import pytest

from detectors.given import GivenBoxes
from pipeline.records import DecodedImage, Regions


def image(image_id, uri="", w=40, h=30):
    return DecodedImage(image_id, uri, np.zeros((h, w, 3), np.uint8))


def test_boxes_from_the_caller_by_id_uri_and_file_name():
    given = GivenBoxes({
        "img-1": Regions.from_boxes([[1, 2, 3, 4]], ["cat"]),
        "/data/b.png": Regions.from_boxes([[5, 6, 7, 8], [0, 0, 9, 9]]),
        "c.jpg": Regions.from_boxes([[2, 2, 4, 4]], ["dog"]),
    })
    out = given.detect([image("img-1"), image("x", "/data/b.png"), image("y", "s3://bucket/c.jpg"),
                        image("z", "q.jpg")])
    assert [len(r) for r in out] == [1, 2, 1, 0]
    assert out[0].boxes.tolist() == [[1, 2, 3, 4]] and out[0].class_names == ["cat"]
    assert out[2].class_names == ["dog"] and out[2].scores.tolist() == [1.0]
    assert all(r.detector == "given" for r in out)


def test_returned_regions_are_copies():
    given = GivenBoxes({"a": Regions.from_boxes([[1, 2, 3, 4]])})
    given.detect([image("a")])[0].boxes[0, 0] = 99
    assert given.detect([image("a")])[0].boxes[0, 0] == 1


def test_a_value_that_is_not_regions_is_refused():
    with pytest.raises(TypeError, match="Regions.from_boxes"):
        GivenBoxes({"a": [[1, 2, 3, 4]]})


def write_json(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


COCO = {
    "images": [
        {"id": 1, "file_name": "train/bus.jpg", "width": 810, "height": 1080},
        {"id": 2, "file_name": "val/empty.jpg", "width": 10, "height": 10},
        {"id": 3, "file_name": "a/same.jpg", "width": 10, "height": 10},
        {"id": 4, "file_name": "b/same.jpg", "width": 10, "height": 10},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 6, "name": "bus"}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 6, "bbox": [17.5, 230.0, 784.25, 520.0]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [48, 398, 197, 504], "score": 0.75},
        {"id": 12, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2]},
        {"id": 13, "image_id": 4, "category_id": 1, "bbox": [3, 3, 2, 2]},
    ],
}


def test_coco_xywh_becomes_xyxy_pixels(tmp_path):
    given = GivenBoxes.from_coco(write_json(tmp_path, "coco.json", COCO))
    bus = given.detect([image("1")])[0]
    np.testing.assert_array_equal(bus.boxes, np.float32([[17.5, 230, 801.75, 750], [48, 398, 245, 902]]))
    assert bus.class_names == ["bus", "person"] and bus.class_ids.tolist() == [6, 1]
    assert bus.scores.tolist() == [1.0, 0.75] and bus.detector == "given"


def test_coco_keys_by_file_name_base_name_and_id(tmp_path):
    given = GivenBoxes.from_coco(write_json(tmp_path, "coco.json", COCO))
    found = given.detect([image("?", "train/bus.jpg"), image("?", "/mnt/photos/bus.jpg"), image("1"),
                          image("2"), image("?", "/x/same.jpg"), image("?", "/x/a/same.jpg"), image("3")])
    assert [len(r) for r in found] == [2, 2, 2, 0, 0, 0, 1]  # "same.jpg" names two images: not a key
    assert given.detect([image("?", "b/same.jpg")])[0].boxes.tolist() == [[3, 3, 5, 5]]


def label_studio_result(x, y, w, h, label, rotation=0.0, width=810, height=1080):
    return {"type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def test_label_studio_percent_becomes_pixels(tmp_path):
    tasks = [{"id": 7, "data": {"image": "/data/upload/3/1a2b3c4d-bus.jpg"}, "annotations": [
        {"id": 1, "result": [label_studio_result(10, 20, 50, 25, "bus")]},  # older, replaced by the next
        {"id": 2, "result": [label_studio_result(10, 20, 50, 25, "bus"),
                             label_studio_result(0, 50, 12.5, 40, "person"),
                             {"type": "choices", "value": {"choices": ["day"]}}]},
        {"id": 3, "was_cancelled": True, "result": [label_studio_result(0, 0, 1, 1, "skip")]},
    ]}]
    given = GivenBoxes.from_label_studio(write_json(tmp_path, "ls.json", tasks))
    regions = given.detect([image("task:7")])[0]
    # x: 10% of 810 = 81, width 50% = 405; y: 20% of 1080 = 216, height 25% = 270
    np.testing.assert_array_equal(regions.boxes, np.float32([[81, 216, 486, 486], [0, 540, 101.25, 972]]))
    assert regions.class_names == ["bus", "person"] and regions.class_ids.tolist() == [-1, -1]
    assert regions.scores.tolist() == [1.0, 1.0]


def test_label_studio_rotation_gives_the_pixel_envelope(tmp_path):
    # A 100 x 50 px box turned 90 degrees clockwise about its top-left corner (200, 100).
    tasks = [{"id": 1, "data": {"image": "a.jpg"}, "annotations": [
        {"result": [label_studio_result(20, 20, 10, 10, "x", rotation=90, width=1000, height=500)]}]}]
    regions = GivenBoxes.from_label_studio(write_json(tmp_path, "ls.json", tasks)).detect([image("task:1")])[0]
    np.testing.assert_allclose(regions.boxes, [[150, 100, 200, 200]], atol=1e-4)


def test_label_studio_keys(tmp_path):
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/3/1a2b3c4d-bus.jpg"}, "annotations": [
            {"result": [label_studio_result(0, 0, 10, 10, "bus")]}]},
        {"id": 2, "data": {"photo": "/data/local-files/?d=shots/day%201/z.jpg", "note": 3}, "annotations": [
            {"result": [label_studio_result(0, 0, 10, 10, "z")]}]},
        {"id": 3, "data": {"image": "s3://b/none.jpg"}, "annotations": []},
    ]
    given = GivenBoxes.from_label_studio(write_json(tmp_path, "ls.json", tasks))
    found = given.detect([image("?", "/imgs/bus.jpg"), image("?", "/data/upload/3/1a2b3c4d-bus.jpg"),
                          image("?", "/elsewhere/z.jpg"), image("?", "shots/day 1/z.jpg"), image("task:2"),
                          image("task:3"), image("?", "none.jpg"), image("?", "unknown.jpg"), image("2")])
    assert [r.class_names for r in found] == [["bus"], ["bus"], ["z"], ["z"], ["z"], [], [], [], []]


def test_label_studio_keys_name_exactly_one_task(tmp_path):
    """A bare task id is not a key (an image id "2" is not task 2), and an image that two tasks
    show names neither (their boxes differ): only ``task:ID`` finds each task's own boxes."""
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=a/same.jpg"}, "annotations": [
            {"result": [label_studio_result(0, 0, 10, 10, "one")]}]},
        {"id": 2, "data": {"image": "/data/local-files/?d=a/same.jpg"}, "annotations": [
            {"result": [label_studio_result(0, 0, 10, 10, "two")]}]},
        {"id": 3, "data": {"image": "/data/local-files/?d=a/own.jpg"}, "annotations": [
            {"result": [label_studio_result(0, 0, 10, 10, "three")]}]},
    ]
    given = GivenBoxes.from_label_studio(write_json(tmp_path, "ls.json", tasks))
    found = given.detect([image("task:1", "/root/a/same.jpg"), image("task:2", "/root/a/same.jpg"),
                          image("1", "/root/a/same.jpg"), image("2"), image("?", "/root/a/own.jpg")])
    assert [r.class_names for r in found] == [["one"], ["two"], [], [], ["three"]]


def test_label_studio_without_sizes_says_what_to_do(tmp_path):
    result = label_studio_result(0, 0, 10, 10, "x")
    del result["original_width"]
    tasks = [{"id": 5, "data": {"image": "a.jpg"}, "annotations": [{"result": [result]}]}]
    given = GivenBoxes.from_label_studio(write_json(tmp_path, "ls.json", tasks))  # the file still loads
    with pytest.raises(ValueError, match="task 5.*original_width.*export"):  # the task's error row says why
        given.lookup("task:5")


def test_label_studio_ambiguous_image_field(tmp_path):
    tasks = [{"id": 5, "data": {"a": "x.jpg", "b": "y.jpg"}, "annotations": []}]
    path = write_json(tmp_path, "ls.json", tasks)
    with pytest.raises(ValueError, match="image_key"):
        GivenBoxes.from_label_studio(path)
    assert set(GivenBoxes.from_label_studio(path, image_key="b").mapping) == {"y.jpg", "task:5"}


def test_wrong_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO"):
        GivenBoxes.from_coco(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="list of tasks"):
        GivenBoxes.from_label_studio(write_json(tmp_path, "coco.json", COCO))
    with pytest.raises(ValueError, match="COCO json object"):
        GivenBoxes.from_coco(write_json(tmp_path, "ls.json", []))


def test_a_malformed_label_studio_rectangle_fails_only_its_task():
    import json as _json
    import tempfile

    good = {"id": "g", "type": "rectanglelabels", "original_width": 100, "original_height": 50,
            "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["a"]}}
    no_size = {k: v for k, v in good.items() if k != "original_width"}
    bad_value = {**good, "value": {**good["value"], "x": "left"}}
    tasks = [{"id": 1, "data": {"image": "a.png"}, "annotations": [{"result": [good]}]},
             {"id": 2, "data": {"image": "b.png"}, "annotations": [{"result": [no_size]}]},
             {"id": 3, "data": {"image": "c.png"}, "annotations": [{"result": [bad_value]}]}]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        _json.dump(tasks, f)
    given = GivenBoxes.from_label_studio(f.name)
    assert given.lookup("task:1").boxes.tolist() == [[10.0, 5.0, 30.0, 15.0]]
    for task in (2, 3):
        with pytest.raises(ValueError, match=f"Label Studio task {task}: a rectangle cannot be read"):
            given.lookup(f"task:{task}")
