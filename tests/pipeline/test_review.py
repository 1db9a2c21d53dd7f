import math

import pytest

from pipeline.review import (
    confidence, label_attributes, label_disagreements, top_relations, vocabulary_value,
)


def test_confidence_is_the_least_likely_token_else_the_mean():
    assert confidence(-0.1, -0.5) == pytest.approx(math.exp(-0.5))
    assert confidence(-0.1, None) == pytest.approx(math.exp(-0.1))
    assert confidence(None, None) is None and confidence(float("nan"), None) is None
    assert confidence(0.0, 1e-7) == 1.0  # float noise above 0 is still a probability


def test_a_label_names_a_value_only_as_a_whole_word_or_spelling():
    assert vocabulary_value("shape", "Hexagonal") == "hexagon"
    assert vocabulary_value("shape", "round") == "circle"
    assert vocabulary_value("color", "red car") is None  # contains a colour, is not one
    assert vocabulary_value("shape", "person") is None and vocabulary_value("unknown-field", "red") is None


def test_the_attribute_compared_with_the_label_must_name_every_class():
    asked = ["color", "shape", "material", "action"]
    assert label_attributes(["circle", "star", "hexagon"], asked) == ["shape"]
    assert label_attributes(["person", "car", "orange"], asked) == []  # COCO-like classes: nothing compared
    assert label_attributes(["orange"], ["shape"]) == []
    assert label_attributes([], asked) == [] and label_attributes([""], asked) == []


def test_disagreements_name_the_attribute_and_ignore_what_cannot_be_compared():
    assert label_disagreements("hexagon", {"shape": "circle", "color": "red"}, ["shape"]) == ["shape"]
    assert label_disagreements("hexagon", {"shape": "hexagon"}, ["shape"]) == []
    assert label_disagreements("hexagonal", {"shape": "hexagon"}, ["shape"]) == []  # a spelling of the same value
    assert label_disagreements("hexagon", {"shape": None}, ["shape"]) == []  # an unparsed answer
    assert label_disagreements("person", {"shape": "circle"}, ["shape"]) == []  # a class outside the vocabulary
    assert label_disagreements("hexagon", {"shape": "circle"}, []) == []


def test_top_relations_most_confident_first_ties_in_order_unknown_last():
    rels = ["a", "b", "c", "d", "e"]
    conf = [0.5, None, 0.9, 0.5, 0.7]
    assert top_relations(rels, conf, None) == ["c", "e", "a", "d", "b"]
    assert top_relations(rels, conf, 2) == ["c", "e"]
    assert top_relations(rels, conf, 0) == []
