"""Label Studio jobs against a real server: caption -> push, pull the boxes annotators drew and
caption them, the ML backend answering a drawn box through the server (and refusing whoever is
not Label Studio), CLI errors."""

import json
import os
import re
import time
from http.server import BaseHTTPRequestHandler

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
    captions = [i for i in pulled[0]["result"] if i["from_name"] == "caption"]
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
        # two drawn boxes under the project's own config: each box gets its own caption and the
        # config's attribute choices, under its own id (relations are not asked interactively)
        second = {**drawn_box(task["id"], w, h), "id": "drawn-2"}
        second["value"] = {**second["value"], "x": 60.0, "y": 10.0, "width": 25.0, "height": 25.0}
        config = LabelStudio(ls_server.url, ls_token).project("interactive")["label_config"]
        both = predictor.predict([task], config, {"result": [drawn_box(task["id"], w, h), second]})[0]["result"]
        from sinks.label_studio import spec_from_config

        asked = set(spec_from_config(config).attributes)
        assert "color" in asked
        for box in ("drawn-1", "drawn-2"):
            assert {i["from_name"] for i in both if i["id"] == box} == {"caption", *asked}
        assert {i["id"] for i in both} == {"drawn-1", "drawn-2"}
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


# README promises: the detector's boxes on pulled tasks, the backend without a drawn box, image
# URLs from a prefix, exit 1 on rejected rows, the created-count check, the token never logged ---

def caption_one(image, tmp_path) -> dict:
    """The row ``roiscribe caption`` makes of one image with the shipped defaults."""
    from sinks.parquet import read_rows

    folder = tmp_path / f"one-{image.stem}"
    folder.mkdir()
    (folder / image.name).write_bytes(image.read_bytes())
    assert main(["caption", str(folder), "--out", str(tmp_path / f"out-{image.stem}"), "--no-ray", "--max-pairs", "0"]) == 0
    (row,) = read_rows(tmp_path / f"out-{image.stem}").to_pylist()
    assert row["status"] == "ok" and row["regions"], row
    return row


def percent_boxes(result: list[dict]) -> list[float]:
    """A prediction's boxes, back in pixels, in order, flat (four numbers per box)."""
    from sinks.label_studio import percent_box_to_pixels

    return [v for i in result if i["type"] == "rectanglelabels" for v in percent_box_to_pixels(i)]


def test_pull_with_detector_boxes_captions_what_the_detector_finds(ls_server, ls_token, scene_dir, tmp_path, capsys):
    """``--ls-boxes detector`` ignores the tasks' annotations and runs the job's detector: the
    pulled task gets the regions a caption run finds on the same image; without the flag the
    same (unannotated) task gets none."""
    from sinks.parquet import read_rows
    from tests.sinks.test_label_studio import make_row
    from sinks.label_studio import labeling_config, spec_from_rows

    client = LabelStudio(ls_server.url, ls_token)
    pid = client.create_project("pull-detector", labeling_config(spec_from_rows([make_row(0, "x")])))["id"]
    (task_id,) = client.import_tasks(pid, [{"data": {"image": "/data/local-files/?d=scenes/s2.png"}}])
    common = ["--no-ray", "--document-root", str(ls_server.document_root), "--max-pairs", "0"]
    assert main(["caption", ls_server.url, "--from-label-studio", "pull-detector", "--out", str(tmp_path / "drawn"),
                 "--model-version", "drawn", *common]) == 0, capsys.readouterr().err
    (drawn,) = read_rows(tmp_path / "drawn").to_pylist()
    assert drawn["status"] == "ok" and drawn["regions"] == []  # nobody drew a box
    assert main(["caption", ls_server.url, "--from-label-studio", "pull-detector", "--out", str(tmp_path / "det"),
                 "--model-version", "det", "--ls-boxes", "detector", *common]) == 0, capsys.readouterr().err
    (pulled,) = read_rows(tmp_path / "det").to_pylist()
    direct = caption_one(scene_dir / "s2.png", tmp_path)
    assert pulled["image_id"] == f"task:{task_id}"
    assert [r["box"] for r in pulled["regions"]] == [r["box"] for r in direct["regions"]]
    assert [r["caption"] for r in pulled["regions"]] == [r["caption"] for r in direct["regions"]]
    (pred,) = [p for p in client.list_tasks(pid)[0]["predictions"] if p["model_version"] == "det"]
    assert percent_boxes(pred["result"]) == pytest.approx([v for r in direct["regions"] for v in r["box"]], abs=1e-3)


def test_ml_backend_without_a_drawn_box_pre_annotates_the_whole_image(ls_server, ls_token, scene_dir, tmp_path):
    """Label Studio's "Retrieve predictions" action asks the connected backend's ``/predict``
    with no drawn box: the backend runs detector + engine on the whole image and the server
    stores what it answered: the regions and captions a caption run gives."""
    from jobs.ml_backend import BackendConfig, Predictor, serve
    from tests.sinks.test_label_studio import make_row
    from sinks.label_studio import labeling_config, spec_from_rows

    client = LabelStudio(ls_server.url, ls_token)
    pid = client.create_project("backend-whole", labeling_config(spec_from_rows([make_row(0, "x")])))["id"]
    (task_id,) = client.import_tasks(pid, [{"data": {"image": "/data/local-files/?d=scenes/s1.png"}}])
    client.ensure_local_storage(pid, {str(scene_dir)})
    predictor = Predictor(backend=BackendConfig(document_root=str(ls_server.document_root), label_studio_url=ls_server.url,
                                                user=USER, password=PASSWORD, model_version="backend-v1"))
    backend = serve(predictor, "127.0.0.1", 0)
    headers = {"Authorization": f"Token {ls_token}"}
    try:
        r = httpx.post(f"{ls_server.url}/api/ml", headers=headers,
                       json={"url": f"http://127.0.0.1:{backend.server_port}", "project": pid, "title": "roiscribe",
                             "auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": PASSWORD})
        assert r.status_code == 201, r.text
        r = httpx.post(f"{ls_server.url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                       headers=headers, json={"selectedItems": {"all": True, "excluded": []}}, timeout=300)
        assert r.status_code == 200, r.text
    finally:
        backend.shutdown()
        backend.server_close()
    (task,) = client.list_tasks(pid)
    assert task["id"] == task_id
    (pred,) = [p for p in task["predictions"] if p["model_version"] == "backend-v1"]
    direct = caption_one(scene_dir / "s1.png", tmp_path)
    assert percent_boxes(pred["result"]) == pytest.approx([v for r in direct["regions"] for v in r["box"]], abs=1e-3)
    captions = [i["value"]["text"][0] for i in pred["result"] if i["type"] == "textarea"]
    assert captions == [r["caption"] for r in direct["regions"]]


def test_cli_push_of_url_images_reports_rejected_rows_and_exits_1(ls_server, ls_token, tmp_path, capsys, caplog):
    """``--images url --url-prefix``: each task's image is the prefix + the path under the
    document root; a row whose box leaves the image is named with its reason, the others are
    pushed, and the command exits 1. Nothing it prints or logs holds the token."""
    import logging

    from tests.sinks.test_label_studio import make_row, write_output

    caplog.set_level(logging.DEBUG)
    folder = ls_server.document_root / "cdn"
    folder.mkdir(exist_ok=True)
    rows = []
    for k in range(4):
        (folder / f"p {k}.png").write_bytes(b"never read: the push only writes the url")
        rows.append(make_row(70000 + k, str(folder / f"p {k}.png")))
    rows[2]["regions"][0]["box"] = [150.0, 10.0, 260.0, 40.0]  # right edge at 260 of a 200-px image
    out = write_output(tmp_path / "out", rows)
    rc = main(["push", str(out), "--url", ls_server.url, "--project", "cdn", "--images", "url",
               "--url-prefix", "https://cdn.example/set/", "--document-root", str(ls_server.document_root)])
    captured = capsys.readouterr()
    assert rc == 1
    assert rows[2]["image_id"] in captured.err and "outside the 200x100 image" in captured.err
    tasks = LabelStudio(ls_server.url, ls_token).list_tasks(LabelStudio(ls_server.url, ls_token).project("cdn")["id"])
    assert sorted((t["data"]["roiscribe_key"], t["data"]["image"]) for t in tasks) == sorted(
        (rows[k]["image_id"], f"https://cdn.example/set/cdn/p%20{k}.png") for k in (0, 1, 3))
    assert ls_token not in captured.out + captured.err + caplog.text
    assert caplog.text  # something was logged at DEBUG (the check above looked at real log text)


def test_a_push_whose_every_row_is_rejected_leaves_the_projects_model_version(ls_server, ls_token, tmp_path, capsys):
    """No prediction of the version was created, so the project is not switched to it (Label
    Studio would show a model version that does not exist)."""
    from tests.sinks.test_label_studio import make_row, write_output

    rows = [make_row(71000 + k, str(tmp_path / f"{k}.png")) for k in range(2)]
    for row in rows:
        row["regions"][0]["box"] = [150.0, 10.0, 260.0, 40.0]  # outside the 200-px image: rejected
    out = write_output(tmp_path / "out", rows)
    rc = main(["push", str(out), "--url", ls_server.url, "--project", "all-rejected", "--images", "url",
               "--url-prefix", "https://cdn.example/", "--document-root", str(tmp_path), "--model-version", "v-none"])
    assert rc == 1 and "rejected" in capsys.readouterr().err
    project = LabelStudio(ls_server.url, ls_token).project("all-rejected")
    assert project["model_version"] != "v-none"
    assert LabelStudio(ls_server.url, ls_token).list_tasks(project["id"]) == []


class DroppingProxy(BaseHTTPRequestHandler):
    """Forwards every request to the real server, but drops the last task or prediction of each
    import: the server then creates one fewer than the client sent (as a server that silently
    skipped an item would). A real server cannot be made to do that; this proxy can."""

    upstream = ""

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        if self.command == "POST" and re.fullmatch(r"/api/projects/\d+/import(/predictions)?", path):
            items = json.loads(body)
            body = json.dumps(items[:-1]).encode()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        r = httpx.request(self.command, self.upstream + self.path, headers=headers, content=body, timeout=60)
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args):
        pass


def test_an_import_that_creates_fewer_than_sent_stops_the_push_and_a_rerun_completes(ls_server, ls_token, tmp_path,
                                                                                     capsys):
    import threading
    from http.server import ThreadingHTTPServer

    from tests.sinks.test_label_studio import MANIFEST, make_row, write_output

    folder = ls_server.document_root / "fewer"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(b"x")
    rows = [make_row(80000 + k, str(folder / "a.png")) for k in range(3)]
    out = write_output(tmp_path / "out", rows, MANIFEST)
    DroppingProxy.upstream = ls_server.url
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), DroppingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    via = f"http://127.0.0.1:{proxy.server_address[1]}"
    root = ["--document-root", str(ls_server.document_root)]
    try:
        assert main(["push", str(out), "--url", via, "--project", "fewer", *root]) == 1
        assert "created 2 tasks of 3" in capsys.readouterr().err
        client = LabelStudio(ls_server.url, ls_token)
        pid = client.project("fewer")["id"]
        assert len(client.list_tasks(pid)) == 2
        assert main(["push", str(out), "--url", ls_server.url, "--project", "fewer", *root]) == 0  # reconciles
        assert sorted(t["data"]["roiscribe_key"] for t in client.list_tasks(pid)) == sorted(r["image_id"] for r in rows)
        # a new model version goes in as predictions on the existing tasks: the same check applies
        assert main(["push", str(out), "--url", via, "--project", "fewer", "--model-version", "v2", *root]) == 1
        assert "created 2 predictions of 3" in capsys.readouterr().err
        assert main(["push", str(out), "--url", ls_server.url, "--project", "fewer", "--model-version", "v2", *root]) == 0
        tasks = client.list_tasks(pid)
        assert sorted(sum(p["model_version"] == "v2" for p in t["predictions"]) for t in tasks) == [1, 1, 1]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_corrections_made_in_label_studio_become_the_training_data(ls_server, ls_token, scene_dir, tmp_path):
    """Push a prediction, then save an annotation the way the editor does (the prediction's items
    with the person's changes: a box moved, a caption edited, a choice changed, a region deleted,
    a box added with its caption and colour, a relation removed and one added); the exported
    conversations are exactly the edited truth, and a task nobody annotated is not exported."""
    import copy

    from sinks.label_studio import ImageRefs, PushConfig, push
    from sinks.label_studio.corrections import export_corrections
    from tests.sinks.test_label_studio import make_row

    rows = []
    for k in (0, 1):
        image = scene_dir / f"s{k}.png"
        row = make_row(k, str(image))
        w, h = Image.open(image).size
        row.update(width=w, height=h, image_id=f"corr-s{k}")
        rows.append(row)
    push(rows, PushConfig(ls_server.url, "corrections", ImageRefs("local-files", str(ls_server.document_root)),
                          model_version="v1"), progress=False)
    _, tasks = tasks_of(ls_server, ls_token, "corrections")
    task = next(t for t in tasks if t["data"]["roiscribe_key"] == "corr-s0")
    w, h = rows[0]["width"], rows[0]["height"]
    result = copy.deepcopy(task["predictions"][0]["result"])
    for item in result:
        if item.get("id") == "r0":  # moved: every item of the region carries its geometry
            item["value"].update(x=5.0, y=6.0)
        if item.get("id") == "r0" and item["from_name"] == "caption":
            item["value"]["text"] = ["a corrected caption"]
        if item.get("id") == "r1" and item["from_name"] == "color":
            item["value"]["choices"] = ["purple"]
    result = [i for i in result if i.get("id") != "r2" and "r2" not in (i.get("from_id"), i.get("to_id"))
              and not (i["type"] == "relation" and i["from_id"] == "r0" and i["to_id"] == "r1")]
    new = {"x": 60.0, "y": 50.0, "width": 20.0, "height": 25.0, "rotation": 0}
    base = {"id": "n1", "to_name": "image", "original_width": w, "original_height": h, "image_rotation": 0}
    result += [{**base, "from_name": "region", "type": "rectanglelabels", "value": {**new, "rectanglelabels": ["star"]}},
               {**base, "from_name": "caption", "type": "textarea", "value": {**new, "text": ["a new star"]}},
               {**base, "from_name": "color", "type": "choices", "value": {**new, "choices": ["green"]}},
               {"type": "relation", "from_id": "n1", "to_id": "r0", "direction": "right", "labels": ["above"]}]
    r = httpx.post(f"{ls_server.url}/api/tasks/{task['id']}/annotations",
                   headers={"Authorization": f"Token {ls_token}"}, json={"result": result})
    assert r.status_code == 201, r.text

    manifest = export_corrections(LabelStudio(ls_server.url, ls_token), "corrections", tmp_path / "corr",
                                  str(ls_server.document_root))
    assert manifest["tasks"] == 2 and manifest["annotated"] == 1
    assert manifest["images_skipped"] == {"not annotated": 1}
    (record,) = [json.loads(line) for line in (tmp_path / "corr" / "exports" / "conversations.jsonl").read_text().splitlines()]
    original = rows[0]["regions"]
    r1 = original[1]
    caption_q = "What can you tell me about the region indicated by <region1> in the image?"
    color_q = "What is the color of <region1>?"
    assert record["image"] == str((scene_dir / "s0.png").resolve())
    want = [[5.0 / 100 * w, 6.0 / 100 * h, 5.0 / 100 * w + 30.5, 6.0 / 100 * h + 40.25],  # moved, same size
            r1["box"], [0.6 * w, 0.5 * h, 0.8 * w, 0.75 * h]]
    assert [v for box in record["boxes"] for v in box] == pytest.approx([v for box in want for v in box], abs=1e-3)
    assert record["conversations"] == [
        {"from": "human", "value": caption_q, "regions": [0]}, {"from": "gpt", "value": "a corrected caption"},
        {"from": "human", "value": color_q, "regions": [0]}, {"from": "gpt", "value": original[0]["answers"][1]["value"]},
        {"from": "human", "value": caption_q, "regions": [1]}, {"from": "gpt", "value": r1["caption"]},
        {"from": "human", "value": color_q, "regions": [1]}, {"from": "gpt", "value": "purple"},
        {"from": "human", "value": caption_q, "regions": [2]}, {"from": "gpt", "value": "a new star"},
        {"from": "human", "value": color_q, "regions": [2]}, {"from": "gpt", "value": "green"},
        {"from": "human", "value": "What is the relationship between <region1> and <region2>?", "regions": [2, 0]},
        {"from": "gpt", "value": "region1 is above region2"},
    ]
    coco = json.loads((tmp_path / "corr" / "exports" / "coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "star"]
    # the same from the command line
    assert main(["corrections", "--url", ls_server.url, "--project", "corrections", "--out", str(tmp_path / "cli"),
                 "--document-root", str(ls_server.document_root)]) == 0
    assert (tmp_path / "cli" / "exports" / "conversations.jsonl").read_text() == \
        (tmp_path / "corr" / "exports" / "conversations.jsonl").read_text()
    assert [a["attributes"]["color"] for a in coco["annotations"]] == [original[0]["answers"][1]["value"], "purple", "green"]
