"""Label Studio jobs against a real server: caption -> push, pull the boxes annotators drew and
caption them, the ML backend answering a drawn box through the server (and refusing whoever is
not Label Studio), CLI errors."""

import json
import os
import re
import time

import httpx
import pytest
from PIL import Image

from jobs.cli import main
from sinks.label_studio import LabelStudio
from synth.world import generate_scene


@pytest.fixture(scope="module")
def scene_dir(ls_server):
    folder = ls_server.document_root / "scenes"
    folder.mkdir(exist_ok=True)
    for k in range(3):
        Image.fromarray(generate_scene(4242 + k).image).save(folder / f"s{k}.png")
    return folder


def tasks_of(server, token, title):
    client = LabelStudio(server.url, token)
    pid = client.project(title)["id"]
    return pid, client.list_tasks(pid)


def drawn_box(task_id: int, width: int, height: int) -> dict:
    return {"id": "drawn-1", "from_name": "region", "to_name": "image", "type": "rectanglelabels",
            "original_width": width, "original_height": height,
            "value": {"x": 20.0, "y": 25.0, "width": 30.0, "height": 40.0, "rotation": 0, "rectanglelabels": ["circle"]}}


def test_caption_to_label_studio_then_pull_drawn_boxes(ls_server, ls_token, scene_dir, tmp_path, capsys):
    root = str(ls_server.document_root)
    rc = main(["caption", str(scene_dir), "--out", str(tmp_path / "run"), "--no-ray", "--max-pairs", "2",
               "--to-label-studio", ls_server.url, "--project", "scenes", "--document-root", root])
    assert rc == 0, capsys.readouterr().err
    pid, tasks = tasks_of(ls_server, ls_token, "scenes")
    key = {name: os.path.realpath(scene_dir / name) for name in ("s0.png", "s1.png", "s2.png")}  # the job's image ids
    assert sorted(t["data"]["roiscribe_key"] for t in tasks) == sorted(key.values())
    assert all(len(t["predictions"]) == 1 and t["predictions"][0]["result"] for t in tasks)
    version = LabelStudio(ls_server.url, ls_token).project("scenes")["model_version"]
    assert re.fullmatch(r"roiscribe-\S+ model-demo@[0-9a-f]{8} detector-demo@[0-9a-f]{8} cfg@[0-9a-f]{8}", version)

    # an annotator draws one box on s1; the pull captions exactly that box and pushes it back
    task = next(t for t in tasks if t["data"]["roiscribe_key"] == key["s1.png"])
    w, h = Image.open(scene_dir / "s1.png").size
    r = httpx.post(f"{ls_server.url}/api/tasks/{task['id']}/annotations", headers={"Authorization": f"Token {ls_token}"},
                   json={"result": [drawn_box(task["id"], w, h)]})
    assert r.status_code == 201, r.text
    rc = main(["caption", ls_server.url, "--from-label-studio", "scenes", "--out", str(tmp_path / "pull"), "--no-ray",
               "--document-root", root, "--model-version", "pulled", "--max-pairs", "0"])
    assert rc == 0, capsys.readouterr().err
    _, tasks = tasks_of(ls_server, ls_token, "scenes")
    assert len(tasks) == 3  # no task was added
    by_key = {t["data"]["roiscribe_key"]: t for t in tasks}
    pulled = [p for p in by_key[key["s1.png"]]["predictions"] if p["model_version"] == "pulled"]
    assert len(pulled) == 1
    rects = [i for i in pulled[0]["result"] if i["type"] == "rectanglelabels"]
    assert len(rects) == 1 and rects[0]["value"]["x"] == pytest.approx(20.0, abs=1e-3)
    assert rects[0]["value"]["width"] == pytest.approx(30.0, abs=1e-3)
    captions = [i for i in pulled[0]["result"] if i["type"] == "textarea"]
    assert len(captions) == 1 and captions[0]["id"] == rects[0]["id"] and captions[0]["value"]["text"][0]
    for name in ("s0.png", "s2.png"):  # no boxes drawn: an empty prediction of the version
        (p,) = [p for p in by_key[key[name]]["predictions"] if p["model_version"] == "pulled"]
        assert p["result"] == []
    assert LabelStudio(ls_server.url, ls_token).project("scenes")["model_version"] == "pulled"


def test_ml_backend_answers_a_drawn_box_through_the_server(ls_server, ls_token, scene_dir, tmp_path):
    from jobs.ml_backend import BackendConfig, Predictor, serve
    from sinks.label_studio import ImageRefs, PushConfig, push
    from tests.sinks.test_label_studio import make_row

    row = make_row(0, str(scene_dir / "s0.png"))
    w, h = Image.open(scene_dir / "s0.png").size
    row.update(width=w, height=h, image_id="backend-s0")
    push([row], PushConfig(ls_server.url, "interactive", ImageRefs("local-files", str(ls_server.document_root)),
                           model_version="v1"), progress=False)
    pid, (task,) = tasks_of(ls_server, ls_token, "interactive")

    predictor = Predictor(backend=BackendConfig(document_root=str(ls_server.document_root), label_studio_url=ls_server.url,
                                                user=USER, password=PASSWORD))
    backend = serve(predictor, "127.0.0.1", 0)
    try:
        headers = {"Authorization": f"Token {ls_token}"}
        url = f"http://127.0.0.1:{backend.server_port}"
        # connected as Label Studio users connect a protected backend: Basic Auth, the backend's user and password
        r = httpx.post(f"{ls_server.url}/api/ml", headers=headers,
                       json={"url": url, "project": pid, "title": "roiscribe", "is_interactive": True,
                             "auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": PASSWORD})
        assert r.status_code == 201 and r.json()["readable_state"] == "Connected", r.text
        assert httpx.get(f"{url}/health").status_code == 401  # and nobody else gets in
        ml_id = r.json()["id"]
        context = {"result": [drawn_box(task["id"], w, h)]}
        r = httpx.post(f"{ls_server.url}/api/ml/{ml_id}/interactive-annotating", headers=headers,
                       json={"task": task["id"], "context": context}, timeout=120)
        assert r.status_code == 200, r.text
        items = r.json()["data"]["result"]
        assert items and all(i["id"] == "drawn-1" for i in items)  # attached to the drawn box
        assert not [i for i in items if i["type"] == "rectanglelabels"]  # the box itself is not redrawn
        caption = next(i for i in items if i["from_name"] == "caption")["value"]["text"][0]
        colour = next(i for i in items if i["from_name"] == "color")["value"]["choices"][0]
        assert caption and colour in {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
        # the same box asked directly gives the same caption: the backend runs the real engine
        direct = predictor.predict([task], "", {"result": context["result"]})[0]["result"]
        assert next(i for i in direct if i["from_name"] == "caption")["value"]["text"][0] == caption
    finally:
        backend.shutdown()


USER, PASSWORD = "label-studio", "backend-password-123"


def test_cli_push_errors_never_show_the_token(ls_server, tmp_path, monkeypatch, capsys):
    from sinks.parquet import ParquetSink

    out = tmp_path / "out"
    with ParquetSink(out) as sink:
        sink.write([{"image_id": "a.png", "uri": str(tmp_path / "a.png"), "width": 10, "height": 10, "status": "ok",
                     "num_regions": 0, "regions": [], "relations": []}])
    secret = "tok-SECRET-value-987"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", secret)
    assert main(["push", str(out), "--url", ls_server.url, "--project", "p"]) == 1
    err = capsys.readouterr().err
    assert ls_server.url in err and "401" in err and secret not in err
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    assert main(["push", str(out), "--url", ls_server.url, "--project", "p"]) == 1
    assert "set LABEL_STUDIO_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", secret)
    assert main(["push", str(out), "--url", "http://127.0.0.1:9", "--project", "p", "--retries", "1"]) == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and secret not in err
    for tail in ("\n", "\r", "\r\n"):  # a token with a control character is refused, and shown in no form
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", secret + tail)
        assert main(["push", str(out), "--url", ls_server.url, "--project", "p"]) == 1
        err = capsys.readouterr().err
        assert "not shown" in err
        for form in (secret, repr(secret + tail)[1:-1], json.dumps(secret + tail)[1:-1]):
            assert form not in err


def test_pull_gives_a_bad_task_its_error_row_and_captions_the_rest(ls_server, ls_token, scene_dir, tmp_path, capsys):
    from sinks.label_studio import labeling_config, spec_from_rows
    from sinks.parquet import read_rows
    from tests.sinks.test_label_studio import make_row

    client = LabelStudio(ls_server.url, ls_token)
    pid = client.create_project("pull-errors", labeling_config(spec_from_rows([make_row(0, "x")])))["id"]
    good, missing, outside = client.import_tasks(pid, [
        {"data": {"image": "/data/local-files/?d=scenes/s0.png"}},
        {"data": {"image": "/data/upload/999/missing.png"}},
        {"data": {"image": "/data/local-files/?d=scenes/../../../../etc/hostname"}}])
    rc = main(["caption", ls_server.url, "--from-label-studio", "pull-errors", "--out", str(tmp_path / "pull"),
               "--no-ray", "--document-root", str(ls_server.document_root), "--ls-boxes", "detector",
               "--max-pairs", "0", "--model-version", "pulled"])
    assert rc == 0, capsys.readouterr().err
    rows = {r["image_id"]: r for r in read_rows(tmp_path / "pull").to_pylist()}
    assert set(rows) == {f"task:{good}", f"task:{missing}", f"task:{outside}"}
    assert rows[f"task:{good}"]["status"] == "ok"
    assert rows[f"task:{missing}"]["status"] == "error" and "missing.png" in rows[f"task:{missing}"]["error"]
    assert rows[f"task:{outside}"]["status"] == "error" and "outside the document root" in rows[f"task:{outside}"]["error"]
    _, tasks = tasks_of(ls_server, ls_token, "pull-errors")
    assert [len(t["predictions"]) for t in sorted(tasks, key=lambda t: t["id"])] == [1, 0, 0]


# The ML backend's door: authentication, request limits, which images it reads -------------------

class FakePredictor:
    """What the handler needs of a predictor: its config and a predict that records its calls."""

    def __init__(self, cfg):
        self.cfg, self.calls = cfg, []

    def predict(self, tasks, label_config, context):
        self.calls.append((tasks, label_config, context))
        return [{"result": [], "model_version": self.cfg.model_version} for _ in tasks]


@pytest.fixture
def guarded_backend():
    from jobs.ml_backend import BackendConfig, serve

    predictor = FakePredictor(BackendConfig(user=USER, password=PASSWORD, request_timeout_s=2.0))
    server = serve(predictor, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_port}", predictor
    server.shutdown()
    server.server_close()


def raw_request(url: str, head: str, timeout: float = 5.0) -> bytes:
    """Sends ``head`` (request line and headers, no body) and returns what comes back before the
    server closes the connection or ``timeout`` passes (a held thread answers nothing)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(head.encode())
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except socket.timeout:
            pass
    return data


def test_ml_backend_needs_basic_auth(guarded_backend):
    url, predictor = guarded_backend
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]}
    assert httpx.get(f"{url}/health").status_code == 401
    r = httpx.post(f"{url}/predict", json=body)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert httpx.post(f"{url}/predict", json=body, auth=(USER, "wrong")).status_code == 401
    assert predictor.calls == []
    assert httpx.get(f"{url}/health", auth=(USER, PASSWORD)).json()["status"] == "UP"
    assert httpx.post(f"{url}/predict", json=body, auth=(USER, PASSWORD)).status_code == 200
    assert len(predictor.calls) == 1


def test_ml_backend_refuses_bad_lengths_at_once_and_bad_shapes(guarded_backend):
    import base64

    url, predictor = guarded_backend
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for length, status in (("-1", b" 400 "), ("99999999999", b" 413 "), (None, b" 411 "), ("12x", b" 400 ")):
        header = f"Content-Length: {length}\r\n" if length is not None else ""
        t = time.monotonic()
        answer = raw_request(url, f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n{header}\r\n")
        assert status in answer.split(b"\r\n", 1)[0], (length, answer[:200])
        assert time.monotonic() - t < 1.5, f"Content-Length {length} held the connection"
    # a body that never comes is dropped after the request timeout (2 s here), not held forever
    t = time.monotonic()
    raw_request(url, f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 10\r\n\r\n",
                timeout=10)
    assert time.monotonic() - t < 6
    for body in ([1, 2], {"tasks": "all"}, {"tasks": [{"id": 1}]}, {"tasks": [], "params": {"context": {"result": 3}}}):
        r = httpx.post(f"{url}/predict", json=body, auth=(USER, PASSWORD))
        assert r.status_code == 400, (body, r.text)
    assert predictor.calls == []


def test_ml_backend_refuses_to_listen_openly_without_auth():
    from jobs.ml_backend import BackendConfig, serve

    with pytest.raises(ValueError, match="without authentication"):
        serve(FakePredictor(BackendConfig()), "0.0.0.0", 0)
    server = serve(FakePredictor(BackendConfig()), "0.0.0.0", 0, allow_unauthenticated=True)
    server.shutdown()
    server.server_close()
    with pytest.raises(ValueError, match="both a user and a password"):
        BackendConfig(user="only-a-user")


def test_ml_backend_reads_only_the_projects_images(tmp_path):
    from jobs.ml_backend import ImageReader

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x%41.png").write_bytes(b"the file named x%41")
    (root / "sub" / "xA.png").write_bytes(b"the file named xA")
    (tmp_path / "secret.png").write_bytes(b"outside")

    class Client:
        url = "http://ls:8080"
        asked: list[str] = []

        def download(self, path):
            self.asked.append(path)
            return b"upload"

    client = Client()
    reader = ImageReader(str(root), client)
    # Label Studio writes the name x%41.png as ?d=sub/x%2541.png: decoded once, it is that file
    assert reader.read("/data/local-files/?d=sub/x%2541.png") == b"the file named x%41"
    assert reader.read("http://ls:8080/data/local-files/?d=sub%2FxA.png") == b"the file named xA"
    for escape in ("/data/local-files/?d=../secret.png", "/data/local-files/?d=sub/..%2F..%2Fsecret.png",
                   "/data/local-files/?d=sub/%252E%252E/%252E%252E/secret.png"):
        with pytest.raises(Exception, match="outside the document root|not found"):
            reader.read(escape)
    assert reader.read("/data/upload/3/a.png") == b"upload"
    for elsewhere in ("/api/projects/1/export?exportType=JSON", "/data/upload/../../api/projects",
                      "/data/upload/3/%2E%2E/%2E%2E/api/users", "http://evil:8080/data/upload/3/a.png",
                      "/data/upload/3/a.png?x=1", "https://elsewhere/a.png"):
        with pytest.raises(ValueError):
            reader.read(elsewhere)
    assert client.asked == ["/data/upload/3/a.png"]  # the API was never asked for anything else
