"""Label Studio sink: the pure conversion, the client's retry rules against a stub server, then
pushes against a real Label Studio server."""

import json
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from sinks.label_studio import (
    AuthError, ConfigSpec, ImageRefs, LabelStudio, LabelStudioError, PushConfig, PushReport, TaskError,
    UnreachableError, api_token, labeling_config, model_version_from_manifest, model_version_of,
    percent_box_to_pixels, pull_tasks, push, row_to_result, spec_from_config, spec_from_rows, write_task_files,
)
from sinks.label_studio.convert import local_files_path, pixels_to_percent, relation_line
from sinks.label_studio.labeling import (
    FLAGS, LAYOUT, NO_HOTKEY, PALETTE, RELATION_LIST, is_current_layout, label_color,
)
from sinks.label_studio.push import _send_checked

COLORS = ["red", "green", "blue", "yellow"]
PREDICATES = ["left of", "right of", "above", "below"]


def make_row(k: int, uri: str, n_regions: int = 3, width: int = 200, height: int = 100) -> dict:
    """A caption-output row (``sinks.parquet`` schema) with regions, attributes and relations."""
    regions = []
    for i in range(n_regions):
        x1, y1 = 10.0 + 50 * i + (k % 7), 5.0 + (k % 11)
        color = COLORS[(k + i) % 4]
        regions.append({
            "region_id": i, "box": [x1, y1, x1 + 30.5, y1 + 40.25], "label": ["circle", "star"][i % 2],
            "class_id": i % 2, "score": 0.5 + 0.1 * i, "caption": f"a {color} thing number {k}-{i}",
            "answers": [
                {"name": "caption", "value": f"a {color} thing number {k}-{i}", "raw": "", "status": "ok"},
                {"name": "color", "value": color, "raw": color, "status": "ok"},
                {"name": "material", "value": None, "raw": "???", "status": "unknown"},
            ],
        })
    relations = [{"subject": i, "predicate": PREDICATES[(k + i) % 4], "object": i + 1, "raw": "", "status": "ok"}
                 for i in range(n_regions - 1)]
    return {"image_id": f"img/{k:05d}.png", "uri": uri, "width": width, "height": height, "status": "ok",
            "error": None, "num_regions": n_regions, "regions": regions, "relations": relations,
            "detector": "yolo:/x/detector.pt", "model": "/x/gpt4roi", "templates_version": "v1"}


# Pure conversion ----------------------------------------------------------------------------------

def test_labeling_config_round_trips_and_offers_what_the_rows_need():
    rows = [make_row(0, "a.png"), make_row(1, "b.png")]
    spec = spec_from_rows(rows)
    assert spec.classes == ["circle", "star"]
    assert {"red", "green", "blue", "yellow"} <= set(spec.attributes["color"])
    assert "wood" in spec.attributes["material"]  # the vocabulary, though no row had a material
    assert {"left of", "right of", "above", "below"} <= set(spec.predicates)
    xml = labeling_config(spec)
    assert spec_from_config(xml) == spec
    assert 'perRegion="true"' in xml and "<Relations>" in xml and "<RectangleLabels" in xml
    assert spec_from_config("<View><Image name='i' value='$x'/></View>") is None


def test_row_to_result_percent_boxes_shared_region_ids_and_relations():
    row = make_row(3, "a.png", n_regions=2)
    items, score = row_to_result(row, spec_from_rows([row]))
    rect = [i for i in items if i["type"] == "rectanglelabels"]
    assert [r["id"] for r in rect] == ["r0", "r1"]
    x1, y1, x2, y2 = row["regions"][0]["box"]
    v = rect[0]["value"]
    assert v["x"] == pytest.approx(100 * x1 / 200) and v["width"] == pytest.approx(100 * (x2 - x1) / 200)
    assert v["y"] == pytest.approx(100 * y1 / 100) and v["height"] == pytest.approx(100 * (y2 - y1) / 100)
    assert rect[0]["original_width"] == 200 and rect[0]["original_height"] == 100
    by_region = {(i["id"], i["from_name"]) for i in items if i["type"] != "relation"}
    assert ("r0", "caption") in by_region and ("r0", "color") in by_region
    assert ("r0", "material") not in by_region  # an unparsed answer is not a choice
    (rel,) = [i for i in items if i["type"] == "relation"]
    assert (rel["from_id"], rel["to_id"], rel["labels"]) == ("r0", "r1", [row["relations"][0]["predicate"]])
    assert score == pytest.approx(0.55)


def test_bad_rows_raise_task_errors_that_name_the_problem():
    row = make_row(1, "a.png")
    spec = spec_from_rows([row])
    outside = json.loads(json.dumps(row))
    outside["regions"][1]["box"] = [150.0, 10.0, 260.0, 50.0]
    with pytest.raises(TaskError, match=r"region 1 box .* outside the 200x100 image"):
        row_to_result(outside, spec)
    dangling = json.loads(json.dumps(row))
    dangling["relations"].append({"subject": 0, "predicate": "above", "object": 7, "raw": "", "status": "ok"})
    with pytest.raises(TaskError, match="names a region the row does not have"):
        row_to_result(dangling, spec)
    unknown = json.loads(json.dumps(row))
    unknown["regions"][0]["label"] = "hexagon"
    with pytest.raises(TaskError, match="'hexagon' is not in the labeling config"):
        row_to_result(unknown, spec)


def shape_row(k: int = 0) -> dict:
    """A row whose detector classes are shapes and whose model answers shape too (the demo's case):
    region 1's label disagrees with its shape answer; four relations of different confidence."""
    row = make_row(k, "a.png", n_regions=3)
    shapes = ["circle", "circle", "circle"]  # region 1 is labelled "star"
    for region, shape in zip(row["regions"], shapes):
        region["caption_mean_logprob"], region["caption_min_logprob"] = -0.1, -0.2
        region["answers"].append({"name": "shape", "value": shape, "raw": shape, "status": "ok",
                                  "mean_logprob": -0.01, "min_logprob": -0.05})
    def rel(subject, predicate, obj, min_logprob):
        return {"subject": subject, "predicate": predicate, "object": obj, "raw": "" if predicate else "region1 is near",
                "status": "ok" if predicate else "unknown", "mean_logprob": -0.1, "min_logprob": min_logprob}

    row["relations"] = [rel(0, "left of", 1, -0.9), rel(1, "left of", 2, -0.1), rel(0, None, 2, -0.01),
                        rel(2, "right of", 0, -0.3)]
    return row


def test_labeling_config_reads_well_titled_groups_colours_and_no_stray_hotkeys():
    import xml.etree.ElementTree as ET

    spec = spec_from_rows([shape_row()])
    assert spec.label_attributes == ["shape"] and spec.relation_list
    spec = spec.union(ConfigSpec([f"class{i}" for i in range(14)]))
    root = ET.fromstring(labeling_config(spec))
    assert root.get("className") == LAYOUT and spec_from_config(labeling_config(spec)) == spec
    labels = root.findall(".//RectangleLabels/Label")
    colours = [x.get("background") for x in labels]
    assert len(set(colours)) == len(labels) == 16 and colours[:len(PALETTE)] == list(PALETTE)
    assert label_color(40) not in PALETTE and label_color(40) == label_color(40)
    # hotkeys 1..9, 0 for the first ten labels; none for the rest and for every choice
    assert [x.get("hotkey") for x in labels] == [*"1234567890", *[NO_HOTKEY] * 6]
    assert {x.get("hotkey") for x in root.iter("Choice")} == {NO_HOTKEY}
    # every attribute's group has a title right before it, inside the selected region's fields
    fields = root.find(".//View[@visibleWhen='region-selected']")
    children = list(fields)
    for name in ("color", "material", "shape", FLAGS):
        (i,) = [i for i, c in enumerate(children) if c.tag == "Choices" and c.get("name") == name]
        assert children[i - 1].tag == "Header" and children[i - 1].get("value") == name.capitalize()
        assert children[i].get("perRegion") == "true" and children[i].get("layout") == "select"
    assert [c.get("value") for c in root.find(f".//Choices[@name='{FLAGS}']")] == ["label ≠ shape"]
    assert root.find(".//TextArea[@name='caption']").get("editable") == "true"
    assert {t.get("name") for t in root.iter("TextArea")} == {"caption", RELATION_LIST}


def test_old_layouts_are_recognised_and_reserved_names_refused():
    old = ('<View><Image name="image" value="$image"/><RectangleLabels name="region" toName="image">'
           '<Label value="circle"/></RectangleLabels><TextArea name="caption" toName="image" perRegion="true"/>'
           '<Choices name="color" toName="image" perRegion="true"><Choice value="red"/></Choices>'
           '<Relations><Relation value="above"/></Relations></View>')
    spec = spec_from_config(old)
    assert spec == ConfigSpec(["circle"], {"color": ["red"]}, ["above"], [], False)
    assert not is_current_layout(old) and is_current_layout(labeling_config(spec))
    assert "relation_list" not in labeling_config(spec)  # no lists: predictions for it carry none
    with pytest.raises(ValueError, match="'flags' has a name the labeling config reserves"):
        labeling_config(ConfigSpec(["a"], {"flags": ["x"]}))


def test_disagreeing_regions_are_flagged_answers_scored_and_relations_capped():
    row = shape_row()
    spec = spec_from_rows([row])
    items, _ = row_to_result(row, spec, max_relations=2)
    flags = [(i["id"], i["value"]["choices"]) for i in items if i.get("from_name") == FLAGS]
    assert flags == [("r1", ["label ≠ shape"])]  # labelled star, answered circle
    shape = next(i for i in items if i.get("from_name") == "shape" and i["id"] == "r0")
    caption = next(i for i in items if i.get("from_name") == "caption" and i["id"] == "r0")
    assert shape["score"] == pytest.approx(math.exp(-0.05)) and caption["score"] == pytest.approx(math.exp(-0.2))
    # the two most confident parsed relations (the unparsed one is never pushed)
    rels = [(i["from_id"], i["labels"][0], i["to_id"]) for i in items if i["type"] == "relation"]
    assert rels == [("r1", "left of", "r2"), ("r2", "right of", "r0")]
    (rel_list,) = [i for i in items if i.get("from_name") == RELATION_LIST]
    assert rel_list["value"]["text"] == ["2 star left of 3 circle (0.90)", "3 circle right of 1 circle (0.74)"]
    assert relation_line(0, "circle", "above", 4, "", None) == "1 circle above 5"
    everything, _ = row_to_result(row, spec)
    assert sum(i["type"] == "relation" for i in everything) == 3
    none = row_to_result(row, spec, 0)[0]
    assert not [i for i in none if i["type"] == "relation" or i.get("from_name") == RELATION_LIST]
    # a config without the relation list (an older layout) gets the flags but no list
    bare = ConfigSpec(spec.classes, spec.attributes, spec.predicates, spec.label_attributes, relation_list=False)
    names = {i.get("from_name") for i in row_to_result(row, bare)[0]}
    assert FLAGS in names and RELATION_LIST not in names
    with pytest.raises(ValueError, match="max_relations must be >= 0"):
        PushConfig("http://x", "p", max_relations=-1)


def test_image_refs(tmp_path):
    (tmp_path / "sub").mkdir()
    img = tmp_path / "sub" / "a b.png"
    img.write_bytes(b"x")
    row = {"image_id": "k", "uri": str(img)}
    assert ImageRefs("local-files", str(tmp_path)).url(row) == "/data/local-files/?d=sub/a%20b.png"
    with pytest.raises(TaskError, match="directly in the document root"):
        ImageRefs("local-files", str(tmp_path / "sub")).url(row)
    assert ImageRefs("url", str(tmp_path), "https://cdn.example/x/").url(row) == "https://cdn.example/x/sub/a%20b.png"
    assert ImageRefs("url").url({"image_id": "k", "uri": "https://h/i.png"}) == "https://h/i.png"
    with pytest.raises(TaskError, match="not under the document root"):
        ImageRefs("local-files", str(tmp_path / "sub" / "deeper")).url(row)
    with pytest.raises(ValueError, match="document root"):
        ImageRefs("local-files")
    import hashlib

    provenance = hashlib.sha256(b"/x/gpt4roi\nyolo:/x/detector.pt\nv1").hexdigest()[:8]
    assert model_version_of([make_row(0, "a")]) == ("roiscribe model-gpt4roi detector-yolo-detector templates-v1 "
                                                     f"@{provenance}")
    moved = {**make_row(0, "a"), "model": "/y/gpt4roi"}  # same names, another checkpoint: another version
    assert model_version_of([moved]) != model_version_of([make_row(0, "a")])
    assert local_files_path("/data/local-files/?d=sub/a%20b.png") == "sub/a b.png"
    assert local_files_path("http://h:8080/data/local-files/?d=x/y.png") == "x/y.png"
    assert local_files_path("/data/upload/3/a.png") is None


def test_percent_and_pixels_are_inverse():
    box = [12.5, 7.0, 180.25, 99.0]
    value = pixels_to_percent(box, 200, 100)
    assert value["x"] == pytest.approx(6.25) and value["height"] == pytest.approx(92.0)
    result = {"original_width": 200, "original_height": 100, "value": value}
    assert percent_box_to_pixels(result) == pytest.approx(box)
    with pytest.raises(ValueError, match="task 9: a rectangle.*original_width"):
        percent_box_to_pixels({"value": value}, 9)


def test_pure_modules_import_neither_httpx_nor_the_sdk():
    code = ("import sys, sinks.label_studio, sinks.label_studio.convert, sinks.label_studio.labeling\n"
            "print(' '.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "httpx" not in loaded and "label_studio_sdk" not in loaded


# The client's retry rules, against a stub server -------------------------------------------------

class Stub(BaseHTTPRequestHandler):
    """Answers every request with ``status`` (or drops the connection when it is None) and counts
    requests per method."""

    status: int | None = 503
    counts: dict[str, int] = {}

    def _answer(self):
        type(self).counts[self.command] = type(self).counts.get(self.command, 0) + 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.status is None:
            self.close_connection = True
            self.connection.close()
            return
        body = b'{"detail": "stub says no"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    Stub.counts, Stub.status = {}, 503
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [503, None])  # a 5xx answer, and a connection dropped without one
def test_writes_are_sent_once_and_reads_retried(stub, status):
    Stub.status = status
    client = LabelStudio(stub, "secret-token-xyz", retries=2, backoff=0.0)
    expected = UnreachableError if status is None else LabelStudioError
    with pytest.raises(expected) as info:
        client.import_tasks(1, [{"data": {"image": "/x.png"}}])
    assert Stub.counts == {"POST": 1}, "a write was sent more than once"
    with pytest.raises(expected):
        client.import_predictions(1, [{"task": 1, "result": []}])
    with pytest.raises(expected):
        client.update_project(1, model_version="v")
    assert Stub.counts == {"POST": 2, "PATCH": 1}
    with pytest.raises(expected):
        client.project(5)
    assert Stub.counts["GET"] == 3  # one try and two retries
    assert "secret-token-xyz" not in str(info.value) and stub in str(info.value)
    if status is not None:
        assert info.value.status == 503 and "stub says no" in str(info.value)


def test_a_4xx_read_is_not_retried(stub):
    Stub.status = 404
    with pytest.raises(LabelStudioError, match="answered 404 to reading project 5"):
        LabelStudio(stub, "t", retries=3, backoff=0.0).project(5)
    assert Stub.counts == {"GET": 1}


# Against the real server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(ls_server):
    """A few real images under the server's document root."""
    from PIL import Image

    folder = ls_server.document_root / "imgs"
    folder.mkdir(exist_ok=True)
    paths = []
    for k in range(4):
        p = folder / f"{k}.png"
        Image.new("RGB", (200, 100), (40 * k, 90, 160)).save(p)
        paths.append(str(p))
    return paths


def rows_for(images, n: int, offset: int = 0) -> list[dict]:
    return [make_row(offset + k, images[k % len(images)]) for k in range(n)]


def server_tasks(server, token: str, title: str) -> list[dict]:
    client = LabelStudio(server.url, token)
    return client.list_tasks(client.project(title)["id"])


def read_back(task: dict, version: str) -> dict:
    """What a task's prediction of ``version`` says, in row terms."""
    (pred,) = [p for p in task["predictions"] if p["model_version"] == version]
    regions: dict[str, dict] = {}
    relations = []
    for item in pred["result"]:
        if item["type"] == "relation":
            relations.append((int(item["from_id"][1:]), item["labels"][0], int(item["to_id"][1:])))
            continue
        if item["from_name"] == RELATION_LIST:  # the image's relations in words, not a region
            continue
        r = regions.setdefault(item["id"], {})
        v = item["value"]
        if item["type"] == "rectanglelabels":
            w, h = item["original_width"], item["original_height"]
            r["box"] = [v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100]
            r["label"] = v["rectanglelabels"][0]
        elif item["type"] == "textarea":
            r["caption"] = v["text"][0]
        else:
            r[item["from_name"]] = v["choices"][0]
    return {"regions": regions, "relations": sorted(relations)}


def expected(row: dict) -> dict:
    regions = {f"r{r['region_id']}": {"box": r["box"], "label": r["label"], "caption": r["caption"],
                                      "color": next(a["value"] for a in r["answers"] if a["name"] == "color")}
               for r in row["regions"]}
    return {"regions": regions, "relations": sorted((r["subject"], r["predicate"], r["object"]) for r in row["relations"])}


def assert_same(task: dict, row: dict, version: str) -> None:
    got, want = read_back(task, version), expected(row)
    assert got["relations"] == want["relations"]
    assert set(got["regions"]) == set(want["regions"])
    for rid, w in want["regions"].items():
        g = got["regions"][rid]
        assert g["box"] == pytest.approx(w["box"], abs=1e-3)
        assert (g["label"], g["caption"], g["color"]) == (w["label"], w["caption"], w["color"])


def test_push_1000_tasks_reads_back_equal_and_a_second_push_adds_nothing(ls_server, ls_token, images):
    rows = rows_for(images, 1000)
    cfg = PushConfig(ls_server.url, "round-trip", ImageRefs("local-files", str(ls_server.document_root)),
                     model_version="v1", chunk_size=250)
    report = push(rows, cfg, progress=False)
    assert (report.tasks_created, report.predictions_created, report.rejected) == (1000, 0, [])
    tasks = server_tasks(ls_server, ls_token, "round-trip")
    assert len(tasks) == 1000
    by_key = {t["data"]["roiscribe_key"]: t for t in tasks}
    for row in rows:
        task = by_key[row["image_id"]]
        assert task["data"]["image"].startswith("/data/local-files/?d=imgs/")
        assert_same(task, row, "v1")
    # the image a task names is really served
    r = httpx.get(ls_server.url + tasks[0]["data"]["image"], headers={"Authorization": f"Token {ls_token}"})
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    project = LabelStudio(ls_server.url, ls_token).project("round-trip")
    assert project["model_version"] == "v1"

    again = push(rows, cfg, progress=False)
    assert (again.tasks_created, again.predictions_created, again.already_present) == (0, 0, 1000)
    tasks = server_tasks(ls_server, ls_token, "round-trip")
    assert len(tasks) == 1000 and sum(len(t["predictions"]) for t in tasks) == 1000

    # a new model version goes beside the old one; the project now shows it
    v2 = push(rows[:10], PushConfig(ls_server.url, "round-trip", cfg.images, model_version="v2"), progress=False)
    assert (v2.tasks_created, v2.predictions_created) == (0, 10)
    tasks = server_tasks(ls_server, ls_token, "round-trip")
    assert len(tasks) == 1000 and sum(len(t["predictions"]) for t in tasks) == 1010
    assert LabelStudio(ls_server.url, ls_token).project("round-trip")["model_version"] == "v2"


def test_bad_rows_are_reported_per_task_and_the_rest_is_pushed(ls_server, ls_token, images):
    rows = rows_for(images, 20, offset=5000)
    rows[3]["regions"][0]["box"] = [190.0, 10.0, 230.0, 40.0]  # beyond the 200-px width
    rows[7]["relations"].append({"subject": 0, "predicate": "above", "object": 9, "raw": "", "status": "ok"})
    rows[9] = {**rows[9], "status": "error", "error": "decode: not an image", "regions": [], "relations": []}
    report = push(rows, PushConfig(ls_server.url, "bad-rows", ImageRefs("local-files", str(ls_server.document_root)),
                                   model_version="v1"), progress=False)
    assert {e.key for e in report.rejected} == {rows[3]["image_id"], rows[7]["image_id"]}
    assert "outside the 200x100 image" in next(e.reason for e in report.rejected if e.key == rows[3]["image_id"])
    assert report.tasks_created == 17 and report.error_rows == 1
    assert len(server_tasks(ls_server, ls_token, "bad-rows")) == 17


def test_server_side_rejection_names_the_task_and_the_rest_goes_in(ls_server, ls_token, images):
    """The safety net behind client validation: the server (prediction validation on) answers 400
    and writes nothing; the task it names is reported and the others are sent again."""
    client = LabelStudio(ls_server.url, ls_token)
    row = make_row(1, images[0])
    spec = spec_from_rows([row])
    pid = client.create_project("server-validation", labeling_config(spec))["id"]
    good, _ = row_to_result(row, spec)
    bad = json.loads(json.dumps(good))
    bad[0]["value"]["rectanglelabels"] = ["not-a-label"]
    items = {f"k{i}": {"data": {"image": "/x.png", "roiscribe_key": f"k{i}"},
                       "predictions": [{"model_version": "v1", "result": bad if i == 2 else good}]} for i in range(4)}
    report = PushReport(pid, "v1")
    sent = _send_checked(lambda p, batch: len(client.import_tasks(p, batch)), pid, items, report.rejected.append)
    assert sent == 3
    assert [e.key for e in report.rejected] == ["k2"] and "not-a-label" in report.rejected[0].reason


def test_upload_mode_uses_the_same_key(ls_server, ls_token, images):
    rows = rows_for(images, 3, offset=7000)
    report = push(rows, PushConfig(ls_server.url, "uploads", ImageRefs("upload"), model_version="v1"), progress=False)
    assert report.tasks_created == 3
    tasks = server_tasks(ls_server, ls_token, "uploads")
    assert sorted(t["data"]["roiscribe_key"] for t in tasks) == sorted(r["image_id"] for r in rows)
    for t in tasks:
        assert t["data"]["image"].startswith("/data/upload/")
        assert LabelStudio(ls_server.url, ls_token).download(t["data"]["image"])[:4] == b"\x89PNG"
    assert push(rows, PushConfig(ls_server.url, "uploads", ImageRefs("upload"), model_version="v1"),
                progress=False).already_present == 3


def test_wrong_token_is_a_clear_error_without_the_token(ls_server, images):
    secret = "wrong-token-abc123-do-not-print"
    with pytest.raises(AuthError) as info:
        push(rows_for(images, 2), PushConfig(ls_server.url, "never", ImageRefs("upload")), token=secret, progress=False)
    message = str(info.value)
    assert ls_server.url in message and "401" in message and "LABEL_STUDIO_API_KEY" in message
    assert secret not in message and secret not in repr(info.value.__dict__)


def test_push_survives_the_server_being_killed_mid_push(ls_server, ls_token, images):
    """SIGKILL the server while a push is importing; the push stops with a clear error; after a
    restart the same push completes: every row once, one prediction each."""
    rows = rows_for(images, 1000, offset=10000)
    cfg = PushConfig(ls_server.url, "killed", ImageRefs("local-files", str(ls_server.document_root)),
                     model_version="v1", chunk_size=20, resyncs=0)
    push(rows[:1], cfg, progress=False)  # the project exists before the race starts
    client = LabelStudio(ls_server.url, ls_token, retries=1, backoff=0.1)
    outcome: dict = {}

    def run():
        try:
            outcome["report"] = push(rows, cfg, client=client, progress=False)
        except Exception as e:  # noqa: BLE001 -- the test inspects it
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    watcher = LabelStudio(ls_server.url, ls_token)
    pid = watcher.project("killed")["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if watcher.task_count(pid) >= 200:
            break
        time.sleep(0.05)
    ls_server.stop(kill=True)
    thread.join(timeout=120)
    assert isinstance(outcome.get("error"), UnreachableError), outcome
    assert "run the same push again" in str(outcome["error"]) and ls_token not in str(outcome["error"])

    ls_server.start()
    report = push(rows, cfg, progress=False)
    tasks = server_tasks(ls_server, ls_token, "killed")
    keys = [t["data"]["roiscribe_key"] for t in tasks]
    assert len(keys) == len(set(keys)) == 1000
    assert all(len(t["predictions"]) == 1 for t in tasks)
    assert report.tasks_created + report.already_present == 1000 and report.already_present >= 200


def test_unknown_numeric_project_and_foreign_config_are_refused(ls_server, ls_token, images):
    with pytest.raises(LabelStudioError, match="answered 404|no project"):
        push(rows_for(images, 1), PushConfig(ls_server.url, "987654", ImageRefs("upload")), progress=False)
    client = LabelStudio(ls_server.url, ls_token)
    client.create_project("foreign", "<View><Image name='img' value='$image'/><Choices name='c' toName='img'>"
                                     "<Choice value='a'/></Choices></View>")
    with pytest.raises(LabelStudioError, match="labeling config roiscribe did not write"):
        push(rows_for(images, 1), PushConfig(ls_server.url, "foreign", ImageRefs("upload")), progress=False)


def test_config_is_extended_not_replaced(ls_server, ls_token, images):
    first = rows_for(images, 2, offset=20000)
    cfg = PushConfig(ls_server.url, "extend", ImageRefs("upload"), model_version="v1")
    push(first, cfg, progress=False)
    later = rows_for(images, 2, offset=20010)
    later[0]["regions"][0]["label"] = "hexagon"
    push(later, cfg, progress=False)
    spec = spec_from_config(LabelStudio(ls_server.url, ls_token).project("extend")["label_config"])
    assert spec.classes == ["circle", "star", "hexagon"]
    assert isinstance(spec, ConfigSpec)


def test_a_config_of_an_older_layout_is_rewritten_keeping_what_it_offers(ls_server, ls_token, images):
    client = LabelStudio(ls_server.url, ls_token)
    old = ('<View><Image name="image" value="$image"/><RectangleLabels name="region" toName="image">'
           '<Label value="square"/></RectangleLabels><TextArea name="caption" toName="image" perRegion="true" '
           'editable="true" displayMode="region-list"/><Choices name="color" toName="image" perRegion="true">'
           '<Choice value="teal"/></Choices><Relations><Relation value="above"/></Relations></View>')
    client.create_project("old-layout", old)
    push(rows_for(images, 2, offset=20100), PushConfig(ls_server.url, "old-layout", ImageRefs("upload"),
                                                       model_version="v1"), progress=False)
    config = client.project("old-layout")["label_config"]
    spec = spec_from_config(config)
    assert is_current_layout(config) and spec.relation_list
    assert spec.classes[0] == "square" and spec.attributes["color"][0] == "teal" and "above" in spec.predicates
    (task, _) = client.list_tasks(client.project("old-layout")["id"])
    assert any(i.get("from_name") == RELATION_LIST for i in task["predictions"][0]["result"])


def test_push_waits_for_a_restarted_server_and_completes_in_the_same_run(ls_server, ls_token, images):
    """The server dies mid-push and comes back while the push is still retrying its reads: the
    push lists what the server holds and sends only what is missing, in the same run."""
    rows = rows_for(images, 600, offset=30000)
    cfg = PushConfig(ls_server.url, "restarted", ImageRefs("local-files", str(ls_server.document_root)),
                     model_version="v1", chunk_size=20, resyncs=3)
    push(rows[:1], cfg, progress=False)
    client = LabelStudio(ls_server.url, ls_token, retries=8, backoff=0.5)  # waits up to ~2 minutes
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(report=push(rows, cfg, client=client, progress=False)))
    thread.start()
    watcher = LabelStudio(ls_server.url, ls_token)
    pid = watcher.project("restarted")["id"]
    while watcher.task_count(pid) < 100:
        time.sleep(0.05)
    ls_server.stop(kill=True)
    ls_server.start()
    thread.join(timeout=300)
    report = outcome["report"]
    tasks = server_tasks(ls_server, ls_token, "restarted")
    keys = [t["data"]["roiscribe_key"] for t in tasks]
    assert len(keys) == len(set(keys)) == 600
    assert all(len(t["predictions"]) == 1 for t in tasks)
    # a chunk the server committed just before it died is not confirmed to the client, so it is
    # found on the server afterwards instead of being counted as created (never sent twice)
    assert report.already_present == 1 and 599 - cfg.chunk_size <= report.tasks_created <= 599


# Issue 13: tokens, versions, keys, paging, resync, streaming, task files, pull -------------------

SECRET = "tok-SECRET-abc123-do-not-print"


def forms_of(secret: str) -> set[str]:
    """Every way a message could show a token: raw, repr-escaped, JSON-escaped, and without its
    control characters."""
    return {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], secret.strip("\r\n\0 "), SECRET}


def shown(error: BaseException) -> str:
    return f"{error}\n{error!r}\n{vars(error)!r}\n{error.__cause__!r}\n{error.__context__!r}"


@pytest.mark.parametrize("tail", ["\n", "\r", "\0", "\r\n", " "])
def test_a_token_with_cr_lf_or_nul_is_refused_without_showing_it(ls_server, images, tail):
    secret = SECRET + tail
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY contains .*not shown") as info:
        api_token({"LABEL_STUDIO_API_KEY": secret})
    assert not [f for f in forms_of(secret) if f in shown(info.value)]
    # a token handed over directly (not from the environment) is refused the same way
    with pytest.raises(LabelStudioError) as info:
        push(rows_for(images, 1), PushConfig(ls_server.url, "never", ImageRefs("upload")), token=secret,
             progress=False)
    assert not [f for f in forms_of(secret) if f in shown(info.value)]


def test_model_version_from_the_manifest_is_readable_and_content_derived():
    manifest = {"fingerprints": {"model": "f7585f5f0a1b", "detector": "b7e747e5c2d3", "config": "f9d86028e4f5"},
                "versions": {"roiscribe": "0.1.0"},
                "config": {"model": {"spec": "/ckpt/checkpoint-1500"}, "detector": {"spec": "yolo:/w/best.pt"}}}
    version = model_version_from_manifest(manifest)
    assert version == "roiscribe-0.1.0 model-checkpoint-1500@f7585f5f detector-yolo-best@b7e747e5 cfg@f9d86028"
    retrained = json.loads(json.dumps(manifest))
    retrained["fingerprints"]["model"] = "0000aaaa1111"  # same file names, other weights: another version
    assert model_version_from_manifest(retrained) != version
    demo = {**manifest, "config": {"model": {"spec": "demo"}, "detector": {"spec": "demo, really"}}}
    assert "," not in model_version_from_manifest(demo) and " model-demo@" in model_version_from_manifest(demo)
    assert model_version_from_manifest({"config": {}}) is None and model_version_from_manifest(None) is None


def write_output(out, rows, manifest: dict | None = None):
    """A caption output folder holding ``rows`` (and a manifest)."""
    from sinks.parquet import ParquetSink

    with ParquetSink(out, rows_per_part=97) as sink:
        sink.write(rows)
    if manifest is not None:
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


MANIFEST = {"fingerprints": {"model": "f7585f5f0a1b", "detector": "b7e747e5c2d3", "config": "f9d86028e4f5"},
            "versions": {"roiscribe": "0.1.0"}, "config": {"model": {"spec": "demo"}, "detector": {"spec": "demo"}}}


@pytest.fixture(scope="module")
def capped_server(ls_server, tmp_path_factory):
    """A second server whose task listing serves at most 100 tasks a page, whatever is asked;
    started on a copy of the first server's database (no second round of migrations)."""
    from sinks.label_studio.server import Server

    root = tmp_path_factory.mktemp("label_studio_capped")
    (root / "docs" / "imgs").mkdir(parents=True)
    ls_server.copy_database(root / "data")
    server = Server(root / "data", root / "docs", extra_env={"TASK_API_PAGE_SIZE_MAX": "100"}).start()
    yield server
    server.stop()


def test_a_server_that_caps_pages_gets_no_duplicates_and_the_pull_sees_every_task(capped_server, tmp_path,
                                                                                  monkeypatch):
    from PIL import Image

    from sinks.label_studio.server import TOKEN

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    image = capped_server.document_root / "imgs" / "a.png"
    Image.new("RGB", (200, 100), (10, 90, 160)).save(image)
    rows = [make_row(k, str(image)) for k in range(230)]
    out = write_output(tmp_path / "out", rows, MANIFEST)
    cfg = PushConfig(capped_server.url, "capped", ImageRefs("local-files", str(capped_server.document_root)),
                     chunk_size=500)
    first = push(out, cfg, progress=False)
    assert first.model_version == "roiscribe-0.1.0 model-demo@f7585f5f detector-demo@b7e747e5 cfg@f9d86028"
    assert first.tasks_created == 230
    again = push(out, cfg, progress=False)
    assert (again.tasks_created, again.predictions_created, again.already_present) == (0, 0, 230)
    client = LabelStudio(capped_server.url, TOKEN)
    pid = client.project("capped")["id"]
    pages = list(client.task_pages(pid, page_size=500))
    assert [len(p) for p in pages] == [100, 100, 30]  # the server caps what is asked
    tasks = client.list_tasks(pid)
    assert len(tasks) == client.task_count(pid) == 230
    assert len({t["data"]["roiscribe_key"] for t in tasks}) == 230
    import hashlib

    assert {t["data"]["roiscribe_sha256"] for t in tasks} == {hashlib.sha256(image.read_bytes()).hexdigest()}
    pulled = pull_tasks(client, "capped", tmp_path / "pull", str(capped_server.document_root), progress=False)
    assert sorted(i.key for i in pulled.items) == sorted(f"task:{t['id']}" for t in tasks)


def test_push_streams_the_output_by_batch(ls_server, ls_token, images, tmp_path, monkeypatch):
    """The push never holds the whole output: it reads Parquet batches of at most chunk_size rows."""
    import sinks.parquet
    from jobs.cli import main
    from sinks.label_studio.push import OutputRows

    rows = rows_for(images, 300, offset=40000)
    rows[5] = {**rows[5], "status": "error", "error": "decode: broken", "regions": [], "relations": []}
    out = write_output(tmp_path / "out", rows, MANIFEST)
    seen: list[int] = []
    batches = OutputRows.batches

    def recording(self, columns=None):
        for batch in batches(self, columns):
            seen.append(len(batch))
            yield batch

    monkeypatch.setattr(OutputRows, "batches", recording)
    monkeypatch.setattr(sinks.parquet, "read_rows", lambda *a, **k: pytest.fail("the whole output was read"))
    rc = main(["push", str(out), "--url", ls_server.url, "--project", "streamed", "--document-root",
               str(ls_server.document_root), "--chunk-size", "50"])
    assert rc == 0
    assert seen and max(seen) <= 50 and sum(seen) == 2 * 300  # the light pass, then the push
    tasks = server_tasks(ls_server, ls_token, "streamed")
    assert len(tasks) == 299 and {t["data"]["roiscribe_key"] for t in tasks} == {r["image_id"] for r in rows} - {rows[5]["image_id"]}


def test_a_key_whose_image_changed_is_warned_and_a_key_held_twice_is_reported(ls_server, ls_token, images, tmp_path):
    from PIL import Image

    other = ls_server.document_root / "imgs" / "other.png"
    Image.new("RGB", (200, 100), (250, 0, 0)).save(other)
    cfg = PushConfig(ls_server.url, "changed", ImageRefs("local-files", str(ls_server.document_root)), model_version="v1")
    rows = rows_for(images, 3, offset=50000)
    assert push(rows, cfg, progress=False).tasks_created == 3
    moved = [dict(rows[0], uri=str(other)), rows[1], rows[2]]
    report = push(moved, PushConfig(**{**vars(cfg), "model_version": "v2"}), progress=False)
    task_id = next(t["id"] for t in server_tasks(ls_server, ls_token, "changed")
                   if t["data"]["roiscribe_key"] == rows[0]["image_id"])
    assert report.image_changed == [(rows[0]["image_id"], task_id)] and report.predictions_created == 3
    assert "1 keys whose task shows another image" in report.summary() and not report.rejected

    # two tasks hold one key (made outside roiscribe): reported, not created a third time
    client = LabelStudio(ls_server.url, ls_token)
    pid = client.project("changed")["id"]
    twice = {"image": "/data/local-files/?d=imgs/0.png", "roiscribe_key": "held-twice"}
    ids = client.import_tasks(pid, [{"data": twice}, {"data": twice}])
    row = dict(make_row(1, images[0]), image_id="held-twice")
    report = push([row], cfg, progress=False)
    assert report.duplicate_keys == {"held-twice": sorted(ids)}
    assert (report.tasks_created, report.predictions_created) == (0, 1)
    assert sum(t["data"]["roiscribe_key"] == "held-twice" for t in server_tasks(ls_server, ls_token, "changed")) == 2


class DelayedImport(BaseHTTPRequestHandler):
    """A proxy in front of the server: the first task import is cut off from the client (the
    connection drops without an answer) and reaches the server ``delay`` seconds later, the way a
    timed-out import still commits. Everything else goes through."""

    target = ""
    delay = 1.5
    held = 0
    late: threading.Thread | None = None  # delivers the held import

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        request = dict(method=self.command, url=self.target + self.path, headers=headers, content=body, timeout=120)
        if self.command == "POST" and self.path.split("?")[0].endswith("/import") and type(self).held == 0:
            type(self).held += 1
            late = threading.Thread(target=lambda: (time.sleep(self.delay), httpx.request(**request)))
            type(self).late = late
            late.start()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        r = httpx.request(**request)
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PATCH = _forward

    def log_message(self, *args):
        pass


def test_a_resync_waits_for_the_lost_import_to_land_and_sends_nothing_twice(ls_server, ls_token, images):
    rows = rows_for(images, 120, offset=60000)
    cfg = PushConfig(ls_server.url, "lost-import", ImageRefs("local-files", str(ls_server.document_root)),
                     model_version="v1", chunk_size=40, settle_s=2.5)
    push(rows[:1], cfg, progress=False)  # the project and its storage exist before the proxy cuts
    DelayedImport.target, DelayedImport.held = ls_server.url, 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), DelayedImport)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = LabelStudio(f"http://127.0.0.1:{proxy.server_address[1]}", ls_token, retries=2, backoff=0.1)
        report = push(rows, cfg, client=client, progress=False)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert DelayedImport.held == 1
    DelayedImport.late.join(timeout=120)  # the held import has landed: what the server holds now is final
    tasks = server_tasks(ls_server, ls_token, "lost-import")
    keys = [t["data"]["roiscribe_key"] for t in tasks]
    assert len(keys) == len(set(keys)) == 120, "a chunk was sent again while the lost import was committing"
    assert all(len(t["predictions"]) == 1 for t in tasks)
    assert report.tasks_created == 120 - 1 - 40  # the lost chunk landed by itself; it is not counted as sent


def test_task_files_hold_valid_tasks_that_a_storage_sync_imports(ls_server, ls_token, images, tmp_path):
    rows = rows_for(images, 10, offset=70000)
    rows[2] = {**rows[2], "status": "error", "error": "decode: broken", "regions": [], "relations": []}
    rows[4]["regions"][0]["box"] = [190.0, 10.0, 230.0, 40.0]  # outside the image: rejected
    out = write_output(tmp_path / "out", rows, MANIFEST)
    folder = ls_server.document_root / "taskfiles"
    report = write_task_files(out, folder, ImageRefs("local-files", str(ls_server.document_root)), chunk_size=3)
    assert [e.key for e in report.rejected] == [rows[4]["image_id"]] and report.error_rows == 1
    assert [p.rsplit("/", 1)[-1] for p in report.files] == ["tasks-000001.json", "tasks-000002.json", "tasks-000003.json"]
    tasks = [t for p in report.files for t in json.loads(open(p).read())]
    assert [len(json.loads(open(p).read())) for p in report.files] == [3, 3, 2]
    expected_rows = [r for i, r in enumerate(rows) if i not in (2, 4)]
    assert [t["data"]["roiscribe_key"] for t in tasks] == [r["image_id"] for r in expected_rows]
    for task, row in zip(tasks, expected_rows):
        assert task["data"]["image"].startswith("/data/local-files/?d=imgs/") and len(task["data"]["roiscribe_sha256"]) == 64
        (pred,) = task["predictions"]
        assert pred["model_version"] == report.model_version == model_version_from_manifest(MANIFEST)
        assert_same({"predictions": [pred]}, row, pred["model_version"])
    config = (folder / "labeling-config.xml").read_text()
    with pytest.raises(LabelStudioError, match="already holds task files"):
        write_task_files(out, folder, ImageRefs("local-files", str(ls_server.document_root)))

    # a local storage of the folder (import method "Tasks") imports exactly these tasks
    client = LabelStudio(ls_server.url, ls_token)
    pid = client.create_project("from-files", config)["id"]
    headers = {"Authorization": f"Token {ls_token}"}
    r = httpx.post(f"{ls_server.url}/api/storages/localfiles", headers=headers,
                   json={"project": pid, "path": str(folder), "regex_filter": r".*\.json", "use_blob_urls": False})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{ls_server.url}/api/storages/localfiles/{r.json()['id']}/sync", headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    imported = client.list_tasks(pid)
    assert sorted(t["data"]["roiscribe_key"] for t in imported) == sorted(r["image_id"] for r in expected_rows)
    assert all(len(t["predictions"]) == 1 for t in imported)


def annotate(server, token: str, task_id: int, box: tuple[float, float, float, float], label: str = "circle") -> None:
    x, y, w, h = box
    result = {"id": f"a{task_id}", "from_name": "region", "to_name": "image", "type": "rectanglelabels",
              "original_width": 200, "original_height": 100,
              "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}
    r = httpx.post(f"{server.url}/api/tasks/{task_id}/annotations", headers={"Authorization": f"Token {token}"},
                   json={"result": [result]})
    assert r.status_code == 201, r.text


def test_pulled_boxes_belong_to_their_own_task(ls_server, ls_token, images, tmp_path):
    """Numeric keys that equal other tasks' ids, and two tasks showing one image: each pulled
    item gets exactly its task's boxes."""
    from detectors.given import GivenBoxes

    client = LabelStudio(ls_server.url, ls_token)
    pid = client.create_project("pull-keys", labeling_config(spec_from_rows([make_row(0, "x")])))["id"]
    same = "/data/local-files/?d=imgs/0.png"
    a, b, c = client.import_tasks(pid, [{"data": {"image": same}}, {"data": {"image": same}},
                                        {"data": {"image": "/data/local-files/?d=imgs/1.png"}}])
    headers = {"Authorization": f"Token {ls_token}"}
    for task, key in ((a, str(b)), (b, str(a)), (c, str(c))):  # keys that look like the other tasks' ids
        r = httpx.patch(f"{ls_server.url}/api/tasks/{task}", headers=headers,
                        json={"data": {"image": same if task != c else "/data/local-files/?d=imgs/1.png",
                                       "roiscribe_key": key}})
        assert r.status_code == 200, r.text
    annotate(ls_server, ls_token, a, (10, 10, 20, 20))
    annotate(ls_server, ls_token, b, (50, 50, 30, 30))
    pulled = pull_tasks(client, "pull-keys", tmp_path, str(ls_server.document_root), progress=False)
    given = GivenBoxes.from_label_studio(pulled.given_spec.split(":", 2)[2])
    boxes = {item.key: given.lookup(item.key, item.uri).boxes.tolist() for item in pulled.items}
    assert boxes == {f"task:{a}": [[20.0, 10.0, 60.0, 30.0]], f"task:{b}": [[100.0, 50.0, 160.0, 80.0]],
                     f"task:{c}": []}


def test_one_bad_task_is_an_item_with_its_reason_and_the_pull_goes_on(ls_server, ls_token, images, tmp_path):
    client = LabelStudio(ls_server.url, ls_token)
    pid = client.create_project("pull-bad", labeling_config(spec_from_rows([make_row(0, "x")])))["id"]
    good, missing, outside, foreign = client.import_tasks(pid, [
        {"data": {"image": "/data/local-files/?d=imgs/0.png"}},
        {"data": {"image": "/data/upload/999/missing.png"}},
        {"data": {"image": "/data/local-files/?d=imgs/../../../outside.png"}},
        {"data": {"image": "https://elsewhere.example/x.png"}}])
    pulled = pull_tasks(client, "pull-bad", tmp_path, str(ls_server.document_root), progress=False)
    by_key = {i.key: i for i in pulled.items}
    assert by_key[f"task:{good}"].error is None and by_key[f"task:{good}"].uri == images[0]
    # Label Studio 1.23 answers 500 (not 404) for an upload it does not hold
    assert "answered 500 to downloading /data/upload/999/missing.png" in by_key[f"task:{missing}"].error
    assert "outside the document root" in by_key[f"task:{outside}"].error
    assert "not on" in by_key[f"task:{foreign}"].error
    assert len(json.loads((tmp_path / "label-studio-tasks.json").read_text())) == 4
