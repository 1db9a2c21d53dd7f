"""Safe image decoding: every input becomes an RGB array or a clear reason why not.

EXIF orientation is applied (boxes are in the pixels a person sees), every mode is converted to
RGB (16-bit and float images are scaled, alpha is composited on white), a pixel-count limit
guards against decompression bombs, a byte limit against huge files, and only regular files are
read (a FIFO or a device would block the job). Whatever a decoder raises for a hostile file
(Pillow raises TypeError, AttributeError, NotImplementedError, MemoryError... for some) becomes
:class:`ImageDecodeError`: the image's error row, never a failed job.

A uri is a path, or a ``file:`` URI whose percent-escapes may spell bytes that are not UTF-8
(how a folder source names a file whose name is not valid UTF-8, so that the name still fits a
Parquet string column and reads back to the same file).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np

from .records import DecodedImage

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # a compressed image larger than this is refused unread


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


def decode_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> DecodedImage:
    """Decode one image; raises :class:`ImageDecodeError` with the reason when it cannot (and
    nothing else, whatever the file holds)."""
    data = source.data if source.data is not None else read_file(source.uri, max_bytes)
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        array = _decode(data, max_pixels)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("the decoder ran out of memory on this file") from None
    except Exception as e:  # noqa: BLE001 -- a hostile file must not escape as anything but its error row
        raise ImageDecodeError(f"the decoder failed on this file: {type(e).__name__}: {e}") from None
    return DecodedImage(source.image_id or source.uri, source.uri, array)


def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
                im.load()  # decode now: truncated files fail here
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, ImportError):
        # ImportError: ultralytics replaces PIL's Image.open with one that, for an unidentified
        # file, imports the optional pi_heif plugin and fails when it is missing.
        raise ImageDecodeError("not an image file (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb guard: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's usual errors for corrupt data
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None


def local_path(uri: str) -> str | bytes:
    """The file a uri names: a plain path as is; a ``file:`` URI percent-decoded to bytes (so names
    that are not UTF-8 reach the right file)."""
    if uri.startswith("file:"):
        raw = unquote_to_bytes(uri[len("file:"):])
        return raw[2:] if raw.startswith(b"//") else raw
    return uri


def read_file(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A regular file's bytes, refused when over ``max_bytes`` (checked before reading)."""
    path = local_path(uri)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not block
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {uri}") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"is a directory, not an image: {uri}") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read {uri}: {e.strerror or e}") from None
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise ImageDecodeError(f"is a directory, not an image: {uri}")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(f"not a regular file (a FIFO, socket or device): {uri}")
        if info.st_size > max_bytes:
            raise ImageDecodeError(f"{info.st_size} bytes, over the limit of {max_bytes} bytes")
        try:
            return f.read(max_bytes + 1)
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
