"""Build a detector from a short spec string, the form a CLI flag or a job config carries.

Spec syntax: ``KIND[:ARGS]``, split on the first colon only so that paths may hold colons.

==============================  ============================================================
``demo``                        the shipped demo detector (``demo/detector.pt``, ultralytics)
``yolo:PATH.pt``                an ultralytics checkpoint on local disk
``yolo:NAME_OR_PATH.yaml``      an ultralytics model YAML (e.g. ``yolov8n.yaml``), random weights
``torchvision:ARCH:PATH``       a torchvision detection builder + a local state dict
                                (e.g. ``torchvision:fasterrcnn_resnet50_fpn:weights/frcnn.pth``)
``given``                       boxes passed by the caller: ``build_detector("given", mapping=...)``
``given:coco:PATH.json``        boxes from a COCO json
``given:labelstudio:PATH.json`` boxes from a Label Studio JSON export
==============================  ============================================================

Extra keyword arguments go to the detector's constructor (``imgsz=``, ``class_names=``, ...).
``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (a GPU when one is visible); given
boxes ignore it. ``DETECTORS`` is the plain registry: a new kind is one function that takes the
text after ``KIND:`` (or ``None``), the device and the keyword arguments.
"""

from __future__ import annotations

from typing import Callable

from detectors.base import Detector


def _yolo(args: str | None, device: str, **kwargs) -> Detector:
    if not args:
        raise ValueError("detector spec 'yolo' needs weights: 'yolo:PATH.pt' or 'yolo:MODEL.yaml' "
                         "(e.g. 'yolo:yolov8n.yaml')")
    from detectors.ultralytics_backend import UltralyticsDetector

    return UltralyticsDetector(args, device=device, **kwargs)


def _torchvision(args: str | None, device: str, **kwargs) -> Detector:
    arch, sep, path = (args or "").partition(":")
    if not arch or not sep or not path:
        raise ValueError(f"detector spec 'torchvision:{args or ''}' is incomplete; expected "
                         f"'torchvision:ARCH:PATH', e.g. 'torchvision:fasterrcnn_resnet50_fpn:weights/frcnn.pth'")
    from detectors.torchvision_backend import TorchvisionDetector

    return TorchvisionDetector(arch, path, device=device, **kwargs)


_GIVEN_FORMATS = ("coco", "labelstudio")


def _given(args: str | None, device: str, **kwargs) -> Detector:
    from detectors.given import GivenBoxes

    if not args:
        return GivenBoxes(kwargs.pop("mapping", None), **kwargs)
    fmt, sep, path = args.partition(":")
    if fmt not in _GIVEN_FORMATS or not sep or not path:
        raise ValueError(f"detector spec 'given:{args}' is not understood; expected 'given' (boxes passed as "
                         f"mapping=...), 'given:coco:PATH.json' or 'given:labelstudio:PATH.json'")
    if fmt == "coco":
        return GivenBoxes.from_coco(path, **kwargs)
    return GivenBoxes.from_label_studio(path, **kwargs)


def _demo(args: str | None, device: str, **kwargs) -> Detector:
    if args:
        raise ValueError(f"detector spec 'demo' takes no arguments, got 'demo:{args}'")
    import demo

    return _yolo(str(demo.detector_path()), device, **kwargs)


DETECTORS: dict[str, Callable[..., Detector]] = {
    "demo": _demo,
    "yolo": _yolo,
    "torchvision": _torchvision,
    "given": _given,
}


def build_detector(spec: str, device: str = "cpu", **kwargs) -> Detector:
    """The detector a spec string names (see the module docstring for the syntax)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"detector spec must be a non-empty string like 'yolo:yolov8n.yaml', got {spec!r}")
    kind, sep, args = spec.strip().partition(":")
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector kind {kind!r} in spec {spec!r}; valid kinds: {', '.join(DETECTORS)} "
                         f"(e.g. 'yolo:PATH.pt', 'torchvision:ARCH:PATH', 'given:coco:PATH.json')")
    return DETECTORS[kind](args if sep else None, device, **kwargs)
