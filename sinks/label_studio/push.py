"""Push: roiscribe rows -> Label Studio tasks with predictions, in bulk, idempotently.

A task is found by its key: ``data["roiscribe_key"]`` (the row's ``image_id``), or ``task:ID`` for
a task roiscribe did not create (pulled with ``caption --from-label-studio``). A task gets at most
one prediction per model version, so a new version is added beside the old ones and the same
version is never sent twice.

Nothing is retried blindly: reads are retried with backoff by the client; a write that fails on
the connection is followed by a fresh listing of what the server holds, and only what is still
missing is sent again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sinks.label_studio.client import LabelStudio, api_token
from sinks.label_studio.convert import ImageRefs, local_files_path, model_version_of, row_to_result
from sinks.label_studio.errors import LabelStudioError, TaskError, UnreachableError
from sinks.label_studio.labeling import (
    CAPTION, IMAGE_FIELD, KEY_FIELD, REGION, ConfigSpec, labeling_config, spec_from_config, spec_from_rows,
)

EXISTING_INCLUDE = "id,data,predictions_model_versions"  # the task fields the idempotence check reads


@dataclass
class PushConfig:
    url: str
    project: str  # a title (created if missing) or a numeric id
    images: ImageRefs = field(default_factory=lambda: ImageRefs("url"))
    model_version: str | None = None  # default: from the rows' provenance
    chunk_size: int = 500  # tasks (or predictions) per import request
    upload_batch: int = 50  # images per upload request
    resyncs: int = 3  # fresh listings after a failed write before giving up


@dataclass
class PushReport:
    project_id: int
    model_version: str
    tasks_created: int = 0
    predictions_created: int = 0
    already_present: int = 0  # rows whose task already holds this model version
    error_rows: int = 0  # rows with status error (no image to annotate): not pushed
    rejected: list[TaskError] = field(default_factory=list)

    def summary(self) -> str:
        return (f"project {self.project_id}, model version {self.model_version!r}: {self.tasks_created} tasks created, "
                f"{self.predictions_created} predictions added to existing tasks, {self.already_present} already "
                f"present, {self.error_rows} error rows not pushed, {len(self.rejected)} rejected")


@dataclass
class ExistingTask:
    id: int
    model_versions: set[str]


def existing_tasks(client: LabelStudio, pid: int, page_size: int = 1000) -> dict[str, ExistingTask]:
    """Every task of the project by key (``roiscribe_key`` and ``task:ID``), with the model
    versions of its predictions."""
    out: dict[str, ExistingTask] = {}
    for page in client.task_pages(pid, include=EXISTING_INCLUDE, page_size=page_size):
        for t in page:
            versions = {v.strip() for v in (t.get("predictions_model_versions") or "").split(",") if v.strip()}
            task = ExistingTask(int(t["id"]), versions)
            out[f"task:{t['id']}"] = task
            key = (t.get("data") or {}).get(KEY_FIELD)
            if key:
                out[str(key)] = task
    return out


def push(rows: Sequence[dict], cfg: PushConfig, token: str | None = None, progress: bool = True,
         client: LabelStudio | None = None) -> PushReport:
    """Push rows (``sinks.parquet`` schema) as tasks with predictions; safe to run again."""
    client = client or LabelStudio(cfg.url, token if token is not None else api_token())
    client.check_token()
    version = cfg.model_version or model_version_of(rows)
    if "," in version:
        raise LabelStudioError(f"model version {version!r} must not contain a comma")
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    project = _ensure_project(client, cfg.project, spec_from_rows(ok_rows))
    pid = int(project["id"])
    spec = spec_from_config(project["label_config"])
    report = PushReport(pid, version, error_rows=len(rows) - len(ok_rows))
    results: dict[str, tuple[list[dict], float | None]] = {}
    for row in ok_rows:
        try:
            results[row["image_id"]] = row_to_result(row, spec)
        except TaskError as e:
            report.rejected.append(e)
    by_key = {r["image_id"]: r for r in ok_rows if r["image_id"] in results}
    bar = _bar(progress, len(by_key), "push")
    try:
        for attempt in range(cfg.resyncs + 1):
            existing = existing_tasks(client, pid)
            try:
                _send(client, pid, cfg, version, by_key, results, existing, report, bar, first=attempt == 0)
                break
            except UnreachableError:
                if attempt == cfg.resyncs:
                    raise UnreachableError(
                        f"Label Studio at {client.url} stopped answering during the push ({report.tasks_created} tasks "
                        f"and {report.predictions_created} predictions sent); nothing was retried blindly: run the "
                        "same push again to resume") from None
                client.wait_healthy()  # retried with backoff; then the state is listed afresh
        if project.get("model_version") != version:
            client.update_project(pid, model_version=version)
    finally:
        if bar is not None:
            bar.close()
    return report


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
    if not current.covers(needed):  # new labels or values: extend, never remove
        project = client.update_project(int(project["id"]), label_config=labeling_config(current.union(needed)))
    return project


def _send(client: LabelStudio, pid: int, cfg: PushConfig, version: str, by_key: dict[str, dict],
          results: dict, existing: dict[str, ExistingTask], report: PushReport, bar, first: bool) -> None:
    new_keys = [k for k in by_key if k not in existing]
    add_keys = [k for k in by_key if k in existing and version not in existing[k].model_versions]
    done = len(by_key) - len(new_keys) - len(add_keys)
    if first:
        report.already_present = done
    if bar is not None:
        bar.n = done
        bar.refresh()
    for start in range(0, len(add_keys), cfg.chunk_size):
        chunk = add_keys[start:start + cfg.chunk_size]
        preds = {k: _prediction(results[k], version) | {"task": existing[k].id} for k in chunk}
        report.predictions_created += _send_checked(client.import_predictions, pid, preds, report)
        _advance(bar, len(chunk))
    for start in range(0, len(new_keys), cfg.chunk_size):
        chunk = new_keys[start:start + cfg.chunk_size]
        urls = _image_urls(client, pid, cfg, [by_key[k] for k in chunk], report)
        tasks = {k: {"data": {IMAGE_FIELD: urls[k], KEY_FIELD: k}, "predictions": [_prediction(results[k], version)]}
                 for k in chunk if k in urls}
        report.tasks_created += _send_checked(lambda p, items: len(client.import_tasks(p, items)), pid, tasks, report)
        _advance(bar, len(chunk))


def _send_checked(send, pid: int, items: dict[str, dict], report: PushReport) -> int:
    """One import; if the server rejects it (400: nothing was written), the tasks it names are
    reported and the rest is sent once more."""
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
            report.rejected.append(TaskError(keys[i], f"rejected by the server: {_reason(e.body, i)}"))
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


def _image_urls(client: LabelStudio, pid: int, cfg: PushConfig, rows: list[dict], report: PushReport) -> dict[str, str]:
    urls: dict[str, str] = {}
    if cfg.images.mode != "upload":
        for row in rows:
            try:
                urls[row["image_id"]] = cfg.images.url(row)
            except TaskError as e:
                report.rejected.append(e)
        if cfg.images.mode == "local-files" and urls:
            client.ensure_local_storage(pid, cfg.images.storage_dirs(local_files_path(u) for u in urls.values()))
        return urls
    files = []
    for row in rows:
        path = Path(row["uri"])
        if path.is_file():
            files.append((row["image_id"], path))
        else:
            report.rejected.append(TaskError(row["image_id"], f"image {row['uri']} is not a readable file to upload"))
    for start in range(0, len(files), cfg.upload_batch):
        batch = files[start:start + cfg.upload_batch]
        for (key, _), url in zip(batch, client.upload(pid, [p for _, p in batch])):
            urls[key] = url
    return urls


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True)
