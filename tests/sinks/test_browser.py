"""What annotators see, checked in a real browser: headless Chromium (the system's, driven by
Playwright) against the test Label Studio server, with the six shipped samples captioned by the
demo models and pushed by `roiscribe push --images upload`, and against the preview page.

Screenshots go to ``test-artifacts/screenshots/`` (README, "Label Studio"). Without Playwright or
Chromium these tests are skipped, unless ``ROISCRIBE_BROWSER_TESTS=required`` (set by
``scripts/test.sh``, so CI never skips them silently)."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from sinks.label_studio import LabelStudio
from sinks.label_studio.labeling import label_color
from sinks.label_studio.server import PASSWORD, TOKEN, USER

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "demo" / "samples"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("ROISCRIBE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# a closed network: without the background-networking flags Chromium's own connections are refused
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
MAX_RELATIONS = 5  # the push's default
TIMEOUT_MS = 60_000
# every key Label Studio 1.23 hands out automatically, less the label hotkeys 1..5 of the samples
STRAY_KEYS = "67890qwetasdfgzxcvbyiopjklnm"


def _playwright():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing, sync_playwright = "the playwright package is not installed (pip install -e '.[test]')", None
    if missing is None and not Path(CHROMIUM).is_file():
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ROISCRIBE_CHROMIUM)"
    if missing:
        if os.environ.get("ROISCRIBE_BROWSER_TESTS") == "required":
            pytest.fail(f"browser tests are required here but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The six shipped samples captioned by the shipped models (in process), and their rows."""
    from jobs.cli import main
    from sinks.parquet import read_rows

    out = tmp_path_factory.mktemp("samples") / "out"
    assert main(["caption", str(SAMPLES), "--out", str(out), "--no-ray"]) == 0
    rows = read_rows(out).to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    return out, rows


@pytest.fixture(scope="module")
def project(ls_server, samples, browser):
    """The samples pushed the way a user pushes them: `roiscribe push OUT --images upload`."""
    from jobs.cli import main

    out, rows = samples
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABEL_STUDIO_API_KEY", TOKEN)
        assert main(["push", str(out), "--url", ls_server.url, "--project", "samples", "--images", "upload"]) == 0
    client = LabelStudio(ls_server.url, TOKEN)
    info = client.project("samples")
    tasks = {t["data"]["roiscribe_key"]: t for t in client.list_tasks(info["id"])}
    return {"id": info["id"], "version": info["model_version"], "tasks": tasks,
            "rows": {r["image_id"]: r for r in rows}}


@pytest.fixture(scope="module")
def page(browser, ls_server, project):
    """A logged-in page showing the project's data manager."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{ls_server.url}/user/login")
    page.fill("input[name=email]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)
    page.goto(f"{ls_server.url}/projects/{project['id']}/data")
    yield page
    context.close()


# What the rows say, computed here without the push's code ------------------------------------------

def answer(region: dict, name: str) -> str | None:
    return next((a["value"] for a in region["answers"] if a["name"] == name), None)


def disagreeing(row: dict) -> list[int]:
    """Regions whose box label (a shape, for the demo detector) is not the model's shape answer."""
    return [r["region_id"] for r in row["regions"] if answer(r, "shape") and answer(r, "shape") != r["label"]]


def expected_relations(row: dict) -> list[str]:
    """The most confident relations, in words with the numbers Label Studio shows (region k: k + 1)."""
    labels = {r["region_id"]: r["label"] for r in row["regions"]}
    parsed = [r for r in row["relations"] if r["predicate"]]
    ranked = sorted(parsed, key=lambda r: -math.exp(r["min_logprob"]))[:MAX_RELATIONS]
    return [f"{r['subject'] + 1} {labels[r['subject']]} {r['predicate']} {r['object'] + 1} {labels[r['object']]} "
            f"({math.exp(r['min_logprob']):.2f})" for r in ranked]


# Label Studio ---------------------------------------------------------------------------------------

def open_task(page, project: dict, key: str) -> dict:
    """Opens the task of the sample ``key`` from the data manager's table; returns its row."""
    task_id = project["tasks"][key]["id"]
    rows = page.locator("[data-testid=table-row]")
    rows.first.wait_for()
    ids = [int(i) for i in re.findall(r"task=(\d+)", page.url)]
    if ids[-1:] != [task_id]:
        order = sorted(t["id"] for t in project["tasks"].values())  # the table's default order
        rows.nth(order.index(task_id)).click()
        page.wait_for_url(re.compile(rf"task={task_id}\b"))
    row = project["rows"][key]
    from playwright.sync_api import expect

    expect(page.locator(".lsf-outliner-item")).to_have_count(len(row["regions"]))
    expect(page.locator("[name^='relation_list:']")).to_have_text(expected_relations(row))
    return row


def expected_fields(row: dict, k: int) -> dict[str, str]:
    """The side column's titled fields for region k: its answers, and the flag when it disagrees."""
    region = row["regions"][k]
    fields = {name.capitalize(): answer(region, name) for name in ("color", "shape", "material", "action")}
    return fields | {"Flags": "label ≠ shape" if k in disagreeing(row) else ""}


def select_region(page, k: int, expected: dict[str, str]) -> None:
    """Selects region k in the region list (unless it is selected: a second click would unselect
    it) and checks the side column's titled fields (title -> value shown) against ``expected``."""
    from playwright.sync_api import expect

    fields, shown = page.locator("#roiscribe-region"), page.locator(".lsf-detailed-region__index_value").first
    if not (fields.is_visible() and shown.is_visible() and shown.inner_text() == str(k + 1)):
        page.locator(".lsf-outliner-item").nth(k).click()
    expect(fields).to_be_visible()
    expect(shown).to_have_text(str(k + 1))
    expect(fields.locator("h4")).to_have_text(list(expected))
    expect(fields.locator(".lsf-choices")).to_have_text(list(expected.values()))


def tab(page, name: str):
    """A tab of Label Studio's side panels ("Regions", "Relations", "Info", ...)."""
    return page.locator(".lsf-panel-tabs__tab", has_text=re.compile(rf"^\s*{name}\s*$")).first


def test_every_sample_shows_its_regions_flags_and_most_confident_relations(page, project):
    """The acceptance check: each of the six samples shows its boxes with their labels and
    captions, titled attribute fields, a flag on exactly the regions whose box label and shape
    answer disagree, and its five most confident relations with their predicates and numbers (also
    as Label Studio relations)."""
    from playwright.sync_api import expect

    flagged_total = 0
    for key in sorted(project["rows"]):
        row = open_task(page, project, key)
        outliner = page.locator(".lsf-outliner-item")
        expect(outliner.locator(".lsf-outliner-item__title")).to_have_text([r["label"] for r in row["regions"]])
        captions = page.locator("[data-testid=textarea-region-input]")
        for k, region in enumerate(row["regions"]):
            expect(captions.nth(k)).to_have_value(region["caption"])
        flagged = disagreeing(row)
        flagged_total += len(flagged)
        for k in range(len(row["regions"])):
            select_region(page, k, expected_fields(row, k))
        tab(page, "Relations").click()  # Label Studio's own relation list: as many as pushed
        n = min(MAX_RELATIONS, sum(1 for r in row["relations"] if r["predicate"]))
        expect(page.locator(".lsf-relations__section-head")).to_have_text(f"Relations ({n})")
        tab(page, "Regions").click()
        page.screenshot(path=str(SCREENSHOTS / f"label-studio-{Path(key).stem}.png"))
    assert flagged_total == 4  # the count on the shipped samples: 4 of 22 regions


def test_selected_region_fields_are_titled_beside_the_image_with_no_stray_hotkeys(page, project, ls_server):
    from playwright.sync_api import expect

    key = str(SAMPLES / "scene3.png")
    row = open_task(page, project, key)
    region, fields = row["regions"][2], expected_fields(row, 2)  # labelled hexagon, answered circle
    assert fields["Flags"] == "label ≠ shape" and fields["Shape"] == "circle" and region["label"] == "hexagon"
    select_region(page, 2, fields)
    # beside the image, inside the window: no scrolling to reach them
    image = page.locator("#roiscribe-image").bounding_box()
    for header in page.locator("#roiscribe-region h4").all():
        box = header.bounding_box()
        assert box["x"] >= image["x"] + image["width"] and box["y"] + box["height"] <= VIEWPORT["height"]
    # a colour per label, as the config says, and the only hotkeys are the labels' 1..5
    classes = list(dict.fromkeys(r["label"] for r in project["rows"].values() for r in r["regions"]))
    labels = page.locator(".lsf-labels .lsf-label")
    expect(labels.locator(".lsf-label__text")).to_have_text(classes)
    styles = [labels.nth(i).get_attribute("style") for i in range(len(classes))]
    shown = [re.search(r"--color:\s*(#[0-9a-f]{6})", s).group(1) for s in styles]
    assert shown == [label_color(i) for i in range(len(classes))] and len(set(shown)) == len(classes)
    expect(labels.locator(".lsf-label__hotkey")).to_have_text([str(i + 1) for i in range(len(classes))])
    expect(page.locator("#roiscribe-side .lsf-hint")).to_have_count(0)
    for k in STRAY_KEYS:  # with the region selected, as an annotator's stray key press would find it
        page.keyboard.press(k)
    page.wait_for_timeout(300)  # a key's effect would show within a frame or two
    select_region(page, 2, fields)
    expect(page.locator(".lsf-outliner-item__title").nth(2)).to_have_text(region["label"])
    # the prediction's tab shows the model version in full on hover
    page.locator(".lsf-annotation-button", has_text="roiscrib").first.hover()
    expect(page.locator(".lsf-annotation-button__tooltipContainerTitle")).to_have_text(project["version"])
    assert re.fullmatch(r"roiscribe-\S+ model-demo@[0-9a-f]{8} detector-demo@[0-9a-f]{8} cfg@[0-9a-f]{8}",
                        project["version"])
    page.mouse.move(10, 890)
    select_region(page, 2, fields)
    page.screenshot(path=str(SCREENSHOTS / "label-studio-selected-region.png"))


def test_a_caption_edited_in_place_is_submitted_and_read_back(page, project, ls_server):
    from playwright.sync_api import expect

    key = str(SAMPLES / "scene3.png")
    row = open_task(page, project, key)
    task_id = project["tasks"][key]["id"]
    edited = "a large black metal circle, labelled hexagon by mistake"
    caption = page.locator("[data-testid=textarea-region-input]").nth(2)
    caption.fill(edited)
    caption.press("Enter")
    expect(caption).to_have_value(edited)
    page.screenshot(path=str(SCREENSHOTS / "label-studio-caption-edited.png"))
    page.get_by_role("button", name="Submit").click()

    headers = {"Authorization": f"Token {TOKEN}"}
    annotations = []
    for _ in range(100):  # the browser's POST lands shortly after the click
        annotations = httpx.get(f"{ls_server.url}/api/tasks/{task_id}/annotations", headers=headers).json()
        if annotations:
            break
        page.wait_for_timeout(100)
    (annotation,) = annotations
    result = annotation["result"]
    texts = {i["id"]: i["value"]["text"][0] for i in result if i.get("from_name") == "caption"}
    assert texts == {f"r{r['region_id']}": (edited if r["region_id"] == 2 else r["caption"]) for r in row["regions"]}
    boxes = [i for i in result if i["type"] == "rectanglelabels"]
    assert [i["value"]["rectanglelabels"][0] for i in boxes] == [r["label"] for r in row["regions"]]
    flags = {i["id"]: i["value"]["choices"] for i in result if i.get("from_name") == "flags"}
    assert flags == {f"r{k}": ["label ≠ shape"] for k in disagreeing(row)}
    assert sum(i["type"] == "relation" for i in result) == min(MAX_RELATIONS, len(row["relations"]))


# The preview page ----------------------------------------------------------------------------------

def test_the_preview_page_scales_images_to_the_card_and_numbers_relations_as_shown(browser, samples, tmp_path):
    from playwright.sync_api import expect

    from sinks.preview import DISPLAY_PX, render_previews

    out, rows = samples
    page_path = render_previews(out, tmp_path / "preview")
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(page_path.as_uri())
    cards = page.locator(".card")
    expect(cards).to_have_count(6)
    for i, row in enumerate(rows):
        card = cards.nth(i)
        img = card.locator("img")
        size = img.evaluate("i => [i.naturalWidth, i.naturalHeight, i.width, i.height, i.complete]")
        assert size[4] and max(size[:2]) == DISPLAY_PX and size[2:4] == size[:2]  # drawn at the size shown
        frame = card.locator(".frame").bounding_box()
        assert size[2] <= frame["width"] + 0.5
        regions = card.locator("li.region")
        expect(regions).to_have_count(len(row["regions"]))
        for k, region in enumerate(row["regions"]):
            text = regions.nth(k).inner_text()
            assert text.startswith(f"{k + 1} {region['label']} box {region['score']:.2f}")
            assert len(re.findall(r"\b(color|shape|material|action): \w+ [01]\.\d\d\b", text)) == 4, text
            assert ("⚠ label ≠ shape" in text) == (k in disagreeing(row))
        # relation lines name regions by the numbers on the image, with the predicate and a confidence
        labels = {r["region_id"]: r["label"] for r in row["regions"]}
        lines = card.locator("li.rel").all_inner_texts()
        shown = sorted(re.sub(r" [01]\.\d\d$", "", line) for line in lines if "answer:" not in line)
        assert shown == sorted(f"{r['subject'] + 1} {labels[r['subject']]} {r['predicate']} {r['object'] + 1} "
                               f"{labels[r['object']]}" for r in row["relations"] if r["predicate"])
        assert len(lines) == len(row["relations"]) and not [line for line in lines if "region1" in line]
    page.screenshot(path=str(SCREENSHOTS / "preview.png"))
    busiest = max(range(len(rows)), key=lambda i: len(rows[i]["relations"]))
    cards.nth(busiest).screenshot(path=str(SCREENSHOTS / "preview-busiest-card.png"))
    context.close()
