from PIL import Image

from pipeline.arrow import Provenance, to_table
from pipeline.records import ImageResult
from sinks.parquet import ParquetSink
from sinks.preview import render_previews
from tests.pipeline.test_arrow import ok_result


def test_previews_draw_regions_and_list_answers(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (100, 80), (255, 255, 255)).save(image)
    result = ok_result("a")
    result.uri = str(image)
    prov = Provenance("d", "m", "v1")
    with ParquetSink(tmp_path / "out") as sink:
        sink.write(to_table([result, ImageResult("b", "/nope", "error", "decode: x")], prov))
    page = render_previews(tmp_path / "out", tmp_path / "prev")
    html = page.read_text()
    assert "a red star" in html and "color: red" in html and "left of" in html and "decode: x" in html
    drawn = Image.open(tmp_path / "prev" / "00000.jpg").convert("RGB")
    assert drawn.size == (100, 80)
    assert drawn.getpixel((10, 40)) != (255, 255, 255)  # the first box's left edge is drawn
    assert not (tmp_path / "prev" / "00001.jpg").exists()
