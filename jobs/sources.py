"""Where a job's images come from: a folder, a glob, a manifest (Parquet / CSV), or a COCO json.

Each source yields ``SourceItem``s (an id and a uri); a COCO source also carries its boxes, which
the job then uses through the given-boxes detector. Only the files the user pointed at are read.

Image ids are stable whatever the spelling of the source: for a folder or a glob, the id is the
file's absolute path with its folders' symlinks resolved, so ``imgs``, ``./imgs``, ``/data/imgs`` and
``/data/imgs/sub`` name a file the same way, from any working directory, and a resume finds its
rows. A manifest's ``image_id`` (or ``id``) column is used as given; without one, the resolved
absolute path again. A COCO source uses the COCO image id. A file name that is not valid UTF-8
becomes a ``file:`` URI with percent-escapes (for its uri and id), so it fits the Parquet row and
reads back to the same file.

Paths inside input files (manifest uris, COCO ``file_name``) are confined to a root: by default
the folder of the manifest or COCO file, or the ``root`` the user gives. http(s) and s3 uris are
refused when the source is opened (roiscribe reads local files only), not failed one row at a time.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
URI_COLUMNS = ("uri", "path", "image", "file", "file_name", "url")
ID_COLUMNS = ("image_id", "id")
REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "ftp://")


class SourceError(ValueError):
    """The source argument itself is unusable (the job exits non-zero)."""


@dataclass(frozen=True)
class SourceItem:
    image_id: str
    uri: str
    error: str | None = None  # the item cannot be read at all (e.g. a pulled task without its image): its error row


@dataclass
class Source:
    items: list[SourceItem]
    kind: str
    coco: Path | None = None  # set for COCO sources: boxes come from this file
    given: str | None = None  # a given-boxes detector spec the source brings (e.g. a Label Studio pull)
    drawn: bool = False  # the given boxes were drawn by people: kept as drawn (no NMS, duplicates or cap)

    @property
    def given_spec(self) -> str | None:
        """The detector spec of the boxes this source carries, if any (overrides --detector)."""
        return f"given:coco:{self.coco}" if self.coco else self.given


def file_uri(path: str | Path) -> str:
    """A path as roiscribe writes it: absolute, its folder's symlinks resolved (not the file's own:
    two links to one file are two entries); a ``file:`` URI with percent-escapes when the name is
    not valid UTF-8."""
    path = os.path.abspath(path)
    text = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # surrogate-escaped bytes from the file system
        return "file://" + quote_from_bytes(os.fsencode(text), safe="/")


def open_source(spec: str, include_all_files: bool = True, root: str | Path | None = None) -> Source:
    """Items of a folder (every entry under it but folders and hidden files: a non-image, a FIFO
    or a broken link becomes an error row, so nothing is silently skipped), a glob pattern, a
    ``.parquet`` / ``.csv`` manifest or a COCO ``.json``. ``root`` confines the paths a manifest or
    COCO file names (default: that file's folder)."""
    path = Path(spec)
    if spec.startswith(REMOTE_SCHEMES):
        raise SourceError(f"the source {spec!r} is remote; roiscribe reads local files only (mount the data "
                          "or copy it to a local folder)")
    if any(ch in spec for ch in "*?[") and not path.exists():
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if not Path(p).is_dir())
        if not files:
            raise SourceError(f"the pattern {spec!r} matches no files")
        return Source(_items(files), "glob")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if not p.is_dir() and not p.name.startswith("."))
        if not include_all_files:
            files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise SourceError(f"the folder {path} holds no files")
        return Source(_items(files), "folder")
    if not path.exists():
        raise SourceError(f"the source {spec!r} does not exist (expected a folder, a glob, a .parquet/.csv "
                          "manifest or a COCO .json)")
    suffix = path.suffix.lower()
    root = Path(root) if root is not None else path.parent
    if suffix in (".parquet", ".csv"):
        return Source(_manifest(path, root), "manifest")
    if suffix == ".json":
        return _coco(path, root)
    raise SourceError(f"cannot read a source from {path.name}: expected a folder, a glob, .parquet, .csv or .json")


def _items(files: list[Path]) -> list[SourceItem]:
    uris = [file_uri(p) for p in files]
    return [SourceItem(u, u) for u in uris]


def _manifest(path: Path, root: Path) -> list[SourceItem]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM must not rename the first column
            rows = list(csv.DictReader(f))
    if not rows:
        raise SourceError(f"the manifest {path} has no rows")
    columns = set(rows[0])
    uri_col = next((c for c in URI_COLUMNS if c in columns), None)
    if uri_col is None:
        raise SourceError(f"the manifest {path} needs a column naming the images, one of {list(URI_COLUMNS)}; "
                          f"it has {sorted(columns)}")
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    uris = [_confined(str(row[uri_col]), path, root) for row in rows]
    items = [SourceItem(str(row[id_col]) if id_col else uri, uri) for row, uri in zip(rows, uris)]
    _check_unique(items, path)
    return items


def _confined(uri: str, listed_in: Path, root: Path) -> str:
    """A path named inside an input file, resolved against that file's folder and kept under root."""
    if uri.startswith(REMOTE_SCHEMES) or "://" in uri:
        raise SourceError(f"{listed_in} names a remote image {uri!r}; roiscribe reads local files only")
    path = Path(uri) if Path(uri).is_absolute() else listed_in.parent / uri
    resolved, top = os.path.realpath(path), os.path.realpath(root)  # links followed: the file itself must be under root
    if resolved != top and not resolved.startswith(top.rstrip(os.sep) + os.sep):
        raise SourceError(f"{listed_in} names {uri!r}, outside {top}; pass --root with a folder that holds "
                          "every image the file names")
    return file_uri(resolved)


def _coco(path: Path, root: Path) -> Source:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
        pairs = [(str(im["id"]), str(im["file_name"])) for im in images]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not a COCO json with an 'images' list of id and file_name: {e}") from None
    items = [SourceItem(i, _confined(name, path, root)) for i, name in pairs]
    _check_unique(items, path)
    return Source(items, "coco", coco=path)


def _check_unique(items: list[SourceItem], path: Path) -> None:
    seen: set[str] = set()
    dupes = [i.image_id for i in items if i.image_id in seen or seen.add(i.image_id)]
    if dupes:
        raise SourceError(f"{path} lists image ids more than once, e.g. {dupes[:3]}; ids must be unique")
