import re

from PIL import Image

from pipeline.arrow import Provenance, to_table
from pipeline.records import ImageResult, RelationAnswer
from sinks.label_studio.labeling import label_color
from sinks.parquet import ParquetSink
from sinks.preview import DISPLAY_PX, MAX_UPSCALE, draw_row, render_previews, tag_position
from tests.pipeline.test_arrow import ok_result


def write(tmp_path, results):
    with ParquetSink(tmp_path / "out") as sink:
        sink.write(to_table(results, Provenance("d", "m", "v1")))
    return tmp_path / "out"


def test_previews_draw_regions_and_list_answers_with_numbers_and_confidences(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (100, 80), (255, 255, 255)).save(image)
    result = ok_result("a")
    result.uri = str(image)
    # an answer that named no predicate: its region words are the question's two regions
    result.relations.append(RelationAnswer(1, None, 0, "region2 is near region1", "unknown", -0.5, -1.0))
    out = write(tmp_path, [result, ImageResult("b", "/nope", "error", "decode: x")])
    page = render_previews(out, tmp_path / "prev")
    html = page.read_text()
    assert "a red star" in html and "decode: x" in html
    text = re.sub(r"<[^>]+>", "", html)
    assert "color: red 0.95" in text  # exp(min log-prob -0.05)
    assert "1 star left of 2" in text and "region1" not in text.split("answer:")[0]
    assert "2 ? 1 star 0.37 answer: “1 is near 2”" in text  # renumbered as shown: region k is number k + 1
    assert "box 0.90" in text
    drawn = Image.open(tmp_path / "prev" / "00000.jpg").convert("RGB")
    assert drawn.size == (100 * MAX_UPSCALE, 80 * MAX_UPSCALE)  # a tiny image is scaled up, at most 4x
    assert drawn.getpixel((10 * 4, 40 * 4)) != (255, 255, 255)  # the first box's left edge is drawn
    assert not (tmp_path / "prev" / "00001.jpg").exists()


def test_images_are_drawn_at_the_card_size_in_the_labels_colours(tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (310, 196), (255, 255, 255)).save(image)
    result = ok_result("w")
    result.uri = str(image)
    row = to_table([result]).to_pylist()[0]
    drawn = draw_row(row, {"star": "#123456", "": "#654321"})
    assert drawn.size == (DISPLAY_PX, round(196 * DISPLAY_PX / 310))
    scale = DISPLAY_PX / 310
    assert drawn.getpixel((round(10 * scale), round(40 * scale))) == (0x12, 0x34, 0x56)


def test_labels_stay_inside_the_image():
    size = (200, 100)
    assert tag_position((40, 12), (50, 30), size) == (50, 18)  # above the box
    assert tag_position((40, 12), (50, 5), size) == (50, 5)  # no room above: inside the box
    assert tag_position((40, 12), (190, 30), size) == (160, 18)  # would pass the right edge: shifted left
    assert tag_position((40, 12), (190, 95), size) == (160, 83)


def test_a_label_at_the_top_right_corner_is_drawn_whole(tmp_path):
    image = tmp_path / "corner.png"
    Image.new("RGB", (160, 160), (255, 255, 255)).save(image)
    row = {"uri": str(image), "regions": [{"region_id": 0, "label": "a-long-label", "box": [150.0, 0.0, 160.0, 10.0]}]}
    drawn = draw_row(row, {"a-long-label": "#000000"})
    black = [x for x in range(drawn.width) if drawn.getpixel((x, 3))[0] < 30]
    assert black and max(black) == drawn.width - 1 and max(black) - min(black) > 60  # the tag ends at the edge
    assert label_color(0) != label_color(1)
