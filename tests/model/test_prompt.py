import pytest

from model.config import TokenConfig, VICUNA_V0_SYSTEM
from model.prompt import (Conversation, build_multiturn, build_prompt, cut_answer, expand_region_tags,
                          region_order, region_ref)
from model.tokenizer import BuiltinPieces, PromptTokenizer

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions.")


def test_system_line_is_the_official_one():
    assert VICUNA_V0_SYSTEM == SYSTEM


def test_single_region_prompt_is_the_official_string():
    got = build_prompt("Can you give a description of the region mentioned by <region1>?")
    assert got == (
        SYSTEM + "\n\n### Human: The <image> provides an overview of the picture.\n"
        "Can you give a description of the region mentioned by region1 <bbox>?\n### "
    )


def test_several_regions_prompt_is_the_official_string():
    got = build_prompt("What is the relationship between <region1> and <region2>? And <region3>?")
    assert got == (
        SYSTEM + "\n\n### Human: The <image> provides an overview of the picture.\n"
        "What is the relationship between region1 <bbox> and region2 <bbox>? And region3 <bbox>?\n### "
    )


def test_multiturn_prompt_carries_the_preamble_once():
    got = build_multiturn([("What is <region1>?", "a red circle")], "Is region 1 left of <region2>?")
    assert got == (
        SYSTEM + "\n\n### Human: The <image> provides an overview of the picture.\nWhat is region1 <bbox>?"
        "\n### Assistant: a red circle\n### Human: Is region 1 left of region2 <bbox>?\n### "
    )
    assert Conversation().ask("x").answer("y").render().endswith("### Assistant: y\n### ")


@pytest.mark.parametrize(
    "generated, answer",
    [
        ("Assistant: a red circle\n###", "a red circle"),
        ("Assistant: a red circle\n### Human: more", "a red circle"),
        (" Assistant:   two dogs  ", "two dogs"),  # truncated, no stop
        ("Assistant:", ""),
        ("", ""),
        ("###", ""),
        ("a cat without prefix\n###", "a cat without prefix"),
        ("Assistant: uses Assistant: inside", "uses Assistant: inside"),
    ],
)
def test_cut_answer(generated, answer):
    assert cut_answer(generated) == answer


def test_region_references():
    assert region_ref(3) == "region3 <bbox>"
    with pytest.raises(ValueError):
        region_ref(0)
    assert expand_region_tags("<region2> and <region10>") == "region2 <bbox> and region10 <bbox>"
    assert region_order(build_prompt("<region2> vs <region1> vs <region2>")) == [2, 1, 2]
    with pytest.raises(ValueError, match="must follow a 'region<N>' word"):
        region_order("what is <bbox>?")


@pytest.fixture(scope="module")
def tok():
    return PromptTokenizer(BuiltinPieces(), TokenConfig.after(2048), num_image_tokens=4)


def test_ids_are_built_piecewise_like_the_legacy_slow_tokenizer(tok):
    p = tok.pieces
    t = tok.tokens
    ids = tok.encode("Hi there. The <image> provides an overview.\nWhat is region1 <bbox>?\n### ")
    expected = (
        [t.bos_id] + p.encode("Hi there. The")  # whitespace before an added token is stripped
        + [t.im_start_id] + [t.im_patch_id] * 4 + [t.im_end_id]
        + p.encode("provides an overview.\nWhat is region1")  # ...and after it; own dummy prefix
        + [t.bbox_id] + p.encode("?\n### ")  # trailing text keeps its trailing space
    )
    assert ids == expected
    assert p.encode("provides")[0] == p.encode(" provides")[0]  # dummy prefix: "▁provides" either way


def test_each_piece_gets_its_own_dummy_prefix(tok):
    p = tok.pieces
    ids = tok.encode("red<bbox>circle", add_bos=False)
    assert ids == p.encode("red") + [tok.tokens.bbox_id] + p.encode("circle")
    assert tok.pieces.decode(p.encode("circle")) == "circle"
    assert p._tok.id_to_token(p.encode("circle")[0]) == "▁circle"


def test_decode_skips_added_and_control_tokens(tok):
    t = tok.tokens
    ids = [t.bos_id] + tok.pieces.encode("Assistant: a red circle") + [t.bbox_id, t.eos_id]
    assert tok.decode(ids) == "Assistant: a red circle"


def test_builtin_tokenizer_is_deterministic_and_round_trips(tmp_path):
    a, b = BuiltinPieces(), BuiltinPieces()
    text = "The region shows a large wooden blue square, left of region2.\n###"
    assert a.encode(text) == b.encode(text)
    a.save(tmp_path)
    assert BuiltinPieces.load(tmp_path).encode(text) == a.encode(text)
    assert a.decode(a.encode(text)) == text
    assert a.vocab_size == 2048
