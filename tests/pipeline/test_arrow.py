"""The one conversion between records and Arrow rows (Parquet and Ray batches)."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrow import IN_FLIGHT, SCHEMA, Provenance, from_table, result_to_row, row_to_result, to_table
from pipeline.records import Answer, DecodedImage, ImageResult, Regions, RelationAnswer

PROV = Provenance("yolo:demo/detector.pt", "demo/gpt4roi", "v1")


def ok_result(image_id="a"):
    regions = Regions(np.array([[10, 20, 50, 60], [0, 0, 100, 80]], np.float32), [0.9, 0.5], [3, -1],
                      ["star", ""], "yolo", {"low_score": 2})
    answers = [{"caption": Answer("a red star", "a red star", "ok", -0.1, -0.3),
                "color": Answer("red", "red", "ok", -0.05, -0.05)},
               {"caption": Answer(None, "", "empty", -1.0, -2.0)}]
    relations = [RelationAnswer(0, "left of", 1, "region1 is left of region2", "ok", -0.2, -0.4)]
    return ImageResult(image_id, f"/data/{image_id}.png", "ok", "", 100, 80, regions, answers, relations,
                       {"decode": 0.01, "detect": 0.02, "describe": 0.3})


def test_row_conversion_is_exact():
    row = result_to_row(ok_result(), PROV)
    assert row["num_regions"] == 2 and row["status"] == "ok" and row["error"] == ""
    r0 = row["regions"][0]
    assert r0["box"] == [10, 20, 50, 60] and r0["box_norm"] == [0.1, 0.25, 0.5, 0.75]
    assert (r0["label"], r0["class_id"], r0["caption"], r0["caption_mean_logprob"]) == ("star", 3, "a red star", -0.1)
    assert [a["name"] for a in r0["answers"]] == ["caption", "color"]
    assert row["regions"][1]["caption"] is None
    assert row["relations"] == [{"subject": 0, "predicate": "left of", "object": 1, "raw": "region1 is left of region2",
                                 "status": "ok", "mean_logprob": -0.2, "min_logprob": -0.4, "probability": None}]
    assert json.loads(row["dropped"]) == {"low_score": 2}
    assert (row["detector"], row["model"], row["processed_by"]) == ("yolo:demo/detector.pt", "demo/gpt4roi", "in-process")
    assert row["timings"] == {"decode_s": 0.01, "detect_s": 0.02, "describe_s": 0.3}
    error = result_to_row(ImageResult("b", "/data/b.png", "error", "decode: empty file (0 bytes)"), PROV)
    assert (error["num_regions"], error["regions"], error["relations"]) == (0, [], [])


def test_records_round_trip_through_arrow():
    results = [ok_result("a"), ImageResult("b", "/b.png", "error", "decode: nope"), ok_result("c")]
    table = to_table(results, PROV)
    assert table.schema.equals(SCHEMA, check_metadata=False) and table.num_rows == 3
    back = from_table(table)
    assert [r.image_id for r in back] == ["a", "b", "c"] and back[1].status == "error" and back[1].error == "decode: nope"
    got, want = back[0], results[0]
    np.testing.assert_array_equal(got.regions.boxes, want.regions.boxes)
    np.testing.assert_allclose(got.regions.scores, want.regions.scores)
    assert got.regions.class_names == ["star", ""] and list(got.regions.class_ids) == [3, -1]
    assert got.regions.dropped == {"low_score": 2} and got.regions.detector == PROV.detector
    assert got.answers[0]["color"].value == "red" and got.answers[1]["caption"].status == "empty"
    assert got.relations[0].predicate == "left of" and (got.relations[0].subject, got.relations[0].object) == (0, 1)
    assert got.timings == {"decode": 0.01, "detect": 0.02, "describe": 0.3}
    # converting again gives the same rows: one pair, no drift
    assert to_table(back, PROV).equals(table)


def test_in_flight_rows_carry_the_pixels():
    pixels = np.random.RandomState(0).randint(0, 256, (80, 100, 3)).astype(np.uint8)
    result = ok_result("a")
    result.answers, result.relations = [], []  # detected, not yet described
    result.image = DecodedImage("a", result.uri, pixels)
    table = to_table([result, ImageResult("b", "/b.png", "error", "decode: x")], pixels=True)
    assert table.schema.equals(IN_FLIGHT, check_metadata=False)
    a, b = from_table(table)
    np.testing.assert_array_equal(a.image.array, pixels)
    assert a.image.array.flags.writeable and b.image is None
    assert len(a.regions) == 2 and a.answers == [{}, {}]
    assert isinstance(pa.Table.from_pylist([result_to_row(a)], schema=SCHEMA), pa.Table)


def test_row_to_result_reads_a_row_written_by_the_sink(tmp_path):
    from sinks.parquet import ParquetSink, read_rows

    with ParquetSink(tmp_path) as sink:
        sink.write(to_table([ok_result("x")], PROV))
    (row,) = read_rows(tmp_path).to_pylist()
    assert row_to_result(row).answers[0]["caption"].value == "a red star"


def _without_probability(t: pa.DataType) -> pa.DataType:
    """The same type with every struct field named ``probability`` removed (schema roiscribe/1)."""
    if pa.types.is_list(t):
        return pa.list_(_without_probability(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _without_probability(f.type)) for f in t if f.name != "probability"])
    return t


def test_a_part_written_as_schema_1_reads_as_schema_2(tmp_path):
    """Outputs written before ``probability`` existed stay readable: read with ``schema=SCHEMA``,
    the new fields are null and everything else is as written."""
    import pyarrow.parquet as pq

    old_schema = pa.schema([pa.field(f.name, _without_probability(f.type)) for f in SCHEMA])
    assert "probability" not in str(old_schema) and "probability" in str(SCHEMA)
    rows = [result_to_row(ok_result("a"), PROV)]
    for g in rows[0]["regions"]:
        del g["probability"]
        for a in g["answers"]:
            del a["probability"]
    for x in rows[0]["relations"]:
        del x["probability"]
    pq.write_table(pa.Table.from_pylist(rows, schema=old_schema), tmp_path / "old.parquet")
    table = pq.read_table(tmp_path / "old.parquet", schema=SCHEMA)
    (result,) = from_table(table)
    color, rel = result.answers[0]["color"], result.relations[0]
    assert (color.value, color.raw, color.status, color.probability) == ("red", "red", "ok", None)
    assert color.mean_logprob == pytest.approx(-0.05)
    assert (rel.subject, rel.predicate, rel.object, rel.probability) == (0, "left of", 1, None)
    assert result.region_probabilities == []
    assert table.to_pylist()[0]["regions"][0]["probability"] is None
