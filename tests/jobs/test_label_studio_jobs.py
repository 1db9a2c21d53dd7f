"""Label Studio jobs against a real server: caption -> push, pull the boxes annotators drew and
caption them, the ML backend answering a drawn box through the server, CLI errors."""

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
    assert sorted(t["data"]["roiscribe_key"] for t in tasks) == ["s0.png", "s1.png", "s2.png"]
    assert all(len(t["predictions"]) == 1 and t["predictions"][0]["result"] for t in tasks)

    # an annotator draws one box on s1; the pull captions exactly that box and pushes it back
    task = next(t for t in tasks if t["data"]["roiscribe_key"] == "s1.png")
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
    pulled = [p for p in by_key["s1.png"]["predictions"] if p["model_version"] == "pulled"]
    assert len(pulled) == 1
    rects = [i for i in pulled[0]["result"] if i["type"] == "rectanglelabels"]
    assert len(rects) == 1 and rects[0]["value"]["x"] == pytest.approx(20.0, abs=1e-3)
    assert rects[0]["value"]["width"] == pytest.approx(30.0, abs=1e-3)
    captions = [i for i in pulled[0]["result"] if i["type"] == "textarea"]
    assert len(captions) == 1 and captions[0]["id"] == rects[0]["id"] and captions[0]["value"]["text"][0]
    for key in ("s0.png", "s2.png"):  # no boxes drawn: an empty prediction of the version
        (p,) = [p for p in by_key[key]["predictions"] if p["model_version"] == "pulled"]
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

    predictor = Predictor(backend=BackendConfig(document_root=str(ls_server.document_root), label_studio_url=ls_server.url))
    backend = serve(predictor, "127.0.0.1", 0)
    try:
        headers = {"Authorization": f"Token {ls_token}"}
        url = f"http://127.0.0.1:{backend.server_port}"
        r = httpx.post(f"{ls_server.url}/api/ml", headers=headers,
                       json={"url": url, "project": pid, "title": "roiscribe", "is_interactive": True})
        assert r.status_code == 201 and r.json()["readable_state"] == "Connected", r.text
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
