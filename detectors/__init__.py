"""Box proposers behind one small interface (ultralytics, torchvision, given boxes).

``build_detector("yolo:yolov8n.yaml")`` and friends (spec syntax in ``detectors.registry``; ``demo``
is the shipped detector) give a ``Detector``: ``detect(images) -> list[Regions]``, raw boxes in
pixels of the original image. The pipeline's detect stage then cleans every detector's output up
with the same rules (``pipeline.postprocess``). The adapter modules import ultralytics or
torchvision's detection models only when a detector is built, so importing this package stays light.
"""

from detectors.base import Detector
from detectors.given import GivenBoxes
from detectors.registry import DETECTORS, build_detector
from detectors.torchvision_backend import TorchvisionDetector
from detectors.ultralytics_backend import UltralyticsDetector

__all__ = ["DETECTORS", "Detector", "GivenBoxes", "TorchvisionDetector", "UltralyticsDetector", "build_detector"]
