import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.sources import CHECK_ROWS, SourceError, file_uri, open_source


def real(p) -> str:
    return os.path.realpath(p)


def test_folder_glob_manifests_and_coco(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "notes.txt"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    (tmp_path / "imgs" / ".hidden").write_bytes(b"x")
    folder = open_source(str(tmp_path / "imgs"))
    imgs = real(tmp_path / "imgs")
    assert [i.image_id for i in folder.to_items()] == [f"{imgs}/a.png", f"{imgs}/notes.txt", f"{imgs}/sub/b.jpg"]
    assert all(i.uri == i.image_id for i in folder.to_items())  # every file gets a row
    assert [i.image_id for i in open_source(str(tmp_path / "imgs"), include_all_files=False).to_items()] == [
        f"{imgs}/a.png", f"{imgs}/sub/b.jpg"]
    assert [i.uri for i in open_source(str(tmp_path / "imgs" / "**" / "*.jpg")).to_items()] == [f"{imgs}/sub/b.jpg"]

    (tmp_path / "m.csv").write_text("path,image_id\nimgs/a.png,A\nimgs/sub/b.jpg,B\n")
    items = open_source(str(tmp_path / "m.csv")).to_items()
    assert [(i.image_id, i.uri) for i in items] == [("A", f"{imgs}/a.png"), ("B", f"{imgs}/sub/b.jpg")]
    pq.write_table(pa.table({"uri": ["imgs/a.png", "imgs/sub/b.jpg"]}), tmp_path / "m.parquet")
    assert [i.image_id for i in open_source(str(tmp_path / "m.parquet")).to_items()] == [f"{imgs}/a.png", f"{imgs}/sub/b.jpg"]

    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "imgs/a.png"}], "annotations": []}))
    coco = open_source(str(tmp_path / "c.json"))
    assert coco.kind == "coco" and coco.coco == tmp_path / "c.json" and coco.items[0].image_id == "7"


def test_a_folder_is_walked_in_sorted_path_order(tmp_path):
    """The lazy walk lists what a sorted ``rglob`` did, in the same order (symlinked folders not entered)."""
    from pathlib import Path

    for name in ("a/b.png", "a.b", "a-c/x.png", "b/.hidden", "b/c/d.png", "Z.png", ".git/cfg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    expected = [file_uri(p) for p in sorted(Path(tmp_path).rglob("*")) if not p.is_dir() and not p.name.startswith(".")]
    assert [i.uri for i in open_source(str(tmp_path)).to_items()] == expected


def test_a_manifest_streams_in_blocks_with_ids_as_written(tmp_path):
    """A manifest is read in blocks, never whole: its ids stay the strings written ("0007", not 7), a
    Parquet column of integer ids reads as their digits, and a row past the ones checked at opening
    that names a path outside the root is that image's error row (the rest of the job goes on)."""
    import pyarrow as pa

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    n = CHECK_ROWS + 5
    lines = [f"{k:04d},imgs/a.png" for k in range(n - 1)] + [f"{n - 1:04d},../outside.png"]
    (tmp_path / "m.csv").write_text("image_id,uri\n" + "\n".join(lines) + "\n")
    source = open_source(str(tmp_path / "m.csv"))
    blocks = list(source.blocks(rows=100))
    assert len(blocks) >= n // 100 and max(b.num_rows for b in blocks) <= 100
    rows = pa.concat_tables(blocks).to_pylist()
    assert len(rows) == source.count() == n
    assert rows[7] == {"image_id": "0007", "uri": real(tmp_path / "imgs" / "a.png"), "error": None}
    assert rows[-1]["error"].startswith("source: ") and "outside" in rows[-1]["error"]
    pq.write_table(pa.table({"id": [7, 8], "path": ["imgs/a.png"] * 2}), tmp_path / "i.parquet")
    assert [i.image_id for i in open_source(str(tmp_path / "i.parquet")).to_items()] == ["7", "8"]


def test_ids_do_not_depend_on_how_the_source_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "x.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    spellings = ["data", "./data", str(tmp_path / "data"), "link", "data/sub", "data/*/*.png", str(tmp_path / "data/**/*.png")]
    ids = {s: [i.image_id for i in open_source(s).to_items()] for s in spellings}
    assert all(v == [real(tmp_path / "data/sub/x.png")] for v in ids.values()), ids
    monkeypatch.chdir(tmp_path / "data")
    assert [i.image_id for i in open_source("sub").to_items()] == [real(tmp_path / "data/sub/x.png")]


def test_a_csv_with_a_byte_order_mark_keeps_its_id_column(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_bytes("\ufeffimage_id,uri\nA,a.png\n".encode("utf-8"))
    assert [(i.image_id, i.uri) for i in open_source(str(tmp_path / "m.csv")).to_items()] == [("A", real(tmp_path / "a.png"))]


def test_paths_inside_input_files_stay_under_the_root(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "ds" / "m.csv").write_text("uri\n../secret.png\n")
    with pytest.raises(SourceError, match="outside .*--root"):
        open_source(str(tmp_path / "ds" / "m.csv"))
    assert open_source(str(tmp_path / "ds" / "m.csv"), root=tmp_path).to_items()[0].uri == real(tmp_path / "secret.png")
    (tmp_path / "ds" / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "/etc/passwd"}]}))
    with pytest.raises(SourceError, match="outside"):
        open_source(str(tmp_path / "ds" / "c.json"))
    (tmp_path / "ds" / "r.csv").write_text("uri\nhttps://example.com/a.png\n")
    with pytest.raises(SourceError, match="remote image 'https://example.com/a.png'.*local files only"):
        open_source(str(tmp_path / "ds" / "r.csv"))
    with pytest.raises(SourceError, match="remote"):
        open_source("s3://bucket/images/")


def test_names_that_are_not_utf8_become_file_uris(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    (tmp_path / name).write_bytes(b"x")
    (item,) = open_source(str(tmp_path)).to_items()
    assert item.uri.startswith("file://") and "%E9" in item.uri
    item.uri.encode("utf-8")  # fits a Parquet string
    from pipeline.decode import read_file

    assert read_file(item.uri) == b"x"  # and names the same file
    assert file_uri(tmp_path / "plain.png") == real(tmp_path / "plain.png")


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: str(p / "*.nothing"), "matches no files"),
    (lambda p: (p / "e.csv").write_text("name\nx\n") and str(p / "e.csv"), "needs a column naming the images"),
    (lambda p: (p / "d.csv").write_text("uri,id\na,1\nb,1\n") and str(p / "d.csv"), "more than once"),
    (lambda p: (p / "bad.json").write_text("{}") and str(p / "bad.json"), "not a COCO json"),
    (lambda p: (p / "x.tar").write_text("") or str(p / "x.tar"), "cannot read a source"),
])
def test_unusable_sources_say_why(tmp_path, make, message):
    with pytest.raises(SourceError, match=message):
        open_source(make(tmp_path))
