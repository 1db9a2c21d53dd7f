"""Jobs around Label Studio: a project pulled as a caption source (``sinks.label_studio.pull``
does the work; this wraps its result in the job's ``Source``, and a failed pull in
``SourceError``: the source could not be opened). Each task is one item keyed ``task:ID``; a task
whose image cannot be read is an item with an ``error`` (its error row), not a failed pull."""

from __future__ import annotations

from pathlib import Path

from jobs.sources import Source, SourceError, SourceItem
from sinks.label_studio import LabelStudio, LabelStudioError, pull_tasks
from sinks.label_studio.pull import BOXES, PulledItem


def pull_source(client: LabelStudio, project: str, out: str | Path, document_root: str | None = None,
                boxes: str = "annotations", progress: bool = True) -> tuple[Source, int]:
    """The project's tasks as a caption source; returns it and the project id. With
    ``boxes="annotations"`` the boxes are those of each task's last annotation (a task without
    one gets no regions); with ``boxes="detector"`` the job's detector runs on the images."""
    if boxes not in BOXES:
        raise SourceError(f"--ls-boxes must be annotations or detector, got {boxes!r}")
    try:
        pulled = pull_tasks(client, project, out, document_root, boxes, progress)
    except LabelStudioError as e:  # no such project, no tasks, server unreachable, token refused
        raise SourceError(str(e)) from None
    items = [_item(p) for p in pulled.items]
    # boxes annotators drew are kept as drawn (no NMS, duplicate removal or per-image cap)
    return Source(items, "label-studio", given=pulled.given_spec, drawn=boxes == "annotations"), pulled.project_id


def _item(pulled: PulledItem) -> SourceItem:
    """A task as a source item; one whose image cannot be read carries the reason, which the job
    writes as the task's error row (the other tasks go on)."""
    return SourceItem(pulled.key, pulled.uri, pulled.error)
