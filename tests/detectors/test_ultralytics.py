"""Ultralytics YOLO through roiscribe: offline, RGB in, original-image pixels out, safe .pt loading.

The model is built from ``yolov8n.yaml`` with random weights (nothing can be downloaded here), so
its scores are tiny (~1e-4): ``conf=0.0`` keeps its ``max_det`` best boxes.
"""

import os

import numpy as np
import pytest
import torch

from detectors import UltralyticsDetector, build_detector
from pipeline.postprocess import PostProcess, postprocess
from detectors.ultralytics_backend import _class_names, _roiscribe_config_dir

MAX_DET = 50


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    return build_detector("yolo:yolov8n.yaml", conf=0.0, max_det=MAX_DET)


@pytest.fixture(scope="module")
def raw(yolo, bus, zidane):
    return yolo.detect([bus, zidane])


def test_offline_settings_are_in_place(yolo):
    import ultralytics.utils as uu

    # setdefault: a user's own values win, so only check that each variable is set.
    for name in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_VERBOSE", "ULTRALYTICS_SAFE_LOAD", "YOLO_CONFIG_DIR"):
        assert name in os.environ
    assert not uu.is_online()


def test_the_config_dir_holds_the_fonts_ultralytics_would_download(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = _roiscribe_config_dir()
    assert root == tmp_path / "roiscribe" / "ultralytics"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        assert (root / "Ultralytics" / name).stat().st_size > 100_000


def test_one_regions_per_image_in_original_pixels(yolo, raw, bus, zidane):
    assert isinstance(yolo, UltralyticsDetector) and yolo.name == "yolo:yolov8n.yaml"
    assert [len(r) for r in raw] == [MAX_DET, MAX_DET]
    for regions, image in zip(raw, (bus, zidane)):
        assert regions.detector == "yolo:yolov8n.yaml"
        assert regions.class_names == [yolo.class_names[i] for i in regions.class_ids]
        kept = postprocess(regions, image.width, image.height, PostProcess(score_threshold=0.0, nms_iou=None))
        assert (kept.boxes >= 0).all()
        assert (kept.boxes[:, [0, 2]] <= image.width).all() and (kept.boxes[:, [1, 3]] <= image.height).all()
    assert raw[0].boxes[:, 3].max() > 640  # impossible in the 640-px letterbox: boxes were scaled back
    assert raw[1].boxes[:, 2].max() > 640


def test_class_names_are_coco_for_a_yaml_model(yolo):
    assert len(yolo.class_names) == 80
    assert yolo.class_names[:3] == ["person", "bicycle", "car"] and yolo.class_names[79] == "toothbrush"


def test_batched_equals_one_at_a_time(yolo, raw, bus, zidane):
    for alone, together in zip(yolo.detect([bus]) + yolo.detect([zidane]), raw):
        np.testing.assert_allclose(alone.boxes, together.boxes, atol=1e-2)
        np.testing.assert_allclose(alone.scores, together.scores, rtol=1e-4)


def test_rgb_arrays_give_what_ultralytics_gives_for_the_file(yolo, raw, assets):
    # ultralytics reads a file with OpenCV (BGR); our arrays are RGB: same boxes means we converted.
    (direct,) = yolo.model.predict(str(assets / "bus.jpg"), device="cpu", **yolo.predict_args)
    np.testing.assert_allclose(raw[0].boxes, direct.boxes.xyxy.numpy(), atol=1e-2)
    np.testing.assert_allclose(raw[0].scores, direct.boxes.conf.numpy(), rtol=1e-4)


def test_pt_round_trip_with_safe_loading(tmp_path, bus):
    from ultralytics import YOLO

    torch.manual_seed(1)
    source = YOLO("yolov8n.yaml")
    source.model.half().float()  # the file stores fp16: round first so both models hold the same weights
    path = tmp_path / "x.pt"
    source.save(path)
    loaded = build_detector(f"yolo:{path}", conf=0.0, max_det=MAX_DET)
    assert loaded.name == "yolo:x.pt" and loaded.class_names[0] == "person"
    (expected,) = source.predict(np.ascontiguousarray(bus.array[:, :, ::-1]), device="cpu", **loaded.predict_args)
    (got,) = loaded.detect([bus])
    np.testing.assert_allclose(got.boxes, expected.boxes.xyxy.numpy(), atol=1e-2)


class Evil:
    """Unpickling this with full pickle would create a file: safe loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pt_with_foreign_code_is_refused(yolo, tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"model": Evil(str(marker)), "train_args": {}}, path)
    with pytest.raises(TypeError, match="outside the supported"):
        build_detector(f"yolo:{path}")
    assert not marker.exists()


def test_missing_or_unsupported_weights(yolo, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_detector(f"yolo:{tmp_path / 'missing.pt'}")
    with pytest.raises(FileNotFoundError):
        build_detector("yolo:no_such_model_v99.yaml")
    with pytest.raises(ValueError, match=r"\.pt checkpoint or a model \.yaml"):
        build_detector(f"yolo:{tmp_path / 'model.onnx'}")
    with pytest.raises(ValueError, match="'classify' model; roiscribe takes boxes from detect, segment, pose"):
        build_detector("yolo:yolov8n-cls.yaml")


def test_class_names_override_and_placeholders():
    assert _class_names({0: "a", 1: "b"}, None) == ["a", "b"]
    assert _class_names({0: "0", 1: "1"}, None) == ["0", "1"]  # not the COCO layout: kept as is
    assert _class_names({0: "0", 1: "1"}, ["cat", "dog"]) == ["cat", "dog"]
    with pytest.raises(ValueError, match="1 names but the model predicts 2"):
        _class_names({0: "0", 1: "1"}, ["cat"])


def test_images_must_be_rgb_uint8(yolo, bus):
    from pipeline.records import DecodedImage

    with pytest.raises(ValueError, match="RGB uint8"):
        yolo.detect([DecodedImage("g", "", bus.array[:, :, 0])])
    assert yolo.detect([]) == []
