import pytest

from pipeline.parse import parse_attribute, parse_caption, parse_relation


@pytest.mark.parametrize(
    "field, answer, value, status",
    [
        ("color", "red", "red", "ok"),
        ("color", "It is a bright RED circle.", "red", "ok"),
        ("color", "grey", "gray", "ok"),
        ("color", "It is not red, it is blue", "blue", "ok"),
        ("color", "no red here", None, "unknown"),
        ("color", "reddish", None, "unknown"),  # whole words only
        ("color", "banana", None, "unknown"),
        ("color", "", None, "empty"),
        ("color", "   \n ", None, "empty"),
        ("color", "blue and red", "blue", "ok"),  # the first one named
        ("shape", "The object is circular", "circle", "ok"),
        ("shape", "an oval", "ellipse", "ok"),
        ("shape", "a rect", None, "unknown"),  # truncated
        ("material", "It is made of wooden planks.", "wood", "ok"),
        ("material", "stainless steel", "metal", "ok"),
        ("action", "The man is riding a horse", "riding", "ok"),
        ("action", "nothing, it is static", "none", "ok"),
        ("size", "quite big", "quite big", "ok"),  # a field without vocabulary keeps its text
    ],
)
def test_attribute_table(field, answer, value, status):
    parsed = parse_attribute(field, answer)
    assert (parsed.value, parsed.status, parsed.raw) == (value, status, answer)


@pytest.mark.parametrize(
    "answer, triple, status",
    [
        ("region1 is to the left of region2", (4, "left of", 9), "ok"),
        ("Region 2 is above region 1.", (9, "above", 4), "ok"),
        ("left of", (4, "left of", 9), "ok"),
        ("It is to the right of region2", (4, "right of", 9), "ok"),
        ("region2 is bigger than it", (9, "larger than", 4), "ok"),
        ("It is larger than region1", (9, "larger than", 4), "ok"),
        ("They overlap with each other", (4, "overlapping", 9), "ok"),
        ("region1 is not left of region2, it is right of it", (4, "right of", 9), "ok"),
        ("I cannot tell", (4, None, 9), "unknown"),
        ("", (4, None, 9), "empty"),
        ("region7 is under region1", (9, "below", 4), "ok"),  # unknown region7 ignored; region1 is the object
    ],
)
def test_relation_table(answer, triple, status):
    rel = parse_relation(answer, (4, 9))
    assert (rel.subject, rel.predicate, rel.object) == triple
    assert rel.status == status and rel.raw == answer


@pytest.mark.parametrize("answer, value, status", [("  a red\n circle ", "a red circle", "ok"), ("", None, "empty"),
                                                  ("###", "###", "ok")])
def test_caption(answer, value, status):
    parsed = parse_caption(answer)
    assert (parsed.value, parsed.status, parsed.raw) == (value, status, answer)
