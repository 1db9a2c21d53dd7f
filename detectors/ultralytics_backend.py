"""Ultralytics YOLO as a roiscribe detector, loaded from local files only.

ultralytics reads its environment once, at import, and otherwise goes online: it downloads
missing weights and fonts, installs missing packages and checks for updates. ``offline_environment``
sets, before the first import and only where the user has not set them already:

``YOLO_OFFLINE=1``          no online checks or downloads
``YOLO_AUTOINSTALL=false``  never pip-install a missing requirement
``YOLO_VERBOSE=false``      a library does not print; ultralytics then logs errors only
``ULTRALYTICS_SAFE_LOAD=1`` ``.pt`` files load with ``torch.load(weights_only=True)`` + an allow-list
``YOLO_CONFIG_DIR``         a roiscribe-owned folder holding matplotlib's DejaVuSans as
                            ``Arial.ttf`` / ``Arial.Unicode.ttf``, the fonts ultralytics would fetch

A ``.pt`` is always checked with ultralytics' restricted loader (``torch_safe_load(safe_only=True)``)
even when ultralytics was imported earlier without the flag: a checkpoint is a pickle, and a
pickle from elsewhere must not run code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence

import numpy as np

from detectors.base import batches, check_image
from model.device import resolve_device
from pipeline.records import DecodedImage, Regions

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
_BOX_TASKS = ("detect", "segment", "pose")


def offline_environment() -> Path:
    """Set ultralytics' offline/quiet/safe variables (see module docstring); returns its config dir."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")
    if "YOLO_CONFIG_DIR" not in os.environ:
        os.environ["YOLO_CONFIG_DIR"] = str(_roiscribe_config_dir())
    return Path(os.environ["YOLO_CONFIG_DIR"])


def _roiscribe_config_dir() -> Path:
    """``~/.cache/roiscribe/ultralytics`` (or the temp dir when home is read-only), fonts in place.

    ultralytics looks for fonts in ``$YOLO_CONFIG_DIR/Ultralytics``; DejaVuSans ships with
    matplotlib (an ultralytics dependency) and stands in for Arial when boxes are drawn.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    fallback = Path(tempfile.gettempdir()) / f"roiscribe-ultralytics-{os.getuid()}"
    for root in (cache / "roiscribe" / "ultralytics", fallback):
        try:
            (root / "Ultralytics").mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        _install_fonts(root / "Ultralytics")
        return root
    raise OSError(f"no writable folder for ultralytics settings under {cache} or {tempfile.gettempdir()}; "
                  f"set YOLO_CONFIG_DIR to a writable folder")


def _install_fonts(folder: Path) -> None:
    spec = find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return  # no matplotlib, no plotting in ultralytics either: nothing would ask for the fonts
    dejavu = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in _FONT_NAMES:
        if dejavu.is_file() and not (folder / name).exists():
            shutil.copyfile(dejavu, folder / name)


class UltralyticsDetector:
    """An ultralytics YOLO detection model, from a local ``.pt`` or a model YAML (random weights).

    ``conf`` is low on purpose: ``pipeline.postprocess`` decides what to keep. Images are letter-
    boxed to a square ``imgsz`` (``rect=False``) so an image's boxes do not depend on which other
    images share its batch; ``rect=True`` trades that for less padding on non-square images.
    """

    def __init__(self, weights: str, device: str = "cpu", imgsz: int | None = None, conf: float = 0.001,
                 max_det: int = 300, batch_size: int = 16, class_names: Sequence[str] | None = None,
                 rect: bool = False):
        offline_environment()
        from ultralytics import YOLO

        weights = str(weights)
        self.model = YOLO(_check_weights(weights))
        if self.model.task not in _BOX_TASKS:  # these tasks' results carry axis-aligned `boxes`
            raise ValueError(f"{weights!r} is a {self.model.task!r} model; roiscribe takes boxes from "
                             f"{', '.join(_BOX_TASKS)} models")
        self.name = f"yolo:{Path(weights).name}"
        self.device = str(resolve_device(device))
        self.batch_size = batch_size
        # Default: the size the checkpoint was trained at (a model trained at 256 px sees objects at
        # another scale at 640); 640 for a YAML or a checkpoint that does not record it.
        imgsz = imgsz or _trained_imgsz(self.model) or 640
        self.predict_args = dict(imgsz=imgsz, conf=conf, max_det=max_det, rect=rect, verbose=False)
        self.class_names = _class_names(self.model.names, class_names)

    def detect(self, images: Sequence[DecodedImage]) -> list[Regions]:
        out: list[Regions] = []
        for batch in batches(list(images), self.batch_size):
            bgr = [np.ascontiguousarray(check_image(im)[:, :, ::-1]) for im in batch]  # ultralytics wants BGR
            results = self.model.predict(bgr, device=self.device, **self.predict_args)
            out.extend(self._regions(r) for r in results)
        return out

    def _regions(self, result) -> Regions:
        boxes = result.boxes  # xyxy already scaled back to the original image's pixels
        ids = boxes.cls.cpu().numpy().astype(np.int64)
        return Regions(boxes.xyxy.cpu().numpy(), boxes.conf.cpu().numpy(), ids,
                       [self.class_names[i] for i in ids], self.name)


def _trained_imgsz(model) -> int | None:
    size = (getattr(model, "ckpt", None) or {}).get("train_args", {}).get("imgsz")
    if size is None:
        size = getattr(model, "overrides", {}).get("imgsz")
    return int(size) if isinstance(size, (int, float)) and size > 0 else None


def _check_weights(weights: str) -> str:
    """A model YAML (path or a name ultralytics ships) as is; a ``.pt`` only if it exists and loads safely."""
    suffix = Path(weights).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return weights  # ultralytics resolves shipped names and raises FileNotFoundError for others
    if suffix != ".pt":
        raise ValueError(f"ultralytics weights must be a .pt checkpoint or a model .yaml, got {weights!r}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no ultralytics checkpoint at {str(path)!r}; roiscribe never downloads weights, "
                                f"so pass the path of a local .pt file (or a model .yaml for random weights)")
    from ultralytics.nn.tasks import torch_safe_load
    from ultralytics.utils import SAFE_LOAD

    if not SAFE_LOAD:  # ultralytics was imported before offline_environment(): check the file ourselves
        torch_safe_load(str(path), safe_only=True)  # raises TypeError on types outside the allow-list
    return str(path)


def _class_names(model_names: dict[int, str], given: Sequence[str] | None) -> list[str]:
    """Names indexed by class id: ``given``, else the model's, else COCO-80 for placeholder names.

    A model built from a YAML names its classes "0", "1", ...; with 80 classes it is the COCO
    layout every ultralytics YAML defaults to, so the COCO names from ultralytics' own
    ``coco.yaml`` are the ones a trained copy would carry.
    """
    n = len(model_names)
    if given is not None:
        if len(given) != n:
            raise ValueError(f"class_names has {len(given)} names but the model predicts {n} classes; "
                             f"give one name per class id, in id order")
        return [str(c) for c in given]
    names = [str(model_names[i]) for i in range(n)]
    if n == 80 and names == [str(i) for i in range(n)]:
        from ultralytics.utils import YAML
        from ultralytics.utils.checks import check_yaml

        coco = YAML.load(check_yaml("coco.yaml"))["names"]
        names = [str(coco[i]) for i in range(n)]
    return names
