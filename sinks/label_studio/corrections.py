"""Corrections: what people made of the pushed pre-annotations, as training data.

``export_corrections(client, project, out)`` reads every task of a project and, for each task a
person annotated, that person's last annotation that was not cancelled (the annotation wins over
the prediction it came from: a task with predictions only is not truth and is skipped). The
annotation's results, in the labeling config roiscribe writes (``labeling.py``), become one record
of ``sinks.exports``:

* every rectangle (moved, resized, added; a deleted one is simply absent) is a region, with its
  label; its caption is the per-region text area, its attributes the per-region choices, all
  matched by the region's result ``id`` (as Label Studio saves them);
* relations between rectangles (added or removed by the person) with their label as predicate;
* the ``flags`` choices and the read-only relation list are review aids, not labels: left out.

They are written with ``sinks.exports.write_exports`` to ``OUT/exports``: GPT4RoI conversations,
a YOLO set and COCO json, exactly as a pseudo-label export is, every item accepted with
probability 1.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sinks.label_studio.client import LabelStudio
from sinks.label_studio.convert import percent_box_to_pixels
from sinks.label_studio.errors import LabelStudioError
from sinks.label_studio.labeling import CAPTION, FLAGS, REGION, RELATION_LIST


def last_annotation(task: dict) -> dict | None:
    """The task's last annotation that was not cancelled, or None."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled", False)]
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0)) \
        if done else None


def annotation_record(task: dict, annotation: dict, image: str) -> dict:
    """One annotation as a ``sinks.exports`` record (everything accepted)."""
    results = annotation.get("result") or []
    rects = [r for r in results if r.get("type") == "rectanglelabels" and r.get("from_name") == REGION]
    index = {r["id"]: k for k, r in enumerate(rects)}
    width = height = 0
    regions = []
    for k, r in enumerate(rects):
        box = percent_box_to_pixels(r, task.get("id"))
        width, height = int(r.get("original_width") or width), int(r.get("original_height") or height)
        labels = (r.get("value") or {}).get("rectanglelabels") or [""]
        regions.append({"region_id": k, "label": labels[0], "class_id": -1, "box": box,
                        "area": max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0), "probability": 1.0,
                        "reason": None, "answers": {}})
    for r in results:
        k = index.get(r.get("id"))
        if k is None or r.get("from_name") in (REGION, FLAGS, RELATION_LIST):
            continue
        value = r.get("value") or {}
        if r.get("type") == "textarea" and r.get("from_name") == CAPTION:
            text = " ".join(t for t in value.get("text") or [] if t).strip()
            if text:
                regions[k]["answers"]["caption"] = {"value": text, "probability": 1.0, "reason": None}
        elif r.get("type") == "choices" and value.get("choices"):
            regions[k]["answers"][r["from_name"]] = {"value": value["choices"][0], "probability": 1.0, "reason": None}
    relations = []
    for r in results:
        if r.get("type") == "relation" and r.get("from_id") in index and r.get("to_id") in index:
            labels = r.get("labels") or []
            if labels:
                relations.append({"subject": index[r["from_id"]], "object": index[r["to_id"]], "predicate": labels[0],
                                  "probability": 1.0, "reason": None})
    return {"image_id": f"task:{task['id']}", "uri": image, "width": width, "height": height,
            "regions": regions, "relations": relations}


def export_corrections(client: LabelStudio, project: str, out: str | Path, document_root: str | None = None) -> dict:
    """The project's annotated tasks as training data under ``OUT/exports``; returns the manifest
    (with ``tasks``, ``annotated`` and the tasks skipped by reason)."""
    from sinks.exports import write_exports
    from sinks.label_studio.pull import local_image

    info = client.project(project)
    if info is None:
        raise LabelStudioError(f"Label Studio at {client.url} has no project {project!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    seen = Counter()

    def records():
        for page in client.task_pages(int(info["id"])):
            for task in page:
                seen["tasks"] += 1
                annotation = last_annotation(task)
                if annotation is None:
                    skipped["not annotated"] += 1
                    continue
                seen["annotated"] += 1
                yield annotation_record(task, annotation, local_image(client, task, out, document_root))

    manifest = write_exports(out / "exports", records(), manifest={"source": f"label-studio {client.url} "
                                                                             f"project {info['id']}"},
                             skipped=skipped)
    manifest |= dict(seen)
    return manifest
