"""Pull: a project's tasks as images to caption, with the boxes annotators drew.

Each task becomes one ``(image_key, uri)`` pair: the key push finds the task by again
(``task_key``), the uri a path this machine can read (``local_image``: under the document root
for local files, downloaded from the server for uploads). With ``boxes="annotations"`` the tasks
are also written to ``OUT/label-studio-tasks.json`` (Label Studio's export format, images
replaced by those paths), which the given-boxes detector reads as ``given:labelstudio:PATH``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sinks.label_studio.client import LabelStudio
from sinks.label_studio.convert import local_files_path
from sinks.label_studio.errors import LabelStudioError
from sinks.label_studio.labeling import IMAGE_FIELD, KEY_FIELD

PULL_FILE = "label-studio-tasks.json"  # the pulled tasks (Label Studio export format), under OUT
IMAGES_DIR = "label-studio-images"  # images downloaded from the server, under OUT
BOXES = ("annotations", "detector")  # where the pulled images' boxes come from


@dataclass
class PulledTasks:
    project_id: int
    items: list[tuple[str, str]]  # (image key, uri) per task
    given_spec: str | None  # "given:labelstudio:PATH" with boxes="annotations", else None


def task_key(task: dict) -> str:
    """The image key push uses: roiscribe's own key, else the task id."""
    return str((task.get("data") or {}).get(KEY_FIELD) or f"task:{task['id']}")


def local_image(client: LabelStudio, task: dict, out: Path, document_root: str | None) -> str:
    """A path this machine can read for the task's image (downloaded from the server if needed)."""
    url = str((task.get("data") or {}).get(IMAGE_FIELD, ""))
    relative = local_files_path(url)
    if relative is not None and document_root:
        root = Path(document_root).resolve()
        path = (root / relative).resolve()
        if root not in path.parents:
            raise LabelStudioError(f"task {task['id']}: {url} points outside the document root {root}")
        return str(path)
    if url.startswith("/") or url.startswith(client.url + "/"):
        target = out / IMAGES_DIR / f"{task['id']}-{Path(urlsplit(url).path).name or 'image'}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(client.download(url))
            tmp.rename(target)
        return str(target)
    return url  # another host: not read (the row records why)


def pull_tasks(client: LabelStudio, project: str, out: str | Path, document_root: str | None = None,
               boxes: str = "annotations", progress: bool = True) -> PulledTasks:
    """The project's tasks as images to caption. With ``boxes="annotations"`` the boxes are those
    of each task's last annotation (a task without one gets no regions); with
    ``boxes="detector"`` no boxes come with them (the caller's detector runs on the images)."""
    if boxes not in BOXES:
        raise ValueError(f"boxes must be one of {', '.join(BOXES)}, got {boxes!r}")
    info = client.project(project)
    if info is None:
        raise LabelStudioError(f"Label Studio at {client.url} has no project {project!r}")
    pid = int(info["id"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = client.list_tasks(pid)
    if not tasks:
        raise LabelStudioError(f"project {pid} ({info.get('title')!r}) has no tasks")
    from tqdm import tqdm

    items, exported = [], []
    for task in tqdm(tasks, desc="pull", unit="task", dynamic_ncols=True, disable=not progress):
        uri = local_image(client, task, out, document_root)
        items.append((task_key(task), uri))
        exported.append({**task, "data": {**task.get("data", {}), IMAGE_FIELD: uri}})
    given = None
    if boxes == "annotations":
        path = out / PULL_FILE
        path.write_text(json.dumps(exported))
        given = f"given:labelstudio:{path}"
    return PulledTasks(pid, items, given)
