"""The shipped demo models (trained on the synthetic world) and sample images.

``model_dir()`` and ``detector_path()`` are where the model specs ``demo`` (``--model demo``,
``load_model("demo")``) and ``demo`` (``--detector demo``, ``build_detector("demo")``) point.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def root() -> Path:
    return Path(str(resources.files(__name__)))


def model_dir() -> Path:
    """The shipped GPT4RoI checkpoint (roiscribe format)."""
    path = root() / "gpt4roi"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the shipped demo model is missing from {path}; reinstall roiscribe, or pass "
                                "a checkpoint directory (or random:tiny for random weights)")
    return path


def detector_path() -> Path:
    """The shipped ultralytics detector checkpoint."""
    path = root() / "detector.pt"
    if not path.is_file():
        raise FileNotFoundError(f"the shipped demo detector is missing from {path}; reinstall roiscribe, or pass "
                                "a detector spec such as yolo:PATH.pt")
    return path


def samples_dir() -> Path:
    return root() / "samples"
