"""Label Studio: roiscribe rows -> tasks with predictions, pushed in bulk, idempotently.

The conversion is pure (``labeling_config``, ``row_to_result``); ``LabelStudio`` is a thin client
over the server's HTTP API; ``push`` ties them together. The client speaks plain HTTP (httpx)
rather than through label-studio-sdk because every write must be sent exactly once: the SDK
retries failed POSTs, which duplicates imports.

Conventions:

* a task is found by a stable image key, ``data["roiscribe_key"]`` (the row's ``image_id``), or
  ``task:ID`` for a task roiscribe did not create (pulled with ``caption --from-label-studio``);
* region ``k`` of a row is Label Studio region id ``r{k}``: its rectangle, caption text area and
  attribute choices share the id, and relations link ids;
* boxes are in percent of the original image (``original_width`` / ``original_height``);
* every prediction carries ``model_version``; a task gets at most one prediction per version, so
  a new version is added beside the old ones and the same version is never sent twice.

Nothing is retried blindly: reads (health, listing) are retried with backoff; a write that fails
on the connection is followed by a fresh listing of what the server holds, and only what is still
missing is sent again.
"""

from __future__ import annotations

import json
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import quote, unquote

KEY_FIELD = "roiscribe_key"
IMAGE_FIELD = "image"
REGION, CAPTION, IMAGE = "region", "caption", "image"
CAPTION_ANSWERS = ("caption", "caption_detailed")
TOKEN_VARIABLES = ("LABEL_STUDIO_API_KEY",)  # the SDK reads the same variable
IMAGE_MODES = ("local-files", "upload", "url")


class LabelStudioError(RuntimeError):
    """A push or pull could not complete; the message says what to do."""

    def __init__(self, message: str, status: int | None = None, body=None):
        super().__init__(message)
        self.status, self.body = status, body


class AuthError(LabelStudioError):
    pass


class UnreachableError(LabelStudioError):
    pass


class TaskError(ValueError):
    """One row cannot become a valid task (the rest of the push goes on)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def api_token(environ: dict | None = None) -> str:
    env = os.environ if environ is None else environ
    for name in TOKEN_VARIABLES:
        if env.get(name):
            return env[name]
    raise LabelStudioError(f"no Label Studio API token: set {TOKEN_VARIABLES[0]} (Account & Settings -> "
                           "Access Token in Label Studio)")


# The labeling config ------------------------------------------------------------------------------

@dataclass
class ConfigSpec:
    """What the labeling config must offer: box labels, attribute choices, relation labels."""

    classes: list[str] = field(default_factory=list)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    predicates: list[str] = field(default_factory=list)

    def union(self, other: "ConfigSpec") -> "ConfigSpec":
        def merge(a: Sequence[str], b: Sequence[str]) -> list[str]:
            return list(dict.fromkeys([*a, *b]))

        names = merge(list(self.attributes), list(other.attributes))
        return ConfigSpec(merge(self.classes, other.classes),
                          {n: merge(self.attributes.get(n, []), other.attributes.get(n, [])) for n in names},
                          merge(self.predicates, other.predicates))

    def covers(self, other: "ConfigSpec") -> bool:
        return self.union(other) == self


def spec_from_rows(rows: Iterable[dict]) -> ConfigSpec:
    """Classes, attribute values and predicates a run produced, plus the parser's vocabularies
    (so that an annotator can pick a value the model did not)."""
    from pipeline.parse import PREDICATES, VOCABULARIES

    classes: dict[str, None] = {}
    attributes: dict[str, dict[str, None]] = {}
    predicates: dict[str, None] = dict.fromkeys(PREDICATES)
    for row in rows:
        for region in row.get("regions") or []:
            if region.get("label"):
                classes[region["label"]] = None
            for a in region.get("answers") or []:
                if a["name"] in CAPTION_ANSWERS:
                    continue
                values = attributes.setdefault(a["name"], dict.fromkeys(VOCABULARIES.get(a["name"], {})))
                if a.get("value"):
                    values[a["value"]] = None
        for rel in row.get("relations") or []:
            if rel.get("predicate"):
                predicates[rel["predicate"]] = None
    return ConfigSpec(list(classes), {k: list(v) for k, v in attributes.items()}, list(predicates))


def labeling_config(spec: ConfigSpec) -> str:
    """An image, rectangle labels, a per-region caption, per-region choices per attribute and
    labelled relations."""
    def attr(text: str) -> str:
        return quote_xml(text)

    lines = ['<View>', f'  <Image name="{IMAGE}" value="${IMAGE_FIELD}" zoom="true"/>',
             f'  <RectangleLabels name="{REGION}" toName="{IMAGE}">']
    lines += [f'    <Label value="{attr(c)}"/>' for c in spec.classes]
    lines += ['  </RectangleLabels>',
              f'  <TextArea name="{CAPTION}" toName="{IMAGE}" perRegion="true" editable="true" '
              'displayMode="region-list" placeholder="caption"/>']
    for name, values in spec.attributes.items():
        lines.append(f'  <Choices name="{attr(name)}" toName="{IMAGE}" perRegion="true" choice="single" '
                     'showInline="true">')
        lines += [f'    <Choice value="{attr(v)}"/>' for v in values]
        lines.append('  </Choices>')
    lines.append('  <Relations>')
    lines += [f'    <Relation value="{attr(p)}"/>' for p in spec.predicates]
    lines += ['  </Relations>', '</View>']
    return "\n".join(lines)


def quote_xml(text: str) -> str:
    return (text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;"))


def spec_from_config(xml: str) -> ConfigSpec | None:
    """The spec of a config roiscribe generated; None for a config of another shape."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    rect = root.find(f".//RectangleLabels[@name='{REGION}']")
    if rect is None or root.find(f".//TextArea[@name='{CAPTION}']") is None:
        return None
    attributes = {c.get("name"): [x.get("value") for x in c.findall("Choice")] for c in root.iter("Choices")}
    return ConfigSpec([x.get("value") for x in rect.findall("Label")], attributes,
                      [x.get("value") for x in root.iter("Relation")])


# Rows -> prediction results -----------------------------------------------------------------------

def row_to_result(row: dict, spec: ConfigSpec) -> tuple[list[dict], float | None]:
    """The prediction ``result`` list and score of one ``ok`` row; raises ``TaskError`` for a row
    that would make an invalid prediction (a box outside the image, a relation to a missing
    region, a value the labeling config does not offer)."""
    key = row["image_id"]
    w, h = row.get("width") or 0, row.get("height") or 0
    if w <= 0 or h <= 0:
        raise TaskError(key, f"image size {w}x{h} is not positive")
    result, ids, scores = [], set(), []
    for region in row.get("regions") or []:
        rid = f"r{region['region_id']}"
        x1, y1, x2, y2 = region["box"]
        tol = 0.5  # half a pixel of float slack
        if not (-tol <= x1 < x2 <= w + tol and -tol <= y1 < y2 <= h + tol):
            raise TaskError(key, f"region {region['region_id']} box {[round(v, 1) for v in region['box']]} "
                                 f"lies outside the {w}x{h} image")
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
        geometry = {"x": 100.0 * x1 / w, "y": 100.0 * y1 / h, "width": 100.0 * (x2 - x1) / w,
                    "height": 100.0 * (y2 - y1) / h, "rotation": 0}
        base = {"id": rid, "to_name": IMAGE, "original_width": int(w), "original_height": int(h), "image_rotation": 0}
        label = region.get("label") or ""
        if label not in spec.classes:
            raise TaskError(key, f"region {region['region_id']} label {label!r} is not in the labeling config")
        score = region.get("score")
        rect = {**base, "from_name": REGION, "type": "rectanglelabels",
                "value": {**geometry, "rectanglelabels": [label]}}
        if score is not None:
            rect["score"] = float(score)
            scores.append(float(score))
        result.append(rect)
        if region.get("caption"):
            result.append({**base, "from_name": CAPTION, "type": "textarea", "value": {**geometry, "text": [region["caption"]]}})
        for a in region.get("answers") or []:
            if a["name"] in CAPTION_ANSWERS or not a.get("value") or a["name"] not in spec.attributes:
                continue
            if a["value"] not in spec.attributes[a["name"]]:
                raise TaskError(key, f"region {region['region_id']} {a['name']} {a['value']!r} is not in the labeling config")
            result.append({**base, "from_name": a["name"], "type": "choices", "value": {**geometry, "choices": [a["value"]]}})
        ids.add(rid)
    for rel in row.get("relations") or []:
        if not rel.get("predicate"):
            continue  # an unparsed answer: kept in Parquet, nothing to show as a relation
        a, b = f"r{rel['subject']}", f"r{rel['object']}"
        if a not in ids or b not in ids:
            raise TaskError(key, f"relation {rel['subject']} -{rel['predicate']}-> {rel['object']} names a region "
                                 f"the row does not have (regions {sorted(int(i[1:]) for i in ids)})")
        if rel["predicate"] not in spec.predicates:
            raise TaskError(key, f"relation predicate {rel['predicate']!r} is not in the labeling config")
        result.append({"type": "relation", "from_id": a, "to_id": b, "direction": "right", "labels": [rel["predicate"]]})
    return result, (sum(scores) / len(scores) if scores else None)


def model_version_of(rows: Sequence[dict]) -> str:
    """A default model version from the rows' provenance (model, detector, templates)."""
    if not rows:
        return "roiscribe"
    r = rows[0]
    text = f"roiscribe {Path(str(r.get('model') or '')).name} {Path(str(r.get('detector') or '')).name} {r.get('templates_version') or ''}"
    return " ".join(text.replace(",", " ").split())


# Images -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRefs:
    """How a task points at its image: ``local-files`` (a path under ``document_root``, served by
    Label Studio's local-files storage), ``upload`` (the file is uploaded to the project) or
    ``url`` (the row's http(s) uri, or ``url_prefix`` + the path under ``document_root``)."""

    mode: str = "local-files"
    document_root: str | None = None
    url_prefix: str | None = None

    def __post_init__(self):
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"image mode {self.mode!r}: expected one of {', '.join(IMAGE_MODES)}")
        if self.mode == "local-files" and not self.document_root:
            raise ValueError("local-files images need the document root the server serves "
                             "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT); pass --document-root")

    def relative(self, row: dict) -> str:
        root = Path(self.document_root).resolve()
        path = Path(row["uri"]).resolve()
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise TaskError(row["image_id"], f"image {row['uri']} is not under the document root {root}") from None
        if self.mode == "local-files" and len(rel.parts) < 2:
            raise TaskError(row["image_id"], f"image {row['uri']} lies directly in the document root; Label Studio "
                                             "serves local files only from its subfolders")
        return rel.as_posix()

    def storage_dirs(self, relative_paths: Iterable[str]) -> set[str]:
        """The document-root subfolders that local-files tasks read from (each needs a Label Studio
        local storage on the project, or the server answers 404 for its images)."""
        root = Path(self.document_root).resolve()
        return {str(root / rel.split("/", 1)[0]) for rel in relative_paths}

    def url(self, row: dict) -> str:
        uri = str(row["uri"])
        if self.mode == "local-files":
            return "/data/local-files/?d=" + quote(self.relative(row))
        if uri.startswith(("http://", "https://")):
            return uri
        if self.url_prefix and self.document_root:
            return self.url_prefix.rstrip("/") + "/" + quote(self.relative(row))
        raise TaskError(row["image_id"], f"image {uri} has no URL: give --url-prefix with --document-root, "
                                         "or use --images local-files / upload")


# The client ---------------------------------------------------------------------------------------

@dataclass
class ExistingTask:
    id: int
    model_versions: set[str]


class LabelStudio:
    """Thin client. The token is held here and nowhere else; errors never include it."""

    def __init__(self, url: str, token: str, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"Label Studio URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self._token = token
        self.retries, self.backoff, self.sleep = retries, backoff, sleep
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {token}"}, timeout=timeout)
        self._sdk = None

    # errors
    def _safe(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _fail(self, what: str, status: int, body) -> LabelStudioError:
        if status in (401, 403):
            return AuthError(f"Label Studio at {self.url} refused the API token ({status}) for {what}; "
                             f"set {TOKEN_VARIABLES[0]} to a valid token of a user with access", status)
        detail = self._safe(body if isinstance(body, str) else json.dumps(body))
        return LabelStudioError(f"Label Studio at {self.url} answered {status} to {what}: {detail[:2000]}", status, detail)

    def _unreachable(self, what: str, err: Exception) -> UnreachableError:
        return UnreachableError(self._safe(f"Label Studio at {self.url} is unreachable ({what}: "
                                           f"{type(err).__name__}: {err})"))

    # reads: retried with backoff on the connection, never on 4xx
    def get(self, path: str, what: str, **params) -> dict | list:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = self._http.get(path, params=params or None)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise self._unreachable(what, e) from None
                self.sleep(self.backoff * 2 ** attempt)
                continue
            if r.status_code >= 500 and attempt < self.retries:
                self.sleep(self.backoff * 2 ** attempt)
                continue
            if r.status_code != 200:
                raise self._fail(what, r.status_code, _body(r))
            return r.json()
        raise AssertionError("unreachable")

    def wait_healthy(self) -> None:
        self.get("/health", "health check")

    def check_token(self) -> None:
        self.get("/api/current-user/whoami", "checking the API token")

    # writes: one attempt; the caller re-reads the server's state after a failure
    def post(self, path: str, what: str, json_body=None, files=None, params=None) -> dict | list:
        import httpx

        try:
            r = self._http.post(path, json=json_body, files=files, params=params)
        except httpx.TransportError as e:
            raise self._unreachable(what, e) from None
        if r.status_code not in (200, 201):
            raise self._fail(what, r.status_code, _body(r))
        return r.json()

    def patch(self, path: str, what: str, json_body) -> dict:
        import httpx

        try:
            r = self._http.patch(path, json=json_body)
        except httpx.TransportError as e:
            raise self._unreachable(what, e) from None
        if r.status_code != 200:
            raise self._fail(what, r.status_code, _body(r))
        return r.json()

    # projects
    def project(self, name_or_id: str | int) -> dict | None:
        if str(name_or_id).isdigit():
            return self.get(f"/api/projects/{int(name_or_id)}", f"reading project {name_or_id}")
        page = 1
        while True:
            data = self.get("/api/projects", "listing projects", title=str(name_or_id), page=page, page_size=100)
            for p in data.get("results", []):
                if p.get("title") == str(name_or_id):
                    return p
            if not data.get("next"):
                return None
            page += 1

    def create_project(self, title: str, config: str) -> dict:
        return self.post("/api/projects", f"creating project {title!r}", {"title": title, "label_config": config})

    def update_project(self, pid: int, **fields) -> dict:
        return self.patch(f"/api/projects/{pid}", f"updating project {pid}", fields)

    def existing_tasks(self, pid: int, page_size: int = 1000) -> dict[str, ExistingTask]:
        """Every task of the project by key (``roiscribe_key`` and ``task:ID``)."""
        out: dict[str, ExistingTask] = {}
        page = 1
        while True:
            data = self.get("/api/tasks", f"listing tasks of project {pid}", project=pid, page=page,
                            page_size=page_size, fields="all", include="id,data,predictions_model_versions")
            for t in data.get("tasks", []):
                versions = {v.strip() for v in (t.get("predictions_model_versions") or "").split(",") if v.strip()}
                task = ExistingTask(int(t["id"]), versions)
                out[f"task:{t['id']}"] = task
                key = (t.get("data") or {}).get(KEY_FIELD)
                if key:
                    out[str(key)] = task
            if page * page_size >= int(data.get("total", 0)):
                return out
            page += 1

    def ensure_local_storage(self, pid: int, paths: set[str]) -> None:
        """A local-files storage on the project for each folder (created once; never synced:
        it only lets the server serve those files to the project's tasks)."""
        have = {s.get("path") for s in self.get("/api/storages/localfiles", f"listing storages of project {pid}",
                                                  project=pid)}
        for path in sorted(paths - have):
            self.post("/api/storages/localfiles", f"adding local storage {path} to project {pid}",
                      {"project": pid, "path": path, "title": f"roiscribe {Path(path).name}", "use_blob_urls": False})

    def import_tasks(self, pid: int, tasks: list[dict]) -> list[int]:
        r = self.post(f"/api/projects/{pid}/import", f"importing {len(tasks)} tasks into project {pid}",
                      tasks, params={"return_task_ids": "true", "commit_to_project": "true"})
        ids = r.get("task_ids") or []
        if int(r.get("task_count", -1)) != len(tasks) or len(ids) != len(tasks):
            raise LabelStudioError(f"Label Studio at {self.url} created {r.get('task_count')} tasks of {len(tasks)} "
                                   f"sent to project {pid}; run the push again to reconcile")
        return [int(i) for i in ids]

    def import_predictions(self, pid: int, predictions: list[dict]) -> int:
        r = self.post(f"/api/projects/{pid}/import/predictions",
                      f"importing {len(predictions)} predictions into project {pid}", predictions)
        created = int(r.get("created", -1))
        if created != len(predictions):
            raise LabelStudioError(f"Label Studio at {self.url} created {created} predictions of {len(predictions)} "
                                   f"sent to project {pid}; run the push again to reconcile")
        return created

    def upload(self, pid: int, paths: Sequence[Path]) -> list[str]:
        """Upload image files (one request for the batch) -> their ``/data/upload/...`` URLs."""
        handles = [open(p, "rb") for p in paths]
        try:
            files = {f"file{i}": (p.name, h) for i, (p, h) in enumerate(zip(paths, handles))}
            r = self.post(f"/api/projects/{pid}/import", f"uploading {len(paths)} images to project {pid}",
                          files=files, params={"commit_to_project": "false"})
        finally:
            for h in handles:
                h.close()
        ids = r.get("file_upload_ids") or []
        if len(ids) != len(paths):
            raise LabelStudioError(f"Label Studio at {self.url} stored {len(ids)} of {len(paths)} uploaded images")
        uploads = self.get(f"/api/projects/{pid}/file-uploads", "reading uploaded files", ids=json.dumps(ids))
        by_id = {u["id"]: u["file"] for u in uploads}
        return ["/data/" + by_id[i] for i in ids]

    def download(self, url: str) -> bytes:
        """An image the server serves (uploads, local files), read with the token."""
        import httpx

        path = url if url.startswith("/") else httpx.URL(url).raw_path.decode()
        if url.startswith(("http://", "https://")) and not url.startswith(self.url + "/"):
            raise LabelStudioError(f"image {url} is not on {self.url}; roiscribe reads only the server it was given")
        try:
            r = self._http.get(path)
        except httpx.TransportError as e:
            raise self._unreachable(f"downloading {url}", e) from None
        if r.status_code != 200:
            raise self._fail(f"downloading {url}", r.status_code, r.text[:200])
        return r.content

    def close(self) -> None:
        self._http.close()


def _body(r):
    try:
        return r.json()
    except ValueError:
        return r.text[:2000]


# Push ---------------------------------------------------------------------------------------------

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
            existing = client.existing_tasks(pid)
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
            rel = [unquote(u.split("?d=", 1)[1]) for u in urls.values()]
            client.ensure_local_storage(pid, cfg.images.storage_dirs(rel))
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
