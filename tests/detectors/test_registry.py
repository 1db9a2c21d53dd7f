"""Spec strings: good ones build the right detector, bad ones say what was expected."""

import ast
import json
from pathlib import Path

import pytest
import torch
import torchvision.models.detection as detection

import detectors
from detectors import DETECTORS, Detector, GivenBoxes, TorchvisionDetector, UltralyticsDetector, build_detector
from model.device import resolve_device
from pipeline.records import Regions


HEAVY = ("ultralytics", "torchvision.models", "safetensors")


def test_heavy_packages_are_imported_only_inside_the_adapters():
    # Module-level statements only: an import inside a function runs when a detector is built.
    for path in Path(detectors.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.startswith(HEAVY)], f"{path.name}:{node.lineno} imports {names}"


def test_valid_kinds_are_a_plain_dict():
    assert set(DETECTORS) == {"demo", "yolo", "torchvision", "given"}
    assert detectors.build_detector is build_detector


def test_given_specs(tmp_path):
    mapping = {"a": Regions.from_boxes([[0, 0, 1, 1]])}
    given = build_detector("given", mapping=mapping)
    assert isinstance(given, GivenBoxes) and isinstance(given, Detector) and given.name == "given"
    assert given.detect([]) == [] and len(given.mapping) == 1
    assert build_detector("given").mapping == {}
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [], "categories": []}))
    assert set(build_detector(f"given:coco:{coco}").mapping) == {"x.jpg", "1"}
    ls = tmp_path / "l.json"
    ls.write_text(json.dumps([{"id": 4, "data": {"image": "y.jpg"}, "annotations": []}]))
    assert set(build_detector(f"given:labelstudio:{ls}").mapping) == {"y.jpg", "task:4"}  # never a bare task id


def test_torchvision_spec_with_a_path_holding_colons(tmp_path):
    folder = tmp_path / "run:3"
    folder.mkdir()
    path = folder / "w.pth"
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.save(getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=3).state_dict(), path)
    det = build_detector(f"torchvision:{arch}:{path}", device="auto")
    assert isinstance(det, TorchvisionDetector) and isinstance(det, Detector)
    assert det.device == str(resolve_device("auto")) and len(det.class_names) == 3


def test_auto_device():
    assert str(resolve_device("auto")) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert str(resolve_device("cuda:1")) == "cuda:1"


@pytest.mark.parametrize("spec, error, message", [
    ("", ValueError, "non-empty string"),
    ("detr:model.pt", ValueError, "unknown detector kind 'detr'.*valid kinds: demo, yolo, torchvision, given"),
    ("yolo", ValueError, "'yolo:PATH.pt' or 'yolo:MODEL.yaml'"),
    ("yolo:", ValueError, "'yolo:PATH.pt' or 'yolo:MODEL.yaml'"),
    ("torchvision", ValueError, "expected 'torchvision:ARCH:PATH'"),
    ("torchvision:fasterrcnn_resnet50_fpn", ValueError, "expected 'torchvision:ARCH:PATH'"),
    ("torchvision:fasterrcnn_resnet50_fpn:", ValueError, "expected 'torchvision:ARCH:PATH'"),
    ("torchvision:nope:w.pth", ValueError, "unknown torchvision detection arch 'nope'; expected one of"),
    ("given:xml:boxes.xml", ValueError, "'given:coco:PATH.json' or 'given:labelstudio:PATH.json'"),
    ("given:coco", ValueError, "'given:coco:PATH.json'"),
    ("given:coco:/no/such.json", FileNotFoundError, "/no/such.json"),
])
def test_bad_specs_say_what_was_expected(spec, error, message):
    with pytest.raises(error, match=message):
        build_detector(spec)


def test_demo_is_the_shipped_detector():
    import demo

    det = build_detector("demo")
    assert isinstance(det, UltralyticsDetector) and det.name == f"yolo:{demo.detector_path().name}"
    with pytest.raises(ValueError, match="takes no arguments"):
        build_detector("demo:x")
