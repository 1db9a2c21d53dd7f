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

Images are read the way the task names them: ``/data/local-files/?d=...`` under the document root
the server also serves, and anything else the server hosts (uploads) from the server itself with
the API token. Other hosts are refused: the backend reads only what it was pointed at.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("roiscribe.ml_backend")


@dataclass
class BackendConfig:
    """What the backend serves besides the job config: where images are read, the version it reports."""

    label_studio_url: str | None = None  # where uploaded images are read from
    document_root: str | None = None  # where local-files images are read from
    model_version: str = "roiscribe-interactive"


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
        self._client = None
        if backend.label_studio_url:
            from sinks.label_studio import LabelStudio, api_token

            self._client = LabelStudio(backend.label_studio_url, token if token is not None else api_token())
        self._lock = threading.Lock()  # one engine call at a time

    def detector(self):
        if self._detector is None:
            self._detector = self.job.detector.build()
        return self._detector

    def image_bytes(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.path.startswith("/data/local-files/"):
            if not self.cfg.document_root:
                raise ValueError("a local-files image needs --document-root (the server's document root)")
            root = Path(self.cfg.document_root).resolve()
            path = (root / unquote(parse_qs(parts.query)["d"][0])).resolve()
            if root not in path.parents:
                raise ValueError(f"{url} points outside the document root")
            return path.read_bytes()
        if self._client is None:
            raise ValueError(f"cannot read {url}: start the backend with --label-studio-url (and the API token)")
        return self._client.download(url)

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
        spec = spec or ConfigSpec()
        spec = ConfigSpec(list(dict.fromkeys([*spec.classes, *labels])), spec.attributes,
                          [*spec.predicates, *[r["predicate"] for r in row["relations"] if r["predicate"]]])
        items, score = row_to_result(row, spec)
        if drawn:  # attach to the drawn boxes: their ids, and no second rectangle
            ids = {f"r{k}": r.get("id") for k, r in enumerate(drawn)}
            items = [{**i, "id": ids[i["id"]]} for i in items if i["type"] != "rectanglelabels"]
        return {"result": items, "score": score, "model_version": self.cfg.model_version}


def make_handler(predictor: Predictor):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") in ("", "/health"):
                return self._send(200, {"status": "UP", "model_class": "roiscribe"})
            self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self):  # noqa: N802
            try:
                body = self._json()
            except ValueError as e:
                return self._send(400, {"error": f"invalid JSON: {e}"})
            path = self.path.rstrip("/")
            if path == "/setup":
                return self._send(200, {"model_version": predictor.cfg.model_version})
            if path == "/webhook":
                return self._send(200, {})
            if path == "/predict":
                context = (body.get("params") or {}).get("context")
                results = predictor.predict(body.get("tasks") or [], body.get("label_config") or "", context)
                return self._send(200, {"results": results, "model_version": predictor.cfg.model_version})
            self._send(404, {"error": f"no route {self.path}"})

        def log_message(self, fmt, *args):  # requests go to the logger, not stderr
            log.info("%s " + fmt, self.address_string(), *args)

    return Handler


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 9090) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); ``server.shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), make_handler(predictor))
    threading.Thread(target=server.serve_forever, daemon=True, name="ml-backend").start()
    return server
