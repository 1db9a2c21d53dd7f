import pytest

from pipeline.compose import AnswerTokens, ComposeConfig, Instruction, Templates, compose, select_pairs
from pipeline.records import Regions


def test_every_default_template_exactly():
    t = Templates()
    assert t.version == "v1"
    # official GPT4RoI training wording (refcoco.py / vg.py region questions)
    assert t.caption_brief == "What can you tell me about the region indicated by <region1> in the image?"
    assert t.caption_detailed == "Could you describe the region shown as <region1> in the picture in great detail?"
    assert t.attributes == {
        "color": "What is the color of <region1>?",
        "shape": "What is the shape of <region1>?",
        "material": "What is <region1> made of?",
        "action": "What is <region1> doing?",
    }
    assert t.relation == "What is the relationship between <region1> and <region2>?"


def test_compose_per_region_then_pairs():
    regions = Regions.from_boxes([[0, 0, 10, 10], [5, 5, 15, 15]])
    cfg = ComposeConfig(captions=("brief", "detailed"), attributes=("color",), max_pairs=3)
    assert compose(regions, cfg) == [
        Instruction("caption", "caption", Templates().caption_brief, (0,), 64),
        Instruction("caption", "caption_detailed", Templates().caption_detailed, (0,), 512),
        Instruction("attribute", "color", "What is the color of <region1>?", (0,), 16),
        Instruction("caption", "caption", Templates().caption_brief, (1,), 64),
        Instruction("caption", "caption_detailed", Templates().caption_detailed, (1,), 512),
        Instruction("attribute", "color", "What is the color of <region1>?", (1,), 16),
        Instruction("relation", "relation", "What is the relationship between <region1> and <region2>?", (0, 1), 32),
    ]
    short = ComposeConfig(captions=("detailed",), attributes=(), answer_tokens=AnswerTokens(caption_detailed=100))
    assert [i.max_new_tokens for i in compose(regions, short)] == [100, 100, 32]
    with pytest.raises(ValueError, match="answer_tokens.relation must be a whole number >= 1"):
        AnswerTokens(relation=0)


def test_custom_templates_and_refusals():
    t = Templates(version="mine", attributes={"size": "How big is <region1>?"})
    got = compose(Regions.from_boxes([[0, 0, 4, 4]]), ComposeConfig(captions=(), attributes=("size",), templates=t))
    assert got == [Instruction("attribute", "size", "How big is <region1>?", (0,), 16)]
    with pytest.raises(ValueError, match="no template for attributes \\['texture'\\]"):
        ComposeConfig(attributes=("texture",))
    with pytest.raises(ValueError, match="unknown caption kinds"):
        ComposeConfig(captions=("long",))


def test_empty_and_single_region_images():
    assert compose(Regions.empty()) == []
    assert select_pairs(Regions.from_boxes([[0, 0, 5, 5]])) == []
    assert [i.kind for i in compose(Regions.from_boxes([[0, 0, 5, 5]]))] == ["caption"] + ["attribute"] * 4


def test_pair_selection_overlaps_first_then_nearest():
    boxes = [
        [0, 0, 10, 10],      # 0 overlaps 1 (IoU 25/175)
        [5, 5, 15, 15],      # 1
        [100, 0, 110, 10],   # 2 far right
        [0, 100, 10, 110],   # 3 far down
        [6, 6, 14, 14],      # 4 inside 1 (IoU 64/100), overlaps 0 (16/184)
    ]
    pairs = select_pairs(Regions.from_boxes(boxes), ComposeConfig(nearest_k=1, max_pairs=10))
    # overlapping by IoU desc: (1,4) .64, (0,1) .143, (0,4) .087; then nearest neighbours by distance:
    # 2 -> 1 (dist ~96.2), 3 -> 1 (dist ~96.2), tie broken on the pair
    assert pairs == [(1, 4), (0, 1), (0, 4), (1, 2), (1, 3)]
    assert select_pairs(Regions.from_boxes(boxes), ComposeConfig(nearest_k=1, max_pairs=2)) == [(1, 4), (0, 1)]


def test_pair_selection_skips_very_different_sizes_and_is_deterministic():
    boxes = [[0, 0, 100, 100], [10, 10, 12, 12], [50, 50, 60, 60]]  # areas 10000, 4, 100
    pairs = select_pairs(Regions.from_boxes(boxes), ComposeConfig(max_size_ratio=200, nearest_k=2))
    assert (0, 1) not in pairs  # ratio 2500
    assert pairs == [(0, 2), (1, 2)]
    shuffled_equal = select_pairs(Regions.from_boxes(boxes), ComposeConfig(max_size_ratio=200, nearest_k=2))
    assert shuffled_equal == pairs
