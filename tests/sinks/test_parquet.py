import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.arrow import Provenance, result_to_row, to_table
from pipeline.records import ImageResult
from sinks.parquet import SCHEMA, ParquetSink, part_files, read_rows, reconcile, remove_ids, statuses
from tests.pipeline.test_arrow import ok_result

PROV = Provenance("yolo:demo/detector.pt", "demo/gpt4roi", "v1")


def test_written_parts_read_back_with_pandas_pyarrow_polars_duckdb(tmp_path):
    rows = [result_to_row(ok_result(f"img{i}"), PROV) for i in range(5)]
    rows.append(result_to_row(ImageResult("bad", "/x", "error", "decode: nope"), PROV))
    with ParquetSink(tmp_path, rows_per_part=4) as sink:
        sink.write(to_table([ok_result(f"img{i}") for i in range(3)], PROV, pixels=True))  # a table, extra columns
        sink.write(rows[3:])  # row dicts
    assert sink.written == 6
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
        sink.write(to_table([ImageResult(i, i, "error", "x") for i in ("a", "b", "c")], PROV))
    with ParquetSink(tmp_path) as sink:  # a retry of b wrote its new row; the old one is still there
        sink.write(to_table([ok_result("b")], PROV))
    assert read_rows(tmp_path).num_rows == 4
    assert reconcile(tmp_path) == 1
    assert statuses(tmp_path) == {"a": "error", "b": "ok", "c": "error"}
    assert remove_ids(tmp_path, {"c"}) == 1 and set(statuses(tmp_path)) == {"a", "b"}
