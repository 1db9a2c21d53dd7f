"""Safe image decoding: every input becomes an RGB array or a clear reason why not.

EXIF orientation is applied (boxes are in the pixels a person sees), every mode is converted to
RGB (16-bit and float images are scaled, alpha is composited on white), a pixel-count limit
guards against decompression bombs, and truncated or non-image files are reported, not raised.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import DecodedImage

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000


class ImageDecodeError(Exception):
    """An input that cannot be used as an image; the message is the reason for the error row."""


@dataclass(frozen=True)
class ImageSource:
    """Where an image comes from: a path, or bytes with a name. ``image_id`` defaults to the uri."""

    uri: str
    data: bytes | None = None
    image_id: str | None = None

    @classmethod
    def of(cls, item: "ImageSource | str | Path | bytes", index: int) -> "ImageSource":
        if isinstance(item, ImageSource):
            return item
        if isinstance(item, (str, Path)):
            return cls(str(item))
        if isinstance(item, (bytes, bytearray)):
            return cls(f"bytes:{index}", bytes(item))
        raise TypeError(f"an image is a path, bytes or ImageSource, got {type(item).__name__}")


def decode_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode one image; raises :class:`ImageDecodeError` with the reason when it cannot."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    data = source.data if source.data is not None else _read(source.uri)
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
                im.load()  # decode now: truncated files fail here
                im = ImageOps.exif_transpose(im)
                array = _to_rgb(im)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, ImportError):
        # ImportError: ultralytics replaces PIL's Image.open with one that, for an unidentified
        # file, imports the optional pi_heif plugin and fails when it is missing.
        raise ImageDecodeError("not an image file (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb guard: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for truncated / corrupt data
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None
    return DecodedImage(source.image_id or source.uri, source.uri, array)


def _read(uri: str) -> bytes:
    path = Path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {uri}") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"is a directory, not an image: {uri}") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read {uri}: {e.strerror or e}") from None


def _to_rgb(im) -> np.ndarray:
    """Any PIL mode -> RGB uint8 (H, W, 3)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
