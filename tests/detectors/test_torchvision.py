"""torchvision detectors built from local state dicts: classes, names, loading forms, outputs."""

import argparse
import warnings

import numpy as np
import pytest
import torch
import torchvision.models.detection as detection

from detectors import TorchvisionDetector, build_detector
from detectors.torchvision_backend import ARCHS, infer_num_classes, load_state_dict
from pipeline.records import DecodedImage

ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the smallest torchvision detector: fast on a CPU


def small_model(num_classes):
    return getattr(detection, ARCH)(weights=None, weights_backbone=None, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def five_class_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = small_model(5)
    path = tmp_path_factory.mktemp("tv") / "frcnn5.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("arch", list(ARCHS))
def test_num_classes_is_read_from_every_family_classifier(arch):
    with torch.device("meta"):  # shapes only: builds in milliseconds, allocates nothing
        model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=7)
    assert infer_num_classes(arch, model.state_dict()) == 7


@pytest.fixture(scope="module")
def frcnn(five_class_checkpoint):
    return build_detector(f"torchvision:{ARCH}:{five_class_checkpoint[1]}", score_threshold=0.0, batch_size=2)


def test_spec_builds_and_detects_like_the_torchvision_model(frcnn, five_class_checkpoint, bus):
    model, _ = five_class_checkpoint
    assert isinstance(frcnn, TorchvisionDetector) and frcnn.name == f"torchvision:{ARCH}"
    assert frcnn.class_names == ["class0", "class1", "class2", "class3", "class4"]
    small = DecodedImage("small", "small.png", bus.array[::8, ::8].copy())  # 102 x 135
    (regions,) = frcnn.detect([small])
    model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 300  # as the detector
    with torch.inference_mode():
        (expected,) = model([torch.from_numpy(small.array).permute(2, 0, 1).float() / 255])
    assert len(regions) == len(expected["boxes"]) > 0
    np.testing.assert_allclose(regions.boxes, expected["boxes"].numpy(), atol=1e-4)
    np.testing.assert_array_equal(regions.class_ids, expected["labels"].numpy())
    assert regions.class_names == [f"class{i}" for i in regions.class_ids]
    assert regions.detector == frcnn.name
    assert (regions.boxes[:, 2] <= small.width).all() and (regions.boxes[:, 3] <= small.height).all()


def test_a_batch_gives_one_regions_per_image(frcnn, rng_image):
    images = [DecodedImage(str(i), "", rng_image(40, 60, seed=i)) for i in range(3)]  # batches of 2 and 1
    images[0].array.flags.writeable = False  # as np.asarray(PIL image) gives: must not warn or fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = frcnn.detect(images)
    assert len(out) == 3 and all(r.detector == frcnn.name and len(r) > 0 for r in out)
    assert frcnn.detect([]) == []


def test_given_class_names_must_match_the_checkpoint(five_class_checkpoint):
    path = str(five_class_checkpoint[1])
    names = ["__background__", "cat", "dog", "car", "bus"]
    assert TorchvisionDetector(ARCH, path, class_names=names).class_names == names
    with pytest.raises(ValueError, match="4 names but the checkpoint has 5 classes"):
        TorchvisionDetector(ARCH, path, class_names=names[1:])


def test_91_classes_get_the_coco_names(tmp_path):
    path = tmp_path / "coco.pth"
    torch.save(small_model(91).state_dict(), path)
    det = TorchvisionDetector(ARCH, str(path))
    assert len(det.class_names) == 91
    assert det.class_names[:3] == ["__background__", "person", "bicycle"] and det.class_names[90] == "toothbrush"


def test_training_checkpoints_safetensors_and_dataparallel_prefixes(five_class_checkpoint, tmp_path):
    from safetensors.torch import save_file

    model, _ = five_class_checkpoint
    state = model.state_dict()
    wrapped = tmp_path / "checkpoint.pth"  # the layout of torchvision's reference train.py
    torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.02)}, wrapped)
    prefixed = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    # Pretrained-style weights come from FrozenBatchNorm2d, which has no num_batches_tracked.
    frozen_bn = tmp_path / "frozen.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}, frozen_bn)
    for path in (wrapped, prefixed, frozen_bn):
        loaded = TorchvisionDetector(ARCH, str(path)).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.endswith("num_batches_tracked"))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": Evil(str(marker))}, path)
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        load_state_dict(str(path))
    assert not marker.exists()


class Evil:
    """Unpickling this with full pickle would create a file: weights-only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_errors_name_what_was_expected(tmp_path, five_class_checkpoint):
    with pytest.raises(ValueError, match="expected one of: fasterrcnn_resnet50_fpn, .*ssdlite320"):
        TorchvisionDetector("yolo_v9", str(five_class_checkpoint[1]))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TorchvisionDetector(ARCH, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="head.classification_head.cls_logits.weight.*arch name"):
        TorchvisionDetector("retinanet_resnet50_fpn", str(five_class_checkpoint[1]))
    with pytest.raises(ValueError, match="does not fit fasterrcnn_resnet50_fpn .5 classes.*trained with"):
        TorchvisionDetector("fasterrcnn_resnet50_fpn", str(five_class_checkpoint[1]))  # same classifier key
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_state_dict(str(tmp_path / "list.pth"))
