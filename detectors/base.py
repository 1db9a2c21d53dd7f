"""The one interface every box proposer implements, and the helpers adapters share.

A detector turns decoded images into raw ``Regions`` (see ``pipeline/records.py`` for the
coordinate convention): one ``Regions`` per input image, in input order, before any
post-processing. Filtering, clipping and NMS live in ``pipeline/postprocess.py`` (the detect stage) so that every
detector is cleaned up by the same rules and counts what it removed the same way.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from pipeline.records import DecodedImage, Regions


@runtime_checkable
class Detector(Protocol):
    """Anything with a ``name`` and a batched ``detect``; adapters are duck-typed, never subclassed."""

    name: str

    def detect(self, images: Sequence[DecodedImage]) -> list[Regions]:
        """One ``Regions`` per image, in order; raw detections before post-processing."""
        ...


def check_image(image: DecodedImage) -> np.ndarray:
    """The image's array after checking it is what every detector expects: RGB uint8 (H, W, 3)."""
    array = image.array
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"image {image.image_id!r}: expected an RGB uint8 array of shape (H, W, 3), got "
            f"{array.dtype} {tuple(array.shape)}; decode images with pipeline's decoder (RGB, EXIF-rotated)"
        )
    return array


def batches(items: Sequence, size: int) -> list[Sequence]:
    """``items`` cut into consecutive chunks of at most ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]
