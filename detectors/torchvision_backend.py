"""torchvision's detection models as roiscribe detectors, from a local state dict.

The model is built with ``weights=None, weights_backbone=None`` (nothing to download) and the
number of classes read off the checkpoint's classifier, so a fine-tuned checkpoint with any number
of classes loads without the user restating it. Each family keeps its classifier under its own
key and predicts ``anchors x classes`` channels there; ``ARCHS`` records both per builder.

Class ids are torchvision's labels as predicted (index 0 is the background slot in every family's
convention), so ``class_names`` is indexed by label and has ``num_classes`` entries.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from detectors.base import batches, check_image
from model.device import resolve_device
from pipeline.records import DecodedImage, Regions

COCO_NUM_CLASSES = 91  # torchvision's COCO label space: 80 classes, background and "N/A" gaps


@dataclass(frozen=True)
class Family:
    """Where a detection family keeps its classifier, and what its builder calls its thresholds."""

    classifier_key: str  # state-dict key whose dim 0 is anchors_per_location * num_classes
    anchors_per_location: int
    score_kwarg: str
    max_det_kwarg: str


_RCNN = Family("roi_heads.box_predictor.cls_score.weight", 1, "box_score_thresh", "box_detections_per_img")
_RETINA = Family("head.classification_head.cls_logits.weight", 9, "score_thresh", "detections_per_img")
_FCOS = Family("head.classification_head.cls_logits.weight", 1, "score_thresh", "detections_per_img")
_SSD = Family("head.classification_head.module_list.0.weight", 4, "score_thresh", "detections_per_img")
_SSDLITE = Family("head.classification_head.module_list.0.1.weight", 6, "score_thresh", "detections_per_img")

ARCHS: dict[str, Family] = {
    "fasterrcnn_resnet50_fpn": _RCNN,
    "fasterrcnn_resnet50_fpn_v2": _RCNN,
    "fasterrcnn_mobilenet_v3_large_fpn": _RCNN,
    "fasterrcnn_mobilenet_v3_large_320_fpn": _RCNN,
    "maskrcnn_resnet50_fpn": _RCNN,  # the masks are ignored; the boxes are as good as Faster R-CNN's
    "maskrcnn_resnet50_fpn_v2": _RCNN,
    "retinanet_resnet50_fpn": _RETINA,
    "retinanet_resnet50_fpn_v2": _RETINA,
    "fcos_resnet50_fpn": _FCOS,
    "ssd300_vgg16": _SSD,
    "ssdlite320_mobilenet_v3_large": _SSDLITE,
}


class TorchvisionDetector:
    """A torchvision detection model (``arch`` from ``ARCHS``) with weights from ``weights_path``.

    ``score_threshold`` is low on purpose: ``pipeline.postprocess`` decides what to keep.
    """

    def __init__(self, arch: str, weights_path: str, device: str = "cpu", score_threshold: float = 0.001,
                 class_names: Sequence[str] | None = None, max_det: int = 300, batch_size: int = 8):
        family = family_of(arch)
        state = load_state_dict(weights_path)
        num_classes = infer_num_classes(arch, state)
        self.name = f"torchvision:{arch}"
        self.device = str(resolve_device(device))
        self.batch_size = batch_size
        self.class_names = default_class_names(num_classes, class_names)
        self.model = _build(arch, num_classes, {family.score_kwarg: score_threshold, family.max_det_kwarg: max_det})
        _check_fits(self.model, state, f"{weights_path!r} does not fit {arch} ({num_classes} classes)")
        self.model.load_state_dict(state, strict=True)
        self.model.eval().to(self.device)

    def detect(self, images: Sequence[DecodedImage]) -> list[Regions]:
        import torch

        out: list[Regions] = []
        with torch.inference_mode():
            for batch in batches(list(images), self.batch_size):
                # (3, H, W) float in [0, 1], RGB: what every torchvision detector's transform expects.
                # torch.tensor copies, so read-only arrays (np.asarray of a PIL image) are fine.
                tensors = [torch.tensor(check_image(im), device=self.device).permute(2, 0, 1).float().div_(255)
                           for im in batch]
                out.extend(self._regions(pred) for pred in self.model(tensors))
        return out

    def _regions(self, pred: Mapping) -> Regions:
        ids = pred["labels"].cpu().numpy().astype(np.int64)
        return Regions(pred["boxes"].cpu().numpy(), pred["scores"].cpu().numpy(), ids,
                       [self.class_names[i] for i in ids], self.name)


def family_of(arch: str) -> Family:
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision detection arch {arch!r}; expected one of: {', '.join(ARCHS)}")
    return ARCHS[arch]


def infer_num_classes(arch: str, state: Mapping) -> int:
    """The number of classes a checkpoint of ``arch`` was trained with, from its classifier's shape."""
    family = family_of(arch)
    if family.classifier_key not in state:
        raise ValueError(f"checkpoint has no {family.classifier_key!r}, so it is not a {arch} state dict "
                         f"(its first keys: {list(state)[:3]}); check the arch name matches the checkpoint")
    channels = int(state[family.classifier_key].shape[0])
    if channels % family.anchors_per_location:
        raise ValueError(f"{family.classifier_key} has {channels} outputs, not a multiple of {arch}'s "
                         f"{family.anchors_per_location} anchors per location; is the arch right?")
    return channels // family.anchors_per_location


def default_class_names(num_classes: int, given: Sequence[str] | None = None) -> list[str]:
    """``given`` (one per label), else torchvision's COCO names for 91 classes, else ``class{i}``."""
    if given is not None:
        if len(given) != num_classes:
            raise ValueError(f"class_names has {len(given)} names but the checkpoint has {num_classes} classes "
                             f"(labels 0..{num_classes - 1}, 0 being background); give one name per label")
        return [str(c) for c in given]
    if num_classes == COCO_NUM_CLASSES:
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

        return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])  # shipped, no download
    return [f"class{i}" for i in range(num_classes)]


def load_state_dict(path: str) -> dict:
    """A state dict from a local ``.safetensors``, or a torch file loaded with ``weights_only=True``.

    Training scripts (torchvision's references among them) save ``{"model": state_dict, ...,
    "args": Namespace}``; the weights are taken from "model", and a ``Namespace`` (plain data) is
    allowed through the weights-only unpickler. A ``module.`` prefix from DataParallel is removed.
    """
    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no torchvision checkpoint at {str(file)!r}; roiscribe never downloads weights, "
                                f"so pass the path of a local state dict (.pth/.pt or .safetensors)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{str(file)!r} holds a {type(state).__name__}, expected a state dict (name -> tensor); "
                         f"save one with torch.save(model.state_dict(), path)")
    if state and all(k.startswith("module.") for k in state):
        state = type(state)((k[len("module."):], v) for k, v in state.items())
    return state


def _check_fits(model, state: Mapping, what: str) -> None:
    """Raise a short error when ``state`` does not match ``model`` key for key and shape for shape.

    torch's own message lists every key (hundreds, for a v1 checkpoint given a _v2 arch); this one
    counts them and shows a few. BatchNorm's ``num_batches_tracked`` may be missing: checkpoints of
    torchvision's pretrained models come from FrozenBatchNorm2d, which has none, and torch fills it.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("keys of another shape", resized)) if keys]
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}. Check that the arch names the builder the "
                         f"checkpoint was trained with (v1 and _v2 builders differ)")


def _build(arch: str, num_classes: int, thresholds: dict):
    import torchvision.models.detection as detection

    builder = getattr(detection, arch)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, **thresholds)
