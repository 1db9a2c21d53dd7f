"""Jobs around Label Studio: pull a project as a caption source (the boxes annotators drew, or
the tasks' images for the detector), and push a caption output back as predictions."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from jobs.sources import Source, SourceError, SourceItem
from sinks.label_studio import IMAGE_FIELD, KEY_FIELD, LabelStudio, LabelStudioError

PULL_FILE = "label-studio-tasks.json"  # the pulled tasks (Label Studio export format), under OUT
IMAGES_DIR = "label-studio-images"  # images downloaded from the server, under OUT


def task_key(task: dict) -> str:
    """The image key push uses: roiscribe's own key, else the task id."""
    return str((task.get("data") or {}).get(KEY_FIELD) or f"task:{task['id']}")


def list_tasks(client: LabelStudio, pid: int, page_size: int = 500) -> list[dict]:
    tasks, page = [], 1
    while True:
        data = client.get("/api/tasks", f"listing tasks of project {pid}", project=pid, page=page,
                          page_size=page_size, fields="all")
        tasks += data.get("tasks", [])
        if page * page_size >= int(data.get("total", 0)):
            return tasks
        page += 1


def local_image(client: LabelStudio, task: dict, out: Path, document_root: str | None) -> str:
    """A path this machine can read for the task's image (downloaded from the server if needed)."""
    url = str((task.get("data") or {}).get(IMAGE_FIELD, ""))
    parts = urlsplit(url)
    if parts.path.startswith("/data/local-files/") and document_root:
        root = Path(document_root).resolve()
        path = (root / unquote(parse_qs(parts.query).get("d", [""])[0])).resolve()
        if root not in path.parents:
            raise LabelStudioError(f"task {task['id']}: {url} points outside the document root {root}")
        return str(path)
    if url.startswith("/") or url.startswith(client.url + "/"):
        target = out / IMAGES_DIR / f"{task['id']}-{Path(parts.path).name or 'image'}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(client.download(url))
            tmp.rename(target)
        return str(target)
    return url  # another host: not read (the row records why)


def pull_source(client: LabelStudio, project: str, out: str | Path, document_root: str | None = None,
                boxes: str = "annotations", progress: bool = True) -> tuple[Source, int]:
    """The project's tasks as a caption source; returns it and the project id. With
    ``boxes="annotations"`` the boxes are those of each task's last annotation (a task without
    one gets no regions); with ``boxes="detector"`` the job's detector runs on the images."""
    if boxes not in ("annotations", "detector"):
        raise SourceError(f"--ls-boxes must be annotations or detector, got {boxes!r}")
    info = client.project(project)
    if info is None:
        raise SourceError(f"Label Studio at {client.url} has no project {project!r}")
    pid = int(info["id"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list_tasks(client, pid)
    if not tasks:
        raise SourceError(f"project {pid} ({info.get('title')!r}) has no tasks")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="pull", unit="task", dynamic_ncols=True)
    items, exported = [], []
    for task in tasks:
        uri = local_image(client, task, out, document_root)
        items.append(SourceItem(task_key(task), uri))
        exported.append({**task, "data": {**task.get("data", {}), IMAGE_FIELD: uri}})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    given = None
    if boxes == "annotations":
        path = out / PULL_FILE
        path.write_text(json.dumps(exported))
        given = f"given:labelstudio:{path}"
    return Source(items, "label-studio", given=given), pid
