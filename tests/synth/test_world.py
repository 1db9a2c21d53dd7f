"""The synthetic world and the datasets written from it: deterministic scenes, exact relations,
and files whose every label agrees with the scene's ground truth."""

import json
import re

import numpy as np
import pytest

from pipeline.compose import Templates
from synth.dataset import caption, write_dataset
from synth.world import COLORS, MATERIALS, SHAPES, SIZES, SceneObject, generate_scene, relation


def obj(box) -> SceneObject:
    return SceneObject("circle", "red", "metal", "small", tuple(float(v) for v in box))


@pytest.mark.parametrize("a, b, want", [
    ((0, 0, 10, 10), (30, 2, 40, 12), "left of"),
    ((30, 2, 40, 12), (0, 0, 10, 10), "right of"),
    ((0, 0, 10, 10), (3, 40, 13, 50), "above"),
    ((3, 40, 13, 50), (0, 0, 10, 10), "below"),
    ((0, 0, 10, 10), (5, 5, 20, 20), "overlapping"),
    ((0, 0, 10, 10), (10, 0, 20, 10), "left of"),  # touching edges do not overlap
    ((0, 0, 10, 10), (20, 25, 30, 35), "above"),  # the axis with the larger gap decides
])
def test_relation_is_exact(a, b, want):
    assert relation(obj(a), obj(b)) == want


def test_a_seed_always_draws_the_same_scene_and_seeds_differ():
    a, b, c = generate_scene(123), generate_scene(123), generate_scene(124)
    assert np.array_equal(a.image, b.image) and a.objects == b.objects
    assert a.objects != c.objects
    for scene in (a, c):
        assert 2 <= len(scene.objects) <= 5
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            assert o.shape in SHAPES and o.color in COLORS and o.material in MATERIALS and o.size in SIZES


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_dataset(out, range(500, 506), val_fraction=0.34)
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_file_agrees_with_the_ground_truth(world):
    truths = _lines(world / "ground_truth.jsonl")
    conversations = _lines(world / "conversations.jsonl")
    drills = _lines(world / "relations.jsonl")
    assert len(truths) == len(conversations) == len(drills) == 6
    t = Templates()
    for gt, conv, drill in zip(truths, conversations, drills):
        objects = [SceneObject(**(o | {"box": tuple(o["box"])})) for o in gt["objects"]]
        assert conv["image"] == drill["image"] == gt["image"] and (world / gt["image"]).is_file()
        assert conv["boxes"] == drill["boxes"] == [list(o.box) for o in objects]
        asked = {}
        for q, a in zip(conv["conversations"][::2], conv["conversations"][1::2]):
            assert q["from"] == "human" and a["from"] == "gpt"
            asked.setdefault(q["value"], []).append((q["regions"], a["value"]))
        for regions, answer in asked[t.attributes["color"]]:
            assert answer == objects[regions[0]].color
        for regions, answer in asked[t.caption_brief]:
            assert answer == caption(objects[regions[0]])
        for (i, j), answer in asked.get(t.relation, []):
            assert answer == f"region1 is {gt['relations'][f'{i},{j}']} region2"
        # the drill: every ordered pair exactly once, answered from the ground truth
        pairs = []
        for q, a in zip(drill["conversations"][::2], drill["conversations"][1::2]):
            assert q["value"] == t.relation
            i, j = q["regions"]
            assert a["value"] == f"region1 is {relation(objects[i], objects[j])} region2"
            pairs.append((i, j))
        n = len(objects)
        assert sorted(pairs) == [(i, j) for i in range(n) for j in range(n) if i != j]


def test_the_yolo_set_holds_every_object_in_normalised_boxes(world):
    truths = _lines(world / "ground_truth.jsonl")
    labels = sorted((world / "yolo" / "labels").rglob("*.txt"))
    assert len(labels) == 6 and len(list((world / "yolo" / "labels" / "val").glob("*.txt"))) == 2
    by_name = {p.stem: p for p in labels}
    for gt in truths:
        rows = [line.split() for line in by_name[re.sub(r"\.png$", "", gt["image"].split("/")[-1])].read_text().splitlines()]
        assert len(rows) == len(gt["objects"])
        for row, o in zip(rows, gt["objects"]):
            x1, y1, x2, y2 = o["box"]
            assert int(row[0]) == SHAPES.index(o["shape"])
            got = np.array([float(v) for v in row[1:]])
            want = np.array([(x1 + x2) / 2 / gt["width"], (y1 + y2) / 2 / gt["height"],
                             (x2 - x1) / gt["width"], (y2 - y1) / gt["height"]])
            assert np.allclose(got, want, atol=1e-5)
    assert "names:" in (world / "yolo" / "data.yaml").read_text()


def test_a_world_folder_can_be_moved(tmp_path):
    """The YOLO set's image links are relative and ``data.yaml`` has no absolute ``path:``
    (ultralytics roots the set at the file's folder): a moved world still trains and evaluates."""
    from pathlib import Path

    world = write_dataset(tmp_path / "here", range(7_100_000, 7_100_004), val_fraction=0.5)
    moved = Path(world.rename(tmp_path / "there"))
    assert "path:" not in (moved / "yolo" / "data.yaml").read_text()
    links = sorted((moved / "yolo" / "images").glob("*/*.png"))
    assert len(links) == 4 and all(p.is_symlink() and p.resolve().parent == (moved / "images").resolve() and
                                   p.stat().st_size > 0 for p in links)
