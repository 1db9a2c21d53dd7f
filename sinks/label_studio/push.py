"""Push: roiscribe rows -> Label Studio tasks with predictions, in bulk, idempotently, streamed.

A task is found by its key: ``data["roiscribe_key"]`` (the row's ``image_id``), or ``task:ID`` for
a task pulled with ``caption --from-label-studio`` (the task with that id). A task gets at most one
prediction per model version, so a new version is added beside the old ones and the same version
is never sent twice. A key held by several tasks is reported (the first task gets the
predictions), and so is a key whose task shows another image than the row (``roiscribe_sha256``).

Memory: an output folder is read one Parquet batch at a time, twice (a light pass for the counts
and the labeling config, then the push); across batches only the project's keys and small state
are kept, so the driver's memory does not grow with the number of rows.

Nothing is retried blindly: reads are retried with backoff by the client; after a write fails on
the connection, the push waits for the server, then until its task count has settled (the failed
import may still be committing), lists what it holds and sends only what is still missing.

``write_task_files`` writes the same tasks to JSON files instead, for a Label Studio storage sync.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from sinks.label_studio.client import LabelStudio, api_token
from sinks.label_studio.convert import (
    ImageRefs, local_files_path, model_version_from_manifest, model_version_of, row_path, row_to_result,
)
from sinks.label_studio.errors import LabelStudioError, TaskError, UnreachableError
from sinks.label_studio.labeling import (
    CAPTION, IMAGE_FIELD, KEY_FIELD, REGION, SHA_FIELD, ConfigSpec, is_current_layout, labeling_config,
    spec_from_config, spec_from_rows,
)

EXISTING_INCLUDE = "id,data,predictions_model_versions"  # the task fields the idempotence check reads
SCAN_COLUMNS = ["image_id", "status", "regions", "relations", "model", "detector", "templates_version"]
TASK_ID_KEY = re.compile(r"^task:(\d+)$")  # a pulled task's key: the task with that id
TASK_FILE = "tasks-{:06d}.json"  # write_task_files: one JSON array of tasks per chunk
CONFIG_FILE = "labeling-config.xml"  # write_task_files: the labeling config the tasks need
MAX_RELATIONS = 5  # relations per image pushed by default, the most confident first (arrows clutter busy scenes)


@dataclass
class PushConfig:
    url: str
    project: str  # a title (created if missing) or a numeric id
    images: ImageRefs = field(default_factory=lambda: ImageRefs("url"))
    model_version: str | None = None  # default: from the output's manifest (fingerprints), else its rows
    chunk_size: int = 500  # tasks (or predictions) per import request; also rows read per batch
    upload_batch: int = 50  # images per upload request
    resyncs: int = 3  # fresh listings after a failed write before giving up
    settle_s: float = 3.0  # before a resync lists: two task counts this far apart must agree
    settle_timeout_s: float = 300.0  # ... within this long, or the push stops (run it again later)
    max_relations: int | None = MAX_RELATIONS  # per image, the most confident first (None: all)
    calibration: object | None = None  # a pipeline.calibrate.Calibration: scores become calibrated probabilities

    def __post_init__(self):
        if self.max_relations is not None and self.max_relations < 0:
            raise ValueError(f"max_relations must be >= 0 (or None for all), got {self.max_relations}")


@dataclass
class PushReport:
    project_id: int | None  # None for task files
    model_version: str
    tasks_created: int = 0
    predictions_created: int = 0
    already_present: int = 0  # rows whose task already holds this model version
    error_rows: int = 0  # rows with status error (no image to annotate): not pushed
    rejected: list[TaskError] = field(default_factory=list)
    image_changed: list[tuple[str, int]] = field(default_factory=list)  # (key, task id): warnings
    duplicate_keys: dict[str, list[int]] = field(default_factory=dict)  # key -> its task ids: warnings
    duplicate_rows: int = 0  # rows whose image_id an earlier row of the output already had: skipped
    files: list[str] = field(default_factory=list)  # write_task_files: the files written

    def summary(self) -> str:
        where = f"project {self.project_id}" if self.project_id is not None else f"{len(self.files)} task files"
        text = (f"{where}, model version {self.model_version!r}: {self.tasks_created} tasks created, "
                f"{self.predictions_created} predictions added to existing tasks, {self.already_present} already "
                f"present, {self.error_rows} error rows not pushed, {len(self.rejected)} rejected")
        if self.duplicate_rows:
            text += f", {self.duplicate_rows} rows skipped (their image_id came earlier in the output)"
        if self.image_changed or self.duplicate_keys:
            text += (f"; warnings: {len(self.image_changed)} keys whose task shows another image, "
                     f"{len(self.duplicate_keys)} keys held by several tasks")
        return text

    def warnings(self) -> list[str]:
        """One line per warning (a push with warnings still succeeds)."""
        lines = [f"{key}: task {tid} holds another image (its {SHA_FIELD} differs from the row's image); "
                 "the prediction was added to it: check the task" for key, tid in self.image_changed]
        lines += [f"{key}: held by tasks {ids}; predictions go to task {ids[0]} only"
                  for key, ids in self.duplicate_keys.items()]
        return lines



# Rows: an output folder streamed by batch, or rows in memory ------------------------------------

class OutputRows:
    """The rows of a caption output folder, one Parquet batch at a time, and its manifest."""

    def __init__(self, out: str | Path, batch_rows: int = 500):
        self.out, self.batch_rows = Path(out), batch_rows

    def batches(self, columns: list[str] | None = None) -> Iterator[list[dict]]:
        import pyarrow.parquet as pq

        from sinks.parquet import part_files

        for part in part_files(self.out):
            with pq.ParquetFile(part) as f:
                names = [c for c in columns if c in f.schema_arrow.names] if columns else None
                for batch in f.iter_batches(batch_size=self.batch_rows, columns=names):
                    yield batch.to_pylist()

    def manifest(self) -> dict | None:
        try:
            return json.loads((self.out / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def describe(self) -> str:
        return str(self.out)


class MemoryRows:
    """Rows already in memory (tests, the ML backend, callers that built rows themselves)."""

    def __init__(self, rows: Sequence[dict], batch_rows: int = 500):
        self.rows, self.batch_rows = rows, batch_rows

    def batches(self, columns: list[str] | None = None) -> Iterator[list[dict]]:
        for start in range(0, len(self.rows), self.batch_rows):
            yield list(self.rows[start:start + self.batch_rows])

    def manifest(self) -> dict | None:
        return None

    def describe(self) -> str:
        return "the rows given"


def row_source(rows, batch_rows: int = 500) -> OutputRows | MemoryRows:
    """An output folder (a path) or a sequence of row dicts, as batches."""
    if isinstance(rows, (OutputRows, MemoryRows)):
        return rows
    if isinstance(rows, (str, os.PathLike)):
        return OutputRows(rows, batch_rows)
    return MemoryRows(rows, batch_rows)


@dataclass
class Scan:
    """What one light pass over the rows finds: counts, the labeling config they need, a sample."""

    ok: int = 0
    errors: int = 0
    spec: ConfigSpec = field(default_factory=ConfigSpec)
    first: dict | None = None  # the first ok row's provenance (for the fallback model version)


def scan_rows(source) -> Scan:
    scan = Scan(spec=spec_from_rows([]))
    for batch in source.batches(SCAN_COLUMNS):
        ok = [r for r in batch if r.get("status") == "ok"]
        scan.ok += len(ok)
        scan.errors += len(batch) - len(ok)
        if ok:
            scan.first = scan.first or {k: ok[0].get(k) for k in ("model", "detector", "templates_version")}
            needed = spec_from_rows(ok)
            if not scan.spec.covers(needed):
                scan.spec = scan.spec.union(needed)
    if scan.ok + scan.errors == 0:
        raise LabelStudioError(f"{source.describe()} holds no rows to push (run `roiscribe caption` first)")
    from pipeline.review import label_attributes  # imported here: the pipeline package imports numpy

    # compared with the box label: what names every class of the whole output, not of one batch
    scan.spec.label_attributes = label_attributes(scan.spec.classes, scan.spec.attributes)
    return scan


def default_version(source, scan: Scan, given: str | None) -> str:
    version = given or model_version_from_manifest(source.manifest()) or model_version_of([scan.first or {}])
    if "," in version:
        raise LabelStudioError(f"model version {version!r} must not contain a comma (Label Studio splits "
                               "model versions on commas)")
    return version


def image_sha256(uri: str) -> str | None:
    """sha256 of the image a row names, when it is a readable regular local file (else None)."""
    if not uri or ("://" in uri and not uri.startswith("file:")):
        return None
    try:
        path = row_path(uri)
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, ValueError):
        return None


# What the project holds ---------------------------------------------------------------------------

@dataclass(slots=True)
class ExistingTask:
    id: int
    model_versions: frozenset[str]
    sha256: str | None = None


@dataclass
class Existing:
    """The project's tasks by key (``roiscribe_key``; the first task of a key held twice) and by id."""

    by_key: dict[str, ExistingTask] = field(default_factory=dict)
    by_id: dict[int, ExistingTask] = field(default_factory=dict)
    duplicates: dict[str, list[int]] = field(default_factory=dict)

    def find(self, key: str) -> ExistingTask | None:
        m = TASK_ID_KEY.match(key)
        if m and int(m.group(1)) in self.by_id:
            return self.by_id[int(m.group(1))]
        return self.by_key.get(key)


def existing_tasks(client: LabelStudio, pid: int, page_size: int = 1000) -> Existing:
    """Every task of the project by key and id, with the model versions of its predictions."""
    out = Existing()
    versions: dict[str, frozenset[str]] = {}  # tasks share few distinct version lists: one set each
    for page in client.task_pages(pid, include=EXISTING_INCLUDE, page_size=page_size):
        for t in page:
            text = t.get("predictions_model_versions") or ""
            if text not in versions:
                versions[text] = frozenset(v.strip() for v in text.split(",") if v.strip())
            data = t.get("data") or {}
            task = ExistingTask(int(t["id"]), versions[text], data.get(SHA_FIELD) or None)
            out.by_id[task.id] = task
            key = data.get(KEY_FIELD)
            if not key:
                continue
            key = str(key)
            if key in out.by_key:
                first = out.by_key[key]
                out.duplicates.setdefault(key, [first.id]).append(task.id)
                if task.id < first.id:
                    out.by_key[key] = task
            else:
                out.by_key[key] = task
    for ids in out.duplicates.values():
        ids.sort()
    return out


def settle(client: LabelStudio, pid: int, cfg: PushConfig) -> int:
    """Waits until the project's task count has stopped changing (two counts ``settle_s`` apart
    agree): an import whose answer was lost may still be committing, and a listing taken before it
    lands would send its tasks twice."""
    deadline = time.monotonic() + cfg.settle_timeout_s
    last = client.task_count(pid)
    while True:
        client.sleep(cfg.settle_s)
        now = client.task_count(pid)
        if now == last:
            return now
        if time.monotonic() > deadline:
            raise UnreachableError(f"the task count of project {pid} at {client.url} was still changing after "
                                   f"{cfg.settle_timeout_s:.0f} s ({last} -> {now}); is another push running? "
                                   "Run the same push again once it is idle") from None
        last = now


# The push -------------------------------------------------------------------------------------------

def push(rows, cfg: PushConfig, token: str | None = None, progress: bool = True,
         client: LabelStudio | None = None) -> PushReport:
    """Push rows (``sinks.parquet`` schema: an output folder, streamed, or a sequence of row dicts)
    as tasks with predictions; safe to run again."""
    source = row_source(rows, cfg.chunk_size)
    client = client or LabelStudio(cfg.url, token if token is not None else api_token())
    client.check_token()
    scan = scan_rows(source)
    version = default_version(source, scan, cfg.model_version)
    project = _ensure_project(client, cfg.project, scan.spec)
    pid = int(project["id"])
    report = PushReport(pid, version, error_rows=scan.errors)
    sender = _Sender(client, pid, cfg, spec_from_config(project["label_config"]), report)
    bar = _bar(progress, scan.ok, "push")
    try:
        for attempt in range(cfg.resyncs + 1):
            existing = existing_tasks(client, pid)
            report.duplicate_keys = existing.duplicates
            try:
                sender.send_all(source, existing, bar, first=attempt == 0)
                break
            except UnreachableError:
                if attempt == cfg.resyncs:
                    raise UnreachableError(
                        f"Label Studio at {client.url} stopped answering during the push ({report.tasks_created} tasks "
                        f"and {report.predictions_created} predictions sent); nothing was retried blindly: run the "
                        "same push again to resume") from None
                client.wait_healthy()  # retried with backoff
                settle(client, pid, cfg)  # then the state is listed afresh
        # the project shows this version only when a prediction of it exists (Label Studio answers 400
        # "Model version doesn't exist" later otherwise, e.g. after a push whose every row was rejected)
        holds_version = report.tasks_created or report.predictions_created or report.already_present
        if holds_version and project.get("model_version") != version:
            client.update_project(pid, model_version=version)
    finally:
        if bar is not None:
            bar.close()
    return report


class _Sender:
    """One pass over the rows: each row's task is found, created or given the new prediction, in
    chunks; only the current chunk is held."""

    def __init__(self, client: LabelStudio, pid: int, cfg: PushConfig, spec: ConfigSpec, report: PushReport):
        self.client, self.pid, self.cfg, self.spec, self.report = client, pid, cfg, spec, report
        self.rejected: set[str] = set()
        self.changed: set[str] = set()

    def send_all(self, source, existing: Existing, bar, first: bool) -> None:
        version = self.report.model_version
        if bar is not None:
            bar.reset()
        new: list[tuple[dict, dict]] = []  # (row's image_id and uri, task) of the current chunk
        add: list[tuple[str, dict]] = []  # (key, prediction) for existing tasks, current chunk
        seen: set[str] = set()  # the keys of this pass: a key the output holds twice is sent once
        for batch in source.batches():
            for row in batch:
                if row.get("status") != "ok":
                    continue
                key = row["image_id"]
                if key in seen:
                    if first:
                        self.report.duplicate_rows += 1
                    _advance(bar, 1)
                    continue
                seen.add(key)
                task = existing.find(key)
                if task is not None and version in task.model_versions:
                    if first:
                        self.report.already_present += 1
                    _advance(bar, 1)
                    continue
                # the image's hash: stored on a new task, compared with an existing task's
                sha = image_sha256(str(row.get("uri") or "")) if task is None or task.sha256 else None
                if task is not None and sha and task.sha256 != sha and key not in self.changed:
                    self.changed.add(key)
                    self.report.image_changed.append((key, task.id))
                try:
                    pred = _prediction(row_to_result(row, self.spec, self.cfg.max_relations, self.cfg.calibration),
                                       version)
                except TaskError as e:
                    self._reject(e)
                    _advance(bar, 1)
                    continue
                if task is not None:
                    add.append((key, pred | {"task": task.id}))
                else:
                    data = {KEY_FIELD: key} | ({SHA_FIELD: sha} if sha else {})
                    new.append(({"image_id": key, "uri": row["uri"]}, {"data": data, "predictions": [pred]}))
                if len(add) >= self.cfg.chunk_size:
                    self._send_predictions(add, bar)
                    add = []
                if len(new) >= self.cfg.chunk_size:
                    self._send_tasks(new, bar)
                    new = []
        self._send_predictions(add, bar)
        self._send_tasks(new, bar)

    def _reject(self, error: TaskError) -> None:
        if error.key not in self.rejected:
            self.rejected.add(error.key)
            self.report.rejected.append(error)

    def _send_predictions(self, preds: list[tuple[str, dict]], bar) -> None:
        self.report.predictions_created += _send_checked(self.client.import_predictions, self.pid, dict(preds),
                                                         self._reject)
        _advance(bar, len(preds))

    def _send_tasks(self, chunk: list[tuple[dict, dict]], bar) -> None:
        if not chunk:
            return
        urls = _image_urls([row for row, _ in chunk], self.cfg.images, self._reject, self.client, self.pid,
                           self.cfg.upload_batch)
        tasks = {row["image_id"]: {**task, "data": {IMAGE_FIELD: urls[row["image_id"]], **task["data"]}}
                 for row, task in chunk if row["image_id"] in urls}
        send = lambda p, items: len(self.client.import_tasks(p, items))  # noqa: E731
        self.report.tasks_created += _send_checked(send, self.pid, tasks, self._reject)
        _advance(bar, len(chunk))


def _ensure_project(client: LabelStudio, name_or_id: str, needed: ConfigSpec) -> dict:
    project = client.project(name_or_id)
    if project is None:
        if str(name_or_id).isdigit():
            raise LabelStudioError(f"Label Studio at {client.url} has no project {name_or_id}")
        return client.create_project(str(name_or_id), labeling_config(needed))
    current = spec_from_config(project.get("label_config") or "")
    if current is None:
        raise LabelStudioError(
            f"project {project['id']} ({project.get('title')!r}) has a labeling config roiscribe did not write "
            f"(it needs RectangleLabels name={REGION!r} and TextArea name={CAPTION!r}); push into a new project")
    if not current.covers(needed) or not is_current_layout(project["label_config"]):
        # new labels or values, or a config of an older roiscribe: extend (never remove) in the current layout
        project = client.update_project(int(project["id"]), label_config=labeling_config(current.union(needed)))
    return project


def _send_checked(send, pid: int, items: dict[str, dict], reject) -> int:
    """One import; if the server rejects it (400: nothing was written), the tasks it names are
    reported (``reject``) and the rest is sent once more."""
    if not items:
        return 0
    keys = list(items)
    try:
        return send(pid, [items[k] for k in keys])
    except LabelStudioError as e:
        if e.status != 400:
            raise
        named = sorted({int(i) for i in re.findall(r"Task (\d+)", str(e.body)) if int(i) < len(keys)})
        bad = named or range(len(keys))
        for i in bad:
            reject(TaskError(keys[i], f"rejected by the server: {_reason(e.body, i)}"))
        rest = [items[k] for i, k in enumerate(keys) if i not in set(bad)]
        return send(pid, rest) if rest else 0


def _reason(body, index: int) -> str:
    text = str(body)
    lines = [ln.strip(" -") for ln in text.replace("\\n", "\n").splitlines() if f"Task {index}," in ln or f"Task {index}:" in ln]
    return "; ".join(lines)[:500] or text[:500]


def _prediction(result: tuple[list[dict], float | None], version: str) -> dict:
    items, score = result
    pred = {"model_version": version, "result": items}
    if score is not None:
        pred["score"] = score
    return pred


def _image_urls(rows: list[dict], images: ImageRefs, reject, client: LabelStudio | None = None,
                pid: int | None = None, upload_batch: int = 50) -> dict[str, str]:
    """The image reference of each row's task (uploading the files in upload mode); a row whose
    image cannot be referenced is rejected."""
    urls: dict[str, str] = {}
    if images.mode != "upload":
        for row in rows:
            try:
                urls[row["image_id"]] = images.url(row)
            except TaskError as e:
                reject(e)
        if images.mode == "local-files" and urls and client is not None:
            client.ensure_local_storage(pid, images.storage_dirs(local_files_path(u) for u in urls.values()))
        return urls
    files = []
    for row in rows:
        path = row_path(str(row["uri"]))
        if path.is_file():
            files.append((row["image_id"], path))
        else:
            reject(TaskError(row["image_id"], f"image {row['uri']} is not a readable file to upload"))
    for start in range(0, len(files), upload_batch):
        batch = files[start:start + upload_batch]
        for (key, _), url in zip(batch, client.upload(pid, [p for _, p in batch])):
            urls[key] = url
    return urls


# Task files: the same tasks, for a storage sync ---------------------------------------------------

def write_task_files(rows, folder: str | Path, images: ImageRefs, model_version: str | None = None,
                     chunk_size: int = 500, max_relations: int | None = MAX_RELATIONS,
                     calibration=None) -> PushReport:
    """Write the tasks a push would create (data, key, image sha256 and one prediction each) as
    JSON files of ``chunk_size`` tasks (``tasks-000001.json``, ...) plus ``labeling-config.xml``,
    for a Label Studio cloud or local storage sync (import method "Tasks", ``.json`` files). Needs
    no server; images must be ``local-files`` or ``url`` references (an upload needs a server)."""
    if images.mode == "upload":
        raise LabelStudioError("task files cannot upload images: use --images local-files (with --document-root) "
                               "or url")
    folder = Path(folder)
    if folder.is_dir() and any(folder.glob("tasks-*.json")):
        raise LabelStudioError(f"{folder} already holds task files; write into an empty folder (a storage sync "
                               "imports each file once, by name)")
    source = row_source(rows, chunk_size)
    scan = scan_rows(source)
    report = PushReport(None, default_version(source, scan, model_version), error_rows=scan.errors)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / CONFIG_FILE, labeling_config(scan.spec))
    rejected: set[str] = set()

    def reject(error: TaskError) -> None:
        if error.key not in rejected:
            rejected.add(error.key)
            report.rejected.append(error)

    chunk: list[dict] = []
    for batch in source.batches():
        for row in batch:
            if row.get("status") != "ok":
                continue
            try:
                pred = _prediction(row_to_result(row, scan.spec, max_relations, calibration), report.model_version)
            except TaskError as e:
                reject(e)
                continue
            urls = _image_urls([row], images, reject)
            if row["image_id"] not in urls:
                continue
            sha = image_sha256(str(row.get("uri") or ""))
            data = {IMAGE_FIELD: urls[row["image_id"]], KEY_FIELD: row["image_id"]} | ({SHA_FIELD: sha} if sha else {})
            chunk.append({"data": data, "predictions": [pred]})
            if len(chunk) >= chunk_size:
                _flush_task_file(folder, chunk, report)
                chunk = []
    _flush_task_file(folder, chunk, report)
    return report


def _flush_task_file(folder: Path, tasks: list[dict], report: PushReport) -> None:
    if not tasks:
        return
    path = folder / TASK_FILE.format(len(report.files) + 1)
    _write_atomic(path, json.dumps(tasks, ensure_ascii=False))
    report.files.append(str(path))
    report.tasks_created += len(tasks)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a storage sync never sees half a file


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True)
