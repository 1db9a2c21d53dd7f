import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.flow import Answer, ImageResult, RelationAnswer
from pipeline.records import Regions
from sinks.parquet import (SCHEMA, ParquetSink, Provenance, part_files, read_rows, reconcile, remove_ids,
                           result_to_row, statuses)

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
                                 "status": "ok", "mean_logprob": -0.2, "min_logprob": -0.4}]
    assert json.loads(row["dropped"]) == {"low_score": 2}
    error = result_to_row(ImageResult("b", "/data/b.png", "error", "decode: empty file (0 bytes)"), PROV)
    assert (error["num_regions"], error["regions"], error["relations"]) == (0, [], [])


def test_written_parts_read_back_with_pandas_pyarrow_polars_duckdb(tmp_path):
    rows = [result_to_row(ok_result(f"img{i}"), PROV) for i in range(5)]
    rows.append(result_to_row(ImageResult("bad", "/x", "error", "decode: nope"), PROV))
    with ParquetSink(tmp_path, rows_per_part=4) as sink:
        sink.write(rows)
    assert len(part_files(tmp_path)) == 2 and not list((tmp_path / "data").glob(".*tmp"))
    table = read_rows(tmp_path)
    assert table.schema.equals(SCHEMA, check_metadata=False) and table.num_rows == 6
    assert pq.read_schema(part_files(tmp_path)[0]).metadata[b"roiscribe.schema"] == b"roiscribe/1"
    import pandas as pd

    df = pd.read_parquet(tmp_path / "data")
    assert sorted(df["image_id"]) == sorted(r["image_id"] for r in rows)
    assert df.set_index("image_id").loc["img3", "regions"][0]["caption"] == "a red star"
    import polars as pl

    assert pl.read_parquet(str(tmp_path / "data" / "*.parquet"))["num_regions"].sum() == 10
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"select image_id, unnest(regions).caption as c from '{tmp_path}/data/*.parquet' "
                     "where status = 'ok' order by image_id").fetchall()
    assert got[:2] == [("img0", "a red star"), ("img0", None)]


def test_reconcile_and_remove_keep_each_image_once(tmp_path):
    with ParquetSink(tmp_path, rows_per_part=2) as sink:
        sink.write([result_to_row(ImageResult(i, i, "error", "x"), PROV) for i in ("a", "b", "c")])
    with ParquetSink(tmp_path) as sink:  # a retry of b wrote its new row; the old one is still there
        sink.write([result_to_row(ok_result("b"), PROV)])
    assert read_rows(tmp_path).num_rows == 4
    assert reconcile(tmp_path) == 1
    assert statuses(tmp_path) == {"a": "error", "b": "ok", "c": "error"}
    assert remove_ids(tmp_path, {"c"}) == 1 and set(statuses(tmp_path)) == {"a", "b"}
