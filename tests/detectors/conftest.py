"""Shared inputs: the two photos ultralytics ships, decoded the way roiscribe decodes images."""

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.records import DecodedImage


@pytest.fixture(scope="session")
def assets() -> Path:
    # Located without importing ultralytics: the detector must be the first to import it, after
    # it has set ultralytics' offline environment.
    return Path(find_spec("ultralytics").origin).parent / "assets"


def decode(path: Path) -> DecodedImage:
    with Image.open(path) as im:
        array = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return DecodedImage(image_id=path.name, uri=str(path), array=array)


@pytest.fixture(scope="session")
def bus(assets) -> DecodedImage:
    return decode(assets / "bus.jpg")  # 810 x 1080: taller than the 640 letterbox


@pytest.fixture(scope="session")
def zidane(assets) -> DecodedImage:
    return decode(assets / "zidane.jpg")  # 1280 x 720
