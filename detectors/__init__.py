"""Box proposers behind one small interface (ultralytics, torchvision, given boxes).

``build_detector("yolo:yolov8n.yaml")`` and friends (spec syntax in ``detectors.registry``) give a
``Detector``: ``detect(images) -> list[Regions]``, raw boxes in pixels of the original image.
``postprocess(regions, width, height, PostProcess(...))`` then applies one set of clean-up rules
to every detector's output. The adapter modules import ultralytics or torchvision's detection
models only when a detector is built, so importing this package stays light.
"""

from detectors.base import Detector, resolve_device
from detectors.given import GivenBoxes
from detectors.postprocess import PostProcess, postprocess
from detectors.registry import DETECTORS, build_detector
from detectors.torchvision_backend import TorchvisionDetector
from detectors.ultralytics_backend import UltralyticsDetector

__all__ = [
    "DETECTORS", "Detector", "GivenBoxes", "PostProcess", "TorchvisionDetector", "UltralyticsDetector",
    "build_detector", "postprocess", "resolve_device",
]
