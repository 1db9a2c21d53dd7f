import io

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import ImageDecodeError, ImageSource, decode_image


def encode(im, fmt, **kw):
    f = io.BytesIO()
    im.save(f, fmt, **kw)
    return f.getvalue()


def rgb(h=40, w=60, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8))


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 40), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # red patch top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    d = decode_image(ImageSource("x.jpg", encode(im, "JPEG", exif=exif, quality=95)))
    assert (d.width, d.height) == (40, 60)
    assert d.array[2:8, -8:-2, 0].mean() > 200  # the patch is now top-right
    assert d.array[2:8, 2:8, 0].mean() < 50


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "1", "I;16", "F"])
def test_every_mode_becomes_rgb_uint8(mode):
    """Right type and shape, and the right pixels: what a person sees, grey levels kept (16-bit
    scaled to 8, float 0..255 taken as is), not a black or clipped picture."""
    source = rgb()
    if mode == "I;16":
        levels = np.arange(40 * 60).reshape(40, 60) * 27  # 0 .. 64773
        im = Image.fromarray(levels.astype(np.uint16))
        want = np.floor(levels / 65535 * 255 + 0.5)
    elif mode == "F":
        levels = np.linspace(0, 255, 40 * 60, dtype=np.float32).reshape(40, 60)
        im = Image.fromarray(levels)
        want = np.floor(levels.astype(np.float64) + 0.5)
    else:
        im = source.convert(mode)
        want = np.asarray(im.convert("RGB"), np.float64)  # lossless formats: exactly PIL's conversion
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "F" else "PNG"
    d = decode_image(ImageSource(f"x.{fmt}", encode(im, fmt)))
    assert d.array.shape == (40, 60, 3) and d.array.dtype == np.uint8
    got = d.array.astype(np.float64)
    if want.ndim == 2:  # one channel: grey in R, G and B
        want = np.repeat(want[:, :, None], 3, axis=2)
    if mode == "CMYK":  # lossy: near the RGB picture it was made from
        assert np.abs(got - np.asarray(source, np.float64)).mean() < 20
    else:
        np.testing.assert_array_equal(got, want)
    if mode in ("I;16", "F"):  # the full range survives
        assert d.array.min() == 0 and d.array.max() >= 250


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert decode_image(ImageSource("x.png", encode(im, "PNG"))).array.min() == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"just some text\n", "not an image file"),
        (encode(rgb(), "JPEG")[:300], "corrupt or truncated"),
    ],
)
def test_bad_inputs_give_reasons(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(ImageSource("bad", data))


def test_pixel_limit_and_missing_files(tmp_path):
    big = encode(Image.new("L", (2000, 1000)), "PNG")
    with pytest.raises(ImageDecodeError, match="2000x1000 = 2000000 pixels, over the limit of 1000000"):
        decode_image(ImageSource("big.png", big), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(ImageSource(str(tmp_path / "nope.png")))
    with pytest.raises(ImageDecodeError, match="is a directory"):
        decode_image(ImageSource(str(tmp_path)))


def test_paths_and_ids(tmp_path):
    path = tmp_path / "a.png"
    rgb().save(path)
    d = decode_image(ImageSource(str(path)))
    assert d.uri == str(path) and d.image_id == str(path)
    assert decode_image(ImageSource(str(path), image_id="img-7")).image_id == "img-7"
    assert decode_image(ImageSource.of(encode(rgb(), "PNG"), 3)).uri == "bytes:3"
    d1 = decode_image(ImageSource("x", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")))
    assert d1.array.tolist() == [[[9, 9, 9]]]


def test_non_images_are_reported_after_ultralytics_patched_pil():
    """ultralytics replaces PIL's Image.open with one that tries an optional HEIF plugin on
    unidentified files; a missing plugin must still read as 'not an image', not crash."""
    from detectors.ultralytics_backend import offline_environment

    offline_environment()
    import ultralytics  # noqa: F401  (applies the patch)

    with pytest.raises(ImageDecodeError, match="not an image file"):
        decode_image(ImageSource("x.bin", b"\x00\x01\x02 definitely not an image"))


FUZZ_FORMATS = ("PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP", "ICO", "PPM", "TGA", "SPIDER", "DDS", "PCX", "IM",
                "SGI", "EPS", "MSP", "XBM")


def _seed_files() -> list[bytes]:
    files = []
    for fmt in FUZZ_FORMATS:
        im = rgb(12, 16).convert("L") if fmt in ("SPIDER", "MSP", "XBM") else rgb(12, 16)
        if fmt == "MSP" or fmt == "XBM":
            im = im.convert("1")
        try:
            files.append(encode(im, fmt))
        except (OSError, KeyError, ValueError):  # a format this Pillow build cannot write
            continue
    return files


def test_decoder_fuzz_raises_only_decode_errors():
    """Seeded mutations of small images in many formats (byte flips, truncations, spliced
    headers): decoding returns an RGB array or raises ImageDecodeError, nothing else. Pillow
    raises TypeError, AttributeError, NotImplementedError, struct.error... for some of them."""
    rs = np.random.RandomState(1234)
    seeds = _seed_files()
    assert len(seeds) >= 12
    outcomes = {"ok": 0, "error": 0}
    for k in range(1500):
        data = bytearray(seeds[k % len(seeds)])
        kind = rs.randint(4)
        if kind == 0:  # flip bytes, mostly in the header
            for _ in range(rs.randint(1, 8)):
                data[min(int(rs.exponential(40)), len(data) - 1)] = rs.randint(256)
        elif kind == 1:  # truncate
            data = data[: rs.randint(1, len(data))]
        elif kind == 2:  # another format's header on this body
            other = seeds[rs.randint(len(seeds))]
            cut = rs.randint(1, min(64, len(other)))
            data = bytearray(other[:cut]) + data[cut:]
        else:  # overwrite a run with random bytes
            start = rs.randint(len(data))
            data[start:start + 16] = rs.randint(0, 256, 16).astype(np.uint8).tobytes()
        try:
            d = decode_image(ImageSource(f"fuzz{k}", bytes(data)), max_pixels=1_000_000)
            assert d.array.ndim == 3 and d.array.shape[2] == 3 and d.array.dtype == np.uint8
            outcomes["ok"] += 1
        except ImageDecodeError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 100, outcomes


def test_fifos_and_oversized_files_are_refused_unread(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = threading.Event()

    def decode():
        with pytest.raises(ImageDecodeError, match="not a regular file"):
            decode_image(ImageSource(str(fifo)))
        done.set()

    threading.Thread(target=decode, daemon=True).start()
    assert done.wait(10), "decoding a FIFO blocked"
    big = tmp_path / "big.png"
    big.write_bytes(encode(rgb(), "PNG") + b"\0" * 5000)
    with pytest.raises(ImageDecodeError, match="over the limit of 1000 bytes"):
        decode_image(ImageSource(str(big)), max_bytes=1000)
    with pytest.raises(ImageDecodeError, match="over the limit of 1000 bytes"):
        decode_image(ImageSource("b", big.read_bytes()), max_bytes=1000)
    assert decode_image(ImageSource(str(big))).width == 60
