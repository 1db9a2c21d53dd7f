"""Where a job's images come from: a folder, a glob, a manifest (Parquet / CSV), or a COCO json.

Each source yields ``SourceItem``s (an id and a uri); a COCO source also carries its boxes, which
the job then uses through the given-boxes detector. Only the files the user pointed at are read.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
URI_COLUMNS = ("uri", "path", "image", "file", "file_name", "url")
ID_COLUMNS = ("image_id", "id")


class SourceError(ValueError):
    """The source argument itself is unusable (the job exits non-zero)."""


@dataclass(frozen=True)
class SourceItem:
    image_id: str
    uri: str


@dataclass
class Source:
    items: list[SourceItem]
    kind: str
    coco: Path | None = None  # set for COCO sources: boxes come from this file
    given: str | None = None  # a given-boxes detector spec the source brings (e.g. a Label Studio pull)

    @property
    def given_spec(self) -> str | None:
        """The detector spec of the boxes this source carries, if any (overrides --detector)."""
        return f"given:coco:{self.coco}" if self.coco else self.given


def open_source(spec: str, include_all_files: bool = True) -> Source:
    """Items of a folder (every file under it: non-images become error rows, so nothing is
    silently skipped), a glob pattern, a ``.parquet`` / ``.csv`` manifest or a COCO ``.json``."""
    path = Path(spec)
    if any(ch in spec for ch in "*?[") and not path.exists():
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise SourceError(f"the pattern {spec!r} matches no files")
        return Source(_items(files), "glob")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not include_all_files:
            files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise SourceError(f"the folder {path} holds no files")
        return Source(_items(files, root=path), "folder")
    if not path.exists():
        raise SourceError(f"the source {spec!r} does not exist (expected a folder, a glob, a .parquet/.csv "
                          "manifest or a COCO .json)")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv"):
        return Source(_manifest(path), "manifest")
    if suffix == ".json":
        return _coco(path)
    raise SourceError(f"cannot read a source from {path.name}: expected a folder, a glob, .parquet, .csv or .json")


def _items(files: list[Path], root: Path | None = None) -> list[SourceItem]:
    return [SourceItem(str(p.relative_to(root)) if root else str(p), str(p)) for p in files]


def _manifest(path: Path) -> list[SourceItem]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise SourceError(f"the manifest {path} has no rows")
    columns = set(rows[0])
    uri_col = next((c for c in URI_COLUMNS if c in columns), None)
    if uri_col is None:
        raise SourceError(f"the manifest {path} needs a column naming the images, one of {list(URI_COLUMNS)}; "
                          f"it has {sorted(columns)}")
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    base = path.parent
    items = []
    for row in rows:
        uri = str(row[uri_col])
        if not Path(uri).is_absolute() and "://" not in uri:
            uri = str(base / uri)
        items.append(SourceItem(str(row[id_col]) if id_col else uri, uri))
    _check_unique(items, path)
    return items


def _coco(path: Path) -> Source:
    try:
        data = json.loads(path.read_text())
        images = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SourceError(f"{path} is not a COCO json with an 'images' list: {e}") from None
    base = path.parent
    items = [SourceItem(str(im["id"]), str(base / im["file_name"])) for im in images]
    _check_unique(items, path)
    return Source(items, "coco", coco=path)


def _check_unique(items: list[SourceItem], path: Path) -> None:
    seen: set[str] = set()
    dupes = [i.image_id for i in items if i.image_id in seen or seen.add(i.image_id)]
    if dupes:
        raise SourceError(f"{path} lists image ids more than once, e.g. {dupes[:3]}; ids must be unique")
