import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.sources import SourceError, open_source


def test_folder_glob_manifests_and_coco(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "notes.txt"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    (tmp_path / "imgs" / ".hidden").write_bytes(b"x")
    folder = open_source(str(tmp_path / "imgs"))
    assert [i.image_id for i in folder.items] == ["a.png", "notes.txt", "sub/b.jpg"]  # every file gets a row
    assert [i.image_id for i in open_source(str(tmp_path / "imgs"), include_all_files=False).items] == ["a.png", "sub/b.jpg"]
    assert [i.uri for i in open_source(str(tmp_path / "imgs" / "**" / "*.jpg")).items] == [str(tmp_path / "imgs/sub/b.jpg")]

    (tmp_path / "m.csv").write_text("path,image_id\nimgs/a.png,A\n/abs/x.png,X\n")
    items = open_source(str(tmp_path / "m.csv")).items
    assert [(i.image_id, i.uri) for i in items] == [("A", str(tmp_path / "imgs/a.png")), ("X", "/abs/x.png")]
    pq.write_table(pa.table({"uri": ["imgs/a.png", "imgs/sub/b.jpg"]}), tmp_path / "m.parquet")
    assert [i.image_id for i in open_source(str(tmp_path / "m.parquet")).items] == [
        str(tmp_path / "imgs/a.png"), str(tmp_path / "imgs/sub/b.jpg")]

    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "imgs/a.png"}], "annotations": []}))
    coco = open_source(str(tmp_path / "c.json"))
    assert coco.kind == "coco" and coco.coco == tmp_path / "c.json" and coco.items[0].image_id == "7"


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
