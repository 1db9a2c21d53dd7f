"""Pull: a project's tasks as images to caption, with the boxes annotators drew.

Each task becomes one :class:`PulledItem`: its key is ``task:ID`` (task ids are unique on a
server, so the key names exactly that task: its boxes in the tasks file, and the task push adds
the prediction to), its uri a path this machine can read (``local_image``: under the document root
for local files, downloaded from the server for uploads). A task whose image cannot be read (a
missing upload, a path outside the document root, another host) becomes an item with an
``error``: the job writes it as that task's error row, and the pull goes on.

With ``boxes="annotations"`` the tasks are also written to ``OUT/label-studio-tasks.json`` (Label
Studio's export format, images replaced by those paths), which the given-boxes detector reads as
``given:labelstudio:PATH`` and looks up by the same ``task:ID`` key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sinks.label_studio.client import LabelStudio
from sinks.label_studio.convert import local_files_path
from sinks.label_studio.errors import AuthError, LabelStudioError, UnreachableError
from sinks.label_studio.labeling import IMAGE_FIELD

PULL_FILE = "label-studio-tasks.json"  # the pulled tasks (Label Studio export format), under OUT
IMAGES_DIR = "label-studio-images"  # images downloaded from the server, under OUT
BOXES = ("annotations", "detector")  # where the pulled images' boxes come from


@dataclass(frozen=True)
class PulledItem:
    key: str  # "task:ID"
    uri: str  # a local path to the image; the task's own image reference when it cannot be read
    error: str | None = None  # why the image cannot be read (the item's error row), else None


@dataclass
class PulledTasks:
    project_id: int
    items: list[PulledItem]  # one per task
    given_spec: str | None  # "given:labelstudio:PATH" with boxes="annotations", else None


def task_key(task: dict) -> str:
    """The key of a pulled task: its id (never its ``roiscribe_key``, which two tasks may share
    and which may look like another task's id)."""
    return f"task:{task['id']}"


def local_image(client: LabelStudio, task: dict, out: Path, document_root: str | None) -> str:
    """A path this machine can read for the task's image (downloaded from the server if needed);
    raises ``LabelStudioError`` saying why when there is none."""
    url = str((task.get("data") or {}).get(IMAGE_FIELD) or "")
    if not url:
        raise LabelStudioError(f"task {task['id']} has no data.{IMAGE_FIELD}")
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
            data = client.download(url)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return str(target)
    raise LabelStudioError(f"task {task['id']}: image {url} is not on {client.url} nor under --document-root; "
                           "roiscribe reads only the server it was given")


def pull_tasks(client: LabelStudio, project: str, out: str | Path, document_root: str | None = None,
               boxes: str = "annotations", progress: bool = True) -> PulledTasks:
    """The project's tasks as images to caption. With ``boxes="annotations"`` the boxes are those
    of each task's last annotation (a task without one gets no regions); with
    ``boxes="detector"`` no boxes come with them (the caller's detector runs on the images).
    A task whose image cannot be read is an item with an error; an unreachable server or a
    refused token stops the pull."""
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
        original = str((task.get("data") or {}).get(IMAGE_FIELD) or "")
        try:
            item = PulledItem(task_key(task), local_image(client, task, out, document_root))
        except (AuthError, UnreachableError):
            raise  # the server, not this task: nothing else would be read either
        except LabelStudioError as e:  # this task's image: missing, outside the root, another host
            item = PulledItem(task_key(task), original, f"label-studio: {e}")
        items.append(item)
        exported.append({**task, "data": {**(task.get("data") or {}), IMAGE_FIELD: item.uri}})
    given = None
    if boxes == "annotations":
        path = out / PULL_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(exported))
        os.replace(tmp, path)
        given = f"given:labelstudio:{path}"
    return PulledTasks(pid, items, given)
