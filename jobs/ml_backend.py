"""A Label Studio ML backend serving the region engine: draw a box, get its description.

The protocol Label Studio really calls is small, so it is served directly (the PyPI
``label-studio-ml`` package is stale):

* ``GET /health`` -> ``{"status": "UP"}``
* ``POST /setup`` -> ``{"model_version": ...}``
* ``POST /predict`` ``{"tasks": [...], "label_config": ..., "params": {"context": {"result": [...]}}}``
  -> ``{"results": [{"result": [...], "score": ..., "model_version": ...}, ...]}``. With a context
  (the boxes an annotator drew) each drawn rectangle gets its caption and attribute choices under
  the rectangle's own region id, so Label Studio attaches them to that box. Without a context the
  whole image is annotated (detector + engine), as a pre-annotation.
* ``POST /webhook`` -> ``{}`` (nothing to do on project events).

Security. Every request needs HTTP basic auth when a user and password are configured (from
``ROISCRIBE_ML_BACKEND_USER`` / ``ROISCRIBE_ML_BACKEND_PASSWORD``; Label Studio sends them when
the backend is connected with "Basic Auth"); ``serve`` refuses a non-loopback address without them
unless told otherwise. A request body needs a ``Content-Length`` of at most ``max_body_bytes`` and
a JSON object of the shape above; a connection that stops sending is dropped after
``request_timeout_s``. Images are read only from the project's storage (``ImageReader``): local
files under the document root the server also serves, and uploads (``/data/upload/...``) from the
configured server with the API token. Nothing else is read, so the backend never proxies other
Label Studio paths.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import posixpath
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger("roiscribe.ml_backend")

USER_VARIABLE, PASSWORD_VARIABLE = "ROISCRIBE_ML_BACKEND_USER", "ROISCRIBE_ML_BACKEND_PASSWORD"
MAX_BODY_BYTES = 16 << 20  # a predict request holds tasks and a labeling config: far below this
REQUEST_TIMEOUT_S = 30.0  # a client that stops sending (or never sends its body) frees its thread after this
UPLOAD_PATH = "/data/upload/"  # where Label Studio serves uploaded files


class RequestError(ValueError):
    """A request the backend refuses: ``status`` is the HTTP answer, the message its reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class BackendConfig:
    """What the backend serves besides the job config: where images are read, the version it
    reports, who may call it and how much they may send."""

    label_studio_url: str | None = None  # where uploaded images are read from
    document_root: str | None = None  # where local-files images are read from
    model_version: str = "roiscribe-interactive"
    user: str | None = None  # basic auth; None: no authentication (loopback only, see serve)
    password: str | None = dataclasses.field(default=None, repr=False)
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout_s: float = REQUEST_TIMEOUT_S

    def __post_init__(self):
        if (self.user is None) != (self.password is None) or self.user == "" or self.password == "":
            raise ValueError(f"basic auth needs both a user and a password (set {USER_VARIABLE} and "
                             f"{PASSWORD_VARIABLE}), or neither")
        if self.user is not None and ":" in self.user:
            raise ValueError(f"{USER_VARIABLE} must not contain ':' (HTTP basic auth splits on it)")


def basic_auth_from_env(environ: dict | None = None) -> tuple[str | None, str | None]:
    """(user, password) from ``ROISCRIBE_ML_BACKEND_USER`` / ``_PASSWORD`` (never the command line,
    where other users of the machine see it); (None, None) when neither is set."""
    env = os.environ if environ is None else environ
    return env.get(USER_VARIABLE) or None, env.get(PASSWORD_VARIABLE) or None


class ImageReader:
    """Reads a task's image, only from the project's storage: ``/data/local-files/?d=PATH`` under
    the document root (``d`` is decoded once, by the query parser: a ``%25`` in a file name stays
    a ``%``), and ``/data/upload/...`` from the configured server. Anything else is refused."""

    def __init__(self, document_root: str | None = None, client=None):
        self.root = Path(document_root).resolve() if document_root else None
        self.client = client  # a sinks.label_studio.LabelStudio for uploads, or None

    def read(self, url: str) -> bytes:
        from sinks.label_studio.convert import local_files_path

        relative = local_files_path(url)
        if relative is not None:
            return self._local(url, relative)
        parts = urlsplit(url)
        if parts.path.startswith(UPLOAD_PATH):
            return self._upload(url, parts)
        raise ValueError(f"{url} is neither a local file under the document root nor an upload of the configured "
                         "server; the backend reads nothing else")

    def _local(self, url: str, relative: str) -> bytes:
        from pipeline.decode import read_file

        if self.root is None:
            raise ValueError("a local-files image needs --document-root (the server's document root)")
        path = (self.root / relative).resolve()
        if self.root not in path.parents:
            raise ValueError(f"{url} points outside the document root")
        return read_file(str(path))  # a regular file only (a FIFO would block), size-capped

    def _upload(self, url: str, parts) -> bytes:
        if self.client is None:
            raise ValueError(f"cannot read {url}: start the backend with --label-studio-url (and the API token)")
        if parts.scheme or parts.netloc:
            if f"{parts.scheme}://{parts.netloc}" != self.client.url:
                raise ValueError(f"{url} is not on {self.client.url}; the backend reads only that server's uploads")
        decoded = unquote(parts.path)
        if parts.query or parts.fragment or "\\" in decoded or posixpath.normpath(decoded) != decoded:
            raise ValueError(f"{url} is not a plain upload path")
        return self.client.download(parts.path)


class Predictor:
    """The engine behind the backend: drawn boxes (or the detector's) -> Label Studio results.

    Takes the same :class:`~jobs.config.JobConfig` as a caption job (model, detector, engine,
    compose, post-processing; relations are not asked: one box at a time); images go through the
    same pipeline stages."""

    def __init__(self, job=None, backend: BackendConfig = BackendConfig(), token: str | None = None):
        from jobs.config import JobConfig

        job = job or JobConfig()
        self.job = dataclasses.replace(job, compose=dataclasses.replace(job.compose, relations=False))
        self.cfg = backend
        self.engine = self.job.model.engine(self.job.engine)
        self._detector = None
        client = None
        if backend.label_studio_url:
            from sinks.label_studio import LabelStudio, api_token

            client = LabelStudio(backend.label_studio_url, token if token is not None else api_token())
        self.images = ImageReader(backend.document_root, client)
        self._lock = threading.Lock()  # one engine call at a time

    def detector(self):
        if self._detector is None:
            self._detector = self.job.detector.build()
        return self._detector

    def image_bytes(self, url: str) -> bytes:
        return self.images.read(url)

    def predict(self, tasks: list[dict], label_config: str, context: dict | None) -> list[dict]:
        from sinks.label_studio import spec_from_config

        spec = spec_from_config(label_config or "")
        drawn = [r for r in (context or {}).get("result", []) if r.get("type") == "rectanglelabels"]
        out = []
        for task in tasks:
            try:
                out.append(self._predict_task(task, spec, drawn))
            except Exception as e:  # noqa: BLE001 -- one bad task answers empty, with the reason logged
                log.warning("task %s: %s: %s", task.get("id"), type(e).__name__, e)
                out.append({"result": [], "model_version": self.cfg.model_version})
        return out

    def _predict_task(self, task: dict, spec, drawn: list[dict]) -> dict:
        from detectors.given import GivenBoxes
        from pipeline.arrow import result_to_row
        from pipeline.decode import ImageSource
        from pipeline.records import Regions
        from pipeline.stages import run_stages
        from sinks.label_studio import IMAGE_FIELD, ConfigSpec, percent_box_to_pixels, row_to_result

        image = self.image_bytes(str(task["data"][IMAGE_FIELD]))
        source = ImageSource(str(task["data"][IMAGE_FIELD]), image, str(task.get("id")))
        if drawn:
            boxes = [percent_box_to_pixels(r) for r in drawn]
            regions = Regions.from_boxes(boxes, [(r["value"].get("rectanglelabels") or [""])[0] for r in drawn])
            detector = GivenBoxes({source.image_id: regions})
        else:
            detector = self.detector()
        # drawn boxes are kept as drawn: no score threshold, no NMS
        cfg = dataclasses.replace(self.job, postprocess=None) if drawn else self.job
        with self._lock:
            result = run_stages([source], detector, self.engine, cfg)[0]
        if result.status != "ok":
            raise ValueError(result.error)
        row = result_to_row(result)
        labels = [r["label"] for r in row["regions"]]
        predicates = [r["predicate"] for r in row["relations"] if r["predicate"]]
        spec = spec or ConfigSpec()  # the project's config: its flags and relation list are kept
        spec = dataclasses.replace(spec, classes=list(dict.fromkeys([*spec.classes, *labels])),
                                   predicates=list(dict.fromkeys([*spec.predicates, *predicates])))
        items, score = row_to_result(row, spec)
        if drawn:  # attach to the drawn boxes: their ids, and no second rectangle
            items = [_to_drawn(i, {f"r{k}": r.get("id") for k, r in enumerate(drawn)})
                     for i in items if i["type"] != "rectanglelabels"]
        return {"result": items, "score": score, "model_version": self.cfg.model_version}


def _to_drawn(item: dict, ids: dict[str, str]) -> dict:
    """A result item of region ``r{k}`` moved onto the k-th drawn box: a region's items by their
    ``id``, a relation by its two ends; image-level items (the relation list) stay as they are."""
    if item["type"] == "relation":
        return {**item, "from_id": ids[item["from_id"]], "to_id": ids[item["to_id"]]}
    return {**item, "id": ids[item["id"]]} if item.get("id") in ids else item


# Requests -----------------------------------------------------------------------------------------

def predict_request(body: dict) -> tuple[list[dict], str, dict | None]:
    """(tasks, label_config, context) of a ``/predict`` body; ``RequestError`` (400) for another shape."""
    tasks, config, params = body.get("tasks", []), body.get("label_config") or "", body.get("params") or {}
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise RequestError(400, "'tasks' must be a list of tasks, each with a 'data' object")
    if not isinstance(config, str) or not isinstance(params, dict):
        raise RequestError(400, "'label_config' must be a string and 'params' an object")
    context = params.get("context")
    if context is not None and not (isinstance(context, dict) and isinstance(context.get("result", []), list)
                                    and all(isinstance(r, dict) for r in context.get("result", []))):
        raise RequestError(400, "'params.context' must be an object whose 'result' is a list of results")
    return tasks, config, context


def _authorized(header: str | None, user: str, password: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, f"{user}:{password}".encode())


def make_handler(predictor):
    """The request handler class for ``predictor`` (anything with ``cfg: BackendConfig`` and
    ``predict(tasks, label_config, context)``)."""
    cfg: BackendConfig = predictor.cfg

    class Handler(BaseHTTPRequestHandler):
        timeout = cfg.request_timeout_s  # socket timeout: a stalled client cannot hold a thread

        def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, status: int, message: str, headers: dict | None = None) -> None:
            self.close_connection = True  # the body (if any) was not read: the connection cannot go on
            self._send(status, {"error": message}, {"Connection": "close", **(headers or {})})

        def _check_auth(self) -> bool:
            if cfg.user is None or _authorized(self.headers.get("Authorization"), cfg.user, cfg.password):
                return True
            self._refuse(401, "authentication required", {"WWW-Authenticate": 'Basic realm="roiscribe"'})
            return False

        def _json(self) -> dict:
            if self.headers.get("Transfer-Encoding"):
                raise RequestError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise RequestError(411, "Content-Length is required")
            if not raw.strip().isdigit():
                raise RequestError(400, f"Content-Length must be a non-negative integer, got {raw[:40]!r}")
            length = int(raw)
            if length > cfg.max_body_bytes:
                raise RequestError(413, f"the body ({length} bytes) is over the limit of {cfg.max_body_bytes} bytes")
            data = self.rfile.read(length)  # bounded by the socket timeout
            if len(data) != length:
                raise RequestError(400, f"the body ended after {len(data)} of {length} bytes")
            try:
                body = json.loads(data or b"{}")
            except ValueError as e:
                raise RequestError(400, f"invalid JSON: {e}") from None
            if not isinstance(body, dict):
                raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
            return body

        def do_GET(self):  # noqa: N802
            if not self._check_auth():
                return
            if self.path.rstrip("/") in ("", "/health"):
                return self._send(200, {"status": "UP", "model_class": "roiscribe"})
            self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self):  # noqa: N802
            if not self._check_auth():
                return
            try:
                body = self._json()
                path = self.path.rstrip("/")
                if path == "/setup":
                    return self._send(200, {"model_version": cfg.model_version})
                if path == "/webhook":
                    return self._send(200, {})
                if path == "/predict":
                    results = predictor.predict(*predict_request(body))
                    return self._send(200, {"results": results, "model_version": cfg.model_version})
            except RequestError as e:
                return self._refuse(e.status, str(e))
            self._send(404, {"error": f"no route {self.path}"})

        def log_message(self, fmt, *args):  # requests go to the logger, not stderr
            log.info("%s " + fmt, self.address_string(), *args)

    return Handler


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, backend: BackendConfig, allow_unauthenticated: bool = False) -> None:
    """Refuses (ValueError) to listen beyond loopback without basic auth unless
    ``allow_unauthenticated``: the backend reads the project's images with the API token for
    whoever calls it."""
    if backend.user is None and not is_loopback(host) and not allow_unauthenticated:
        raise ValueError(f"refusing to serve on {host} without authentication: set {USER_VARIABLE} and "
                         f"{PASSWORD_VARIABLE} (and the same user and password under Basic Auth where the "
                         "backend is connected in Label Studio), listen on 127.0.0.1, or pass "
                         "--allow-unauthenticated")


def serve(predictor, host: str = "127.0.0.1", port: int = 9090, allow_unauthenticated: bool = False) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); ``server.shutdown()`` stops it (see ``check_exposure``)."""
    check_exposure(host, predictor.cfg, allow_unauthenticated)
    server = ThreadingHTTPServer((host, port), make_handler(predictor))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="ml-backend").start()
    return server
