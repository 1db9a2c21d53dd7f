import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.arrow import Provenance, result_to_row, to_table
from pipeline.records import ImageResult
from sinks.parquet import (SCHEMA, ParquetSink, commit_part, committed_counts, id_hashes, part_files, read_commit,
                           read_rows, reconcile, remove_ids, scan, statuses)
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
    assert pq.read_schema(part_files(tmp_path)[0]).metadata[b"roiscribe.schema"] == b"roiscribe/2"
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


def test_a_part_is_its_own_commit_record_and_a_retried_writer_replaces_it(tmp_path):
    """The counts of a part live in its footer (written by the same rename as its rows), and a
    writer run again on the same rows (a Ray task retried after its worker died past the rename)
    lands on the same file instead of adding a copy."""
    (tmp_path / "data").mkdir()
    rows = to_table([ok_result("a"), ImageResult("b", "/x", "error", "decode: nope")], PROV)
    first = commit_part(tmp_path / "data", 3, rows)
    again = commit_part(tmp_path / "data", 3, rows, written_by="node-1")
    assert first["part"] == again["part"] and len(part_files(tmp_path)) == 1
    expected = {"rows": 2, "ok": 1, "error": 1, "regions": 2}
    assert read_commit(part_files(tmp_path)[0]) == {**expected, "written_by": "node-1"}
    commit_part(tmp_path / "data", 4, to_table([ok_result("c")], PROV))
    assert committed_counts(tmp_path) == {"rows": 3, "ok": 2, "error": 1, "regions": 4}
    assert not list((tmp_path / "data").glob(".*tmp"))


def test_scan_indexes_ids_as_hashes_and_keeps_each_image_once(tmp_path):
    """The resume index: sorted 64-bit hashes of the ids of ok rows and of error rows (no ids held);
    an id in several parts keeps the newest part's row, the older parts rewritten with their
    commit records recounted; a dry run's scan changes nothing."""
    with ParquetSink(tmp_path, rows_per_part=2) as sink:
        sink.write(to_table([ImageResult(i, i, "error", "x") for i in ("a", "b", "c")], PROV))
    with ParquetSink(tmp_path) as sink:
        sink.write(to_table([ok_result("b"), ok_result("d")], PROV))
    looked = scan(tmp_path, repair=False)
    assert (looked.rows, looked.duplicates_removed, read_rows(tmp_path).num_rows) == (5, 0, 5)
    index = scan(tmp_path)
    assert (index.rows, index.duplicates_removed) == (4, 1)
    in_ok, in_error = index.classify(id_hashes(["a", "b", "c", "d", "z"]))
    assert in_ok.tolist() == [False, True, False, True, False]
    assert in_error.tolist() == [True, False, True, False, False]
    assert index.ok.dtype == np.uint64 and list(index.ok) == sorted(index.ok)
    assert committed_counts(tmp_path) == {"rows": 4, "ok": 2, "error": 2, "regions": 4}
    assert id_hashes(["a"])[0] == id_hashes(pa.array(["a"]))[0]  # the same from Python and from Arrow


# A writer that finishes one small part, then writes one large part (~150 MB of incompressible
# text, a fraction of a second to write): the test kills it while that part is being written.
_WRITER = """
import os, sys
import pyarrow as pa
from pipeline.arrow import SCHEMA
from sinks.parquet import ParquetSink

def rows(n, first, width):
    noise = os.urandom(n * width // 2).hex()
    columns = {"image_id": [f"img-{first + i}" for i in range(n)], "status": ["error"] * n,
               "error": [noise[width * i:width * (i + 1)] for i in range(n)]}
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
                                 for f in SCHEMA], schema=SCHEMA)

with ParquetSink(sys.argv[1], rows_per_part=10**9) as sink:
    sink.write(rows(10, 0, 8))
    sink.flush()
    large = rows(300_000, 10, 512)
    sink.write(large)
"""


def _kill_while_writing(out, deadline_s: float = 120.0) -> bool:
    """Start the writer, SIGKILL it as soon as a second file in OUT/data has bytes; True when the
    kill landed mid-write (the second file is not a whole part)."""
    import signal
    import subprocess
    import sys
    import time

    data = out / "data"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)])
    first = None
    t0 = time.time()
    try:
        while time.time() - t0 < deadline_s and proc.poll() is None:
            entries = sorted(os.scandir(data), key=lambda e: e.name) if data.is_dir() else []
            whole = [e for e in entries if e.name.startswith("part-")]
            if first is None and whole:
                first = whole[0].name
            others = [e for e in entries if first is not None and e.name != first and e.stat().st_size > 0]
            if others:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert first is not None, "the writer never wrote its first part"
    return 300_000 not in map(_rows, part_files(out))


def _rows(part) -> int | None:
    """Rows of a part file, None when it cannot be read."""
    try:
        return pq.read_metadata(part).num_rows
    except Exception:  # noqa: BLE001 -- whatever pyarrow raises for a broken file
        return None


def test_a_writer_killed_mid_part_leaves_only_whole_parts(tmp_path):
    """Part files are whole or absent: after a SIGKILL in the middle of writing a part, the parts a
    reader sees are exactly the ones finished before it, all readable, nothing to set aside."""
    import shutil

    from sinks.parquet import set_aside_corrupt_parts

    for attempt in range(3):  # the kill must land during the write; on a busy machine it may come late
        out = tmp_path / f"out{attempt}"
        if _kill_while_writing(out):
            break
        shutil.rmtree(out)
    else:
        pytest.fail("the writer finished each time before it could be killed mid-write")
    assert [_rows(p) for p in part_files(out)] == [10]
    assert read_rows(out).column("image_id").to_pylist() == [f"img-{i}" for i in range(10)]
    assert set_aside_corrupt_parts(out) == []
    assert len(list((out / "data").iterdir())) == 2  # the interrupted write left only a hidden temporary file
    shutil.rmtree(out)  # ~100 MB
