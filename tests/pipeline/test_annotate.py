import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectors.given import GivenBoxes
from model.engine import EngineConfig
from pipeline import PipelineConfig, ComposeConfig, Regions, annotate

CONFIG = PipelineConfig(engine=EngineConfig(max_new_tokens=4), batch_size=4)
FIELDS = {"caption", "color", "shape", "material", "action"}


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> str:
    im.save(path, fmt, **kw)
    return str(path)


@pytest.fixture
def mixed(tmp_path):
    rs = np.random.RandomState(0)
    photo = Image.fromarray(rs.randint(0, 256, (48, 64, 3)).astype(np.uint8))
    files, boxes = {}, {}
    files["good_png"] = _save(tmp_path / "good.png", photo, "PNG")
    files["good_jpg"] = _save(tmp_path / "good.jpg", photo, "JPEG")
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    files["truncated"] = str(tmp_path / "truncated.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    files["zero"] = str(tmp_path / "zero.jpg")
    (tmp_path / "notes.txt").write_text("this is not an image")
    files["text"] = str(tmp_path / "notes.txt")
    files["cmyk"] = _save(tmp_path / "cmyk.jpg", photo.convert("CMYK"), "JPEG")
    files["png16"] = _save(tmp_path / "deep.png", Image.fromarray((rs.rand(30, 50) * 65535).astype(np.uint16)), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x48, displayed 48x64
    files["exif"] = _save(tmp_path / "rotated.jpg", photo, "JPEG", exif=exif)
    files["tiny"] = _save(tmp_path / "one.png", Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    files["nothing"] = _save(tmp_path / "empty_scene.png", Image.new("RGB", (32, 32), (128, 128, 128)), "PNG")
    boxes = {
        files["good_png"]: [[2, 2, 30, 30], [20, 10, 60, 40]],
        files["good_jpg"]: [[5, 5, 40, 40]],
        files["cmyk"]: [[0, 0, 64, 48]],
        files["png16"]: [[10, 5, 40, 25]],
        files["exif"]: [[4, 4, 44, 60]],  # in display pixels (48 wide, 64 high)
        files["tiny"]: [[0, 0, 1, 1]],
    }
    given = GivenBoxes({uri: Regions.from_boxes(b) for uri, b in boxes.items()})
    return files, given


EXPECTED = {
    "good_png": ("ok", 2), "good_jpg": ("ok", 1), "truncated": ("error", 0), "zero": ("error", 0),
    "text": ("error", 0), "cmyk": ("ok", 1), "png16": ("ok", 1), "exif": ("ok", 1), "tiny": ("ok", 1),
    "nothing": ("ok", 0),
}


def test_mixed_inputs_give_one_result_each_with_the_right_status(tiny, mixed):
    files, given = mixed
    names = list(files)
    results = annotate([files[n] for n in names], given, tiny, CONFIG)
    assert [r.uri for r in results] == [files[n] for n in names]
    for name, result in zip(names, results):
        status, n_regions = EXPECTED[name]
        assert (result.status, len(result.regions)) == (status, n_regions), (name, result.error)
        if status == "error":
            assert result.error.startswith("decode: ")
            continue
        assert result.error == ""
        assert len(result.answers) == n_regions
        for answers in result.answers:
            assert set(answers) == FIELDS
            for a in answers.values():
                assert a.status in ("ok", "unknown", "empty") and a.mean_logprob <= 0 and a.min_logprob <= a.mean_logprob
        assert {"decode", "detect", "describe"} <= set(result.timings)
    by_name = dict(zip(names, results))
    relations = by_name["good_png"].relations
    assert len(relations) == 1 and {relations[0].subject, relations[0].object} == {0, 1}
    assert (by_name["exif"].width, by_name["exif"].height) == (48, 64)
    assert "truncated" in by_name["truncated"].error and "empty file" in by_name["zero"].error
    assert "not an image" in by_name["text"].error


def test_a_failing_detector_fails_only_its_image(tiny, mixed):
    files, given = mixed

    class Flaky:  # a detector that breaks on one image (stands in for a backend crash)
        name = "flaky"

        def detect(self, images):
            if any(im.uri == files["cmyk"] for im in images):
                raise RuntimeError("backend crashed")
            return given.detect(images)

    names = ["good_png", "cmyk", "good_jpg"]
    results = annotate([files[n] for n in names], Flaky(), tiny, CONFIG)
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].error == "detect: RuntimeError: backend crashed"
    assert len(results[0].answers) == 2


def test_answers_match_a_direct_engine_run(tiny, mixed):
    """annotate() asks exactly the composed questions about exactly the detector's boxes."""
    from model.engine import ImageJob, RegionEngine, RegionPrompt
    from pipeline import compose, decode_image, ImageSource

    files, given = mixed
    cfg = PipelineConfig(engine=EngineConfig(max_new_tokens=4), compose=ComposeConfig(attributes=("color",)))
    result = annotate([files["good_png"]], given, tiny, cfg)[0]
    image = decode_image(ImageSource(files["good_png"]))
    regions = given.detect([image])[0]
    plan = compose(regions, cfg.compose)
    gens = RegionEngine(tiny, cfg.engine).run([ImageJob(image.array, regions.normalized(64, 48),
                                                        [RegionPrompt(i.question, i.regions) for i in plan])])[0]
    assert [result.answers[0]["caption"].raw, result.answers[0]["color"].raw,
            result.answers[1]["caption"].raw, result.answers[1]["color"].raw,
            result.relations[0].raw] == [g.text for g in gens]


def test_bytes_inputs_and_empty_list(tiny):
    f = io.BytesIO()
    Image.new("RGB", (20, 20)).save(f, "PNG")
    results = annotate([f.getvalue(), b"\x00\x01"], GivenBoxes({}), tiny, CONFIG)
    assert [(r.uri, r.status) for r in results] == [("bytes:0", "ok"), ("bytes:1", "error")]
    assert annotate([], GivenBoxes({}), tiny, CONFIG) == []
