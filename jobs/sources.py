"""Where a job's images come from: a folder, a glob, a manifest (Parquet / CSV), or a COCO json.

A source is read as Arrow blocks of :data:`ROWS` (``image_id``, ``uri``, ``error``), never as one
list: a folder is walked and a glob expanded lazily, a manifest is streamed by pyarrow in this
process or read by Ray Data itself in the workers (``Source.reader``), and each block's ids and
paths are computed where the block is (:meth:`Reader.resolve`). Only a COCO file (its boxes are
read whole by the given-boxes detector anyway) and a Label Studio pull are held as items. Only the
files the user pointed at are read.

Image ids are stable whatever the spelling of the source: for a folder or a glob, the id is the
file's absolute path with its folders' symlinks resolved, so ``imgs``, ``./imgs``, ``/data/imgs`` and
``/data/imgs/sub`` name a file the same way, from any working directory, and a resume finds its
rows. A manifest's ``image_id`` (or ``id``) column is used as given; without one, the resolved
absolute path again. A COCO source uses the COCO image id. A file name that is not valid UTF-8
becomes a ``file:`` URI with percent-escapes (for its uri and id), so it fits the Parquet row and
reads back to the same file.

Paths inside input files (manifest uris, COCO ``file_name``) are confined to a root: by default
the folder of the manifest or COCO file, or the ``root`` the user gives. http(s) and s3 uris are
refused when the source is opened (roiscribe reads local files only). A manifest is checked when it
is opened on its first :data:`CHECK_ROWS` rows (a column naming the images, local paths under the
root, unique ids), so a wrong manifest is refused before anything runs; a later row that names a
remote or outside path becomes that image's error row (a manifest of millions of rows is not
read twice).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import quote_from_bytes

import pyarrow as pa

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
URI_COLUMNS = ("uri", "path", "image", "file", "file_name", "url")
ID_COLUMNS = ("image_id", "id")
REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "ftp://")
ROWS = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("error", pa.string())])
BLOCK_ROWS = 65_536  # rows per block a source is read, resolved and planned in (bounded memory)
CHECK_ROWS = 1_000  # a manifest's rows checked when it is opened


class SourceError(ValueError):
    """The source argument itself is unusable (the job exits non-zero)."""


@dataclass(frozen=True)
class SourceItem:
    image_id: str
    uri: str
    error: str | None = None  # the item cannot be read at all (e.g. a pulled task without its image): its error row


def rows_table(items: list[SourceItem]) -> pa.Table:
    return pa.table({"image_id": [i.image_id for i in items], "uri": [i.uri for i in items],
                     "error": [i.error for i in items]}, schema=ROWS)


# Readers: how a source's blocks are read and resolved ---------------------------------------------------

class Listed:
    """Blocks that are already :data:`ROWS` (items, a walked folder, an expanded glob)."""

    def ids(self, raw: pa.Table) -> pa.ChunkedArray:
        return raw.column("image_id")

    def resolve(self, raw: pa.Table) -> pa.Table:
        return raw


@dataclass
class ItemsReader(Listed):
    items: list[SourceItem]

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
        for start in range(0, len(self.items), rows):
            yield rows_table(self.items[start:start + rows])

    def count(self, limit: int | None = None) -> int:
        return len(self.items)


@dataclass
class WalkReader(Listed):
    """Every entry under a folder but folders and hidden files, in sorted path order, walked
    lazily (symlinked folders are not entered, as ``Path.rglob`` does not)."""

    folder: Path
    include_all_files: bool = True

    def paths(self) -> Iterator[str]:
        def walk(folder: str) -> Iterator[str]:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                if entry.is_dir():
                    if not entry.is_symlink():
                        yield from walk(entry.path)
                elif not entry.name.startswith(".") and (
                        self.include_all_files or os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES):
                    yield entry.path

        yield from walk(str(self.folder))

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
        return _listed_blocks(self.paths(), rows)

    def count(self, limit: int | None = None) -> int:
        return _count(self.paths(), limit)


@dataclass
class GlobReader(Listed):
    pattern: str

    def paths(self) -> Iterator[str]:
        return (p for p in glob.iglob(self.pattern, recursive=True) if not os.path.isdir(p))

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
        return _listed_blocks(self.paths(), rows)

    def count(self, limit: int | None = None) -> int:
        return _count(self.paths(), limit)


def _listed_blocks(paths: Iterator[str], rows: int) -> Iterator[pa.Table]:
    uris = _DirCache()
    block: list[str] = []
    for path in paths:
        block.append(uris.file_uri(path))
        if len(block) == rows:
            yield pa.table({"image_id": block, "uri": block, "error": [None] * len(block)}, schema=ROWS)
            block = []
    if block:
        yield pa.table({"image_id": block, "uri": block, "error": [None] * len(block)}, schema=ROWS)


def _count(paths: Iterator[str], limit: int | None) -> int:
    n = 0
    for _ in paths:
        n += 1
        if limit is not None and n > limit:
            break
    return n


@dataclass
class ManifestReader:
    """A ``.parquet`` / ``.csv`` manifest: streamed by pyarrow here, read by Ray Data in a Ray job;
    small enough to travel to every worker (a path and two column names)."""

    path: Path
    root: str  # resolved: every image must be under it
    uri_col: str
    id_col: str | None
    columns: list[str] = field(default_factory=list)  # a CSV's header (read as strings, never as numbers)

    @property
    def is_csv(self) -> bool:
        return self.path.suffix.lower() == ".csv"

    def _csv_options(self):
        import pyarrow.csv as pcsv

        wanted = [c for c in (self.uri_col, self.id_col) if c]
        return pcsv.ConvertOptions(column_types={c: pa.string() for c in self.columns}, include_columns=wanted)

    def blocks(self, rows: int = BLOCK_ROWS, row_groups: list[int] | None = None) -> Iterator[pa.Table]:
        """The raw manifest columns (uri, id) in blocks of at most ``rows`` rows (of a Parquet
        manifest: of ``row_groups`` only, when given)."""
        wanted = [c for c in (self.uri_col, self.id_col) if c]
        if self.is_csv:
            import pyarrow.csv as pcsv

            with pcsv.open_csv(self.path, convert_options=self._csv_options()) as reader:
                for batch in reader:
                    for start in range(0, batch.num_rows, rows):
                        yield pa.Table.from_batches([batch.slice(start, rows)])
        else:
            import pyarrow.parquet as pq

            with pq.ParquetFile(self.path) as f:
                for batch in f.iter_batches(batch_size=rows, columns=wanted, row_groups=row_groups):
                    yield pa.Table.from_batches([batch])

    def shards(self, parallelism: int) -> list[list[int] | None]:
        """How the manifest splits between read tasks: runs of a Parquet file's row groups (a CSV is
        read by one task, streaming)."""
        if self.is_csv:
            return [None]
        import pyarrow.parquet as pq

        groups = pq.read_metadata(self.path).num_row_groups
        n = max(1, min(groups, parallelism))
        return [list(range(groups))[k::n] for k in range(n)] if groups else [None]

    def count(self, limit: int | None = None) -> int:
        if not self.is_csv:
            import pyarrow.parquet as pq

            return pq.read_metadata(self.path).num_rows
        n = 0
        for block in self.blocks():
            n += block.num_rows
            if limit is not None and n > limit:
                break
        return n

    def ids(self, raw: pa.Table) -> pa.Array | None:
        """The ids of a raw block, when the manifest names them (None: the id is the resolved path)."""
        return _strings(raw.column(self.id_col)) if self.id_col else None

    def resolve(self, raw: pa.Table, strict: bool = False) -> pa.Table:
        """:data:`ROWS` of a raw block: each path resolved and confined to the root. A path that is
        remote or outside the root is that row's error (``strict``: a :class:`SourceError`)."""
        uris, errors = [], []
        for uri in _strings(raw.column(self.uri_col)).to_pylist():
            try:
                uris.append(_confined(uri, self.path, self.root))
                errors.append(None)
            except SourceError as e:
                if strict:
                    raise
                uris.append(uri)
                errors.append(f"source: {e}")
        ids = self.ids(raw)
        return pa.table({"image_id": ids if ids is not None else uris, "uri": uris, "error": errors}, schema=ROWS)


def _strings(column) -> pa.Array:
    """A manifest column as strings, as ``str()`` writes each value (``7`` -> ``"7"``)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(column.type):
        return column
    if pa.types.is_large_string(column.type) or pa.types.is_integer(column.type):
        return column.cast(pa.string()).fill_null("None")
    return pa.array([str(v) for v in column.to_pylist()], pa.string())


# The source ----------------------------------------------------------------------------------------------

@dataclass
class Source:
    """A job's input: ``items`` held in memory (a COCO file, a Label Studio pull), or a ``reader``
    that streams it in blocks (a folder, a glob, a manifest)."""

    items: list[SourceItem] | None
    kind: str
    coco: Path | None = None  # set for COCO sources: boxes come from this file
    given: str | None = None  # a given-boxes detector spec the source brings (e.g. a Label Studio pull)
    drawn: bool = False  # the given boxes were drawn by people: kept as drawn (no NMS, duplicates or cap)
    reader: ItemsReader | WalkReader | GlobReader | ManifestReader | None = None

    def __post_init__(self) -> None:
        if self.reader is None:
            self.reader = ItemsReader(self.items or [])

    @property
    def given_spec(self) -> str | None:
        """The detector spec of the boxes this source carries, if any (overrides --detector)."""
        return f"given:coco:{self.coco}" if self.coco else self.given

    def row_bytes(self) -> float:
        """About how many bytes a resolved row takes (from the first rows)."""
        first = next(self.blocks(CHECK_ROWS), None)
        return first.nbytes / first.num_rows if first is not None and first.num_rows else 256.0

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
        """The source as resolved blocks of :data:`ROWS` (bounded memory, whatever its size)."""
        for raw in self.reader.blocks(rows):
            yield self.reader.resolve(raw)

    def ray_dataset(self, plan, readers: int = 2):
        """The source as a Ray dataset read by tasks on the cluster (no CPU asked, so they never
        wait behind the actor pools): a Parquet manifest by one task per run of row groups, a CSV
        manifest, a folder, a glob or items by one streaming task. Each raw block goes through
        ``plan(raw) -> Iterator[pa.Table]`` in the task that read it (ids and paths resolved, rows
        already done dropped), so only the rows to do enter the pipeline. Ray Data's own file
        readers are not used: in Ray 2.60 they list files in a task that asks for a CPU, which
        never comes while the actor pools hold every CPU of the cluster (the job would hang). At
        most ``readers`` read tasks run at once (asking no CPU, they would otherwise all start
        together and take the CPUs from the actors)."""
        import ray
        from ray.data import TaskPoolStrategy

        return ray.data.read_datasource(_datasource(self.reader, plan), num_cpus=0,
                                        compute=TaskPoolStrategy(size=readers))

    def to_items(self) -> list[SourceItem]:
        """Every item as a list (small sources, tests); a job reads :meth:`blocks`."""
        return [SourceItem(r["image_id"], r["uri"], r["error"]) for b in self.blocks() for r in b.to_pylist()]

    def count(self, limit: int | None = None) -> int:
        """How many items, counting no further than just past ``limit`` when one is given (a
        manifest of Parquet counts from its footer)."""
        return self.reader.count(limit)


def _datasource(reader, plan):
    """A Ray Data datasource whose read tasks stream ``reader``'s blocks through ``plan`` (defined
    here so that Ray is imported only by a Ray job)."""
    from functools import partial

    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class SourceBlocks(Datasource):
        def estimate_inmemory_data_size(self) -> None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            shards = reader.shards(parallelism) if isinstance(reader, ManifestReader) else [None]
            return [ReadTask(partial(_read_shard, reader, shard, plan), BlockMetadata(None, None, None))
                    for shard in shards]

    return SourceBlocks()


def _read_shard(reader, shard, plan) -> Iterator[pa.Table]:
    for raw in reader.blocks() if shard is None else reader.blocks(row_groups=shard):
        yield from plan(raw)


def file_uri(path: str | Path) -> str:
    """A path as roiscribe writes it: absolute, its folder's symlinks resolved (not the file's own:
    two links to one file are two entries); a ``file:`` URI with percent-escapes when the name is
    not valid UTF-8."""
    path = os.path.abspath(path)
    return _as_uri(os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)))


def _as_uri(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # surrogate-escaped bytes from the file system
        return "file://" + quote_from_bytes(os.fsencode(text), safe="/")


class _DirCache:
    """:func:`file_uri` for many files of few folders: each folder resolved once."""

    def __init__(self):
        self._real: dict[str, str] = {}

    def file_uri(self, path: str) -> str:
        folder, name = os.path.split(os.path.abspath(path))
        real = self._real.get(folder)
        if real is None:
            if len(self._real) > 10_000:
                self._real.clear()
            real = self._real[folder] = os.path.realpath(folder)
        return _as_uri(os.path.join(real, name))


def open_source(spec: str, include_all_files: bool = True, root: str | Path | None = None) -> Source:
    """The source named by ``spec``: a folder (every entry under it but folders and hidden files:
    a non-image, a FIFO or a broken link becomes an error row, so nothing is silently skipped), a
    glob pattern, a ``.parquet`` / ``.csv`` manifest or a COCO ``.json``. ``root`` confines the paths
    a manifest or COCO file names (default: that file's folder). Nothing is listed yet beyond what
    it takes to refuse an unusable source."""
    path = Path(spec)
    if spec.startswith(REMOTE_SCHEMES):
        raise SourceError(f"the source {spec!r} is remote; roiscribe reads local files only (mount the data "
                          "or copy it to a local folder)")
    if any(ch in spec for ch in "*?[") and not path.exists():
        reader = GlobReader(spec)
        if not reader.count(limit=0):
            raise SourceError(f"the pattern {spec!r} matches no files")
        return Source(None, "glob", reader=reader)
    if path.is_dir():
        reader = WalkReader(path, include_all_files)
        if not reader.count(limit=0):
            raise SourceError(f"the folder {path} holds no files")
        return Source(None, "folder", reader=reader)
    if not path.exists():
        raise SourceError(f"the source {spec!r} does not exist (expected a folder, a glob, a .parquet/.csv "
                          "manifest or a COCO .json)")
    suffix = path.suffix.lower()
    root = Path(root) if root is not None else path.parent
    if suffix in (".parquet", ".csv"):
        return Source(None, "manifest", reader=_manifest(path, root))
    if suffix == ".json":
        return _coco(path, root)
    raise SourceError(f"cannot read a source from {path.name}: expected a folder, a glob, .parquet, .csv or .json")


def _manifest(path: Path, root: Path) -> ManifestReader:
    """The manifest's reader, after checking its columns and its first rows."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM must not rename the first column
            columns = next(csv.reader(f), [])
    uri_col = next((c for c in URI_COLUMNS if c in columns), None)
    if uri_col is None:
        raise SourceError(f"the manifest {path} needs a column naming the images, one of {list(URI_COLUMNS)}; "
                          f"it has {sorted(columns)}")
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    reader = ManifestReader(path, os.path.realpath(root), uri_col, id_col, columns if path.suffix.lower() == ".csv" else [])
    first = next(reader.blocks(CHECK_ROWS), None)
    if first is None or not first.num_rows:
        raise SourceError(f"the manifest {path} has no rows")
    rows = reader.resolve(first, strict=True)
    _check_unique(rows.column("image_id").to_pylist(), path)
    return reader


def _confined(uri: str, listed_in: Path, root: str) -> str:
    """A path named inside an input file, resolved against that file's folder and kept under root
    (``root`` already resolved)."""
    if uri.startswith(REMOTE_SCHEMES) or "://" in uri:
        raise SourceError(f"{listed_in} names a remote image {uri!r}; roiscribe reads local files only")
    path = Path(uri) if Path(uri).is_absolute() else listed_in.parent / uri
    resolved = os.path.realpath(path)  # links followed: the file itself must be under root
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        raise SourceError(f"{listed_in} names {uri!r}, outside {root}; pass --root with a folder that holds "
                          "every image the file names")
    return file_uri(resolved)


def _coco(path: Path, root: Path) -> Source:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
        pairs = [(str(im["id"]), str(im["file_name"])) for im in images]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not a COCO json with an 'images' list of id and file_name: {e}") from None
    top = os.path.realpath(root)
    items = [SourceItem(i, _confined(name, path, top)) for i, name in pairs]
    _check_unique([i.image_id for i in items], path)
    return Source(items, "coco", coco=path)


def _check_unique(ids: list[str], path: Path) -> None:
    seen: set[str] = set()
    dupes = [i for i in ids if i in seen or seen.add(i)]
    if dupes:
        raise SourceError(f"{path} lists image ids more than once, e.g. {dupes[:3]}; ids must be unique")
