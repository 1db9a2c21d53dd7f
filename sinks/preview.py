"""Previews of a caption output: each image with its boxes and numbered labels drawn, and a static
HTML page to browse them (no server, no scripts: open ``index.html`` in a browser).

Region ``k`` of a row is shown as number k + 1 everywhere (on the image, in the answer list, in the
relation lines), as in Label Studio. Each image is drawn at the size the page shows it (its longest
side ``DISPLAY_PX``, small images scaled up), so labels are drawn at a readable size and kept
inside the image. Each answer shows its confidence (``pipeline.review.confidence``); a region
whose box label disagrees with the model's answer about the same property is flagged.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from .label_studio.labeling import label_color
from .parquet import read_rows

DISPLAY_PX = 640  # the longest side of a drawn image: the card's image area
MAX_UPSCALE = 4.0  # a tiny image is scaled up at most this much
CARD_CHROME_PX = 2 * 10 + 2 * 1  # a card's padding and border around the image area
CAPTION_ANSWERS = ("caption", "caption_detailed")


def draw_row(row: dict, colors: dict[str, str] | None = None, display_px: int = DISPLAY_PX):
    """The row's image scaled so that its longest side is ``display_px`` (at most ``MAX_UPSCALE``
    times up), with its regions drawn and numbered; a PIL image, or None if the image is
    unreadable. ``colors``: box label -> colour (default: by first appearance in the row)."""
    from PIL import Image, ImageDraw, ImageOps

    try:
        with Image.open(row["uri"]) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError):
        return None
    scale = min(display_px / max(image.size), MAX_UPSCALE)
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    colors = colors if colors is not None else label_colors([row])
    draw = ImageDraw.Draw(image)
    font = _font(max(12, round(max(image.size) / 45)))
    for region in row["regions"]:
        colour = colors.get(region["label"] or "", "#888888")
        x1, y1, x2, y2 = (v * scale for v in region["box"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(2, round(max(image.size) / 220)))
        _tag(draw, font, f"{region['region_id'] + 1} {region['label'] or ''}".strip(), (x1, y1), colour, image.size)
    return image


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def tag_position(tag_size: tuple[float, float], corner: tuple[float, float],
                 image_size: tuple[int, int]) -> tuple[float, float]:
    """The top-left of a label of ``tag_size`` for a box whose top-left is ``corner``: above the
    box where there is room, else just inside it; shifted left where it would pass the right edge,
    so that the whole label lies inside the image (when it fits at all)."""
    (tw, th), (width, height) = tag_size, image_size
    x = max(0.0, min(corner[0], width - tw))
    y = corner[1] - th if corner[1] - th >= 0 else max(0.0, min(corner[1], height - th))
    return x, y


def _tag(draw, font, text: str, corner: tuple[float, float], colour: str, size: tuple[int, int]) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 6, bottom - top + 4
    x, y = tag_position((tw, th), corner, size)
    draw.rectangle([x, y, x + tw, y + th], fill=colour)
    draw.text((x + 3 - left, y + 2 - top), text, fill=_ink(colour), font=font)


def _ink(colour: str) -> str:
    """Black or white text, whichever reads on ``colour``."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


def label_colors(rows: list[dict]) -> dict[str, str]:
    """Box label -> colour, by first appearance (Label Studio's labeling config orders its labels
    the same way, so a class has the same colour in both)."""
    names: dict[str, None] = {}
    for row in rows:
        for region in row.get("regions") or []:
            names.setdefault(region.get("label") or "", None)
    return {name: label_color(i) for i, name in enumerate(names)}


def render_previews(out: str | Path, preview_dir: str | Path, limit: int = 100) -> Path:
    preview_dir = Path(preview_dir)
    preview_dir.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out).slice(0, limit).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    colors, compared = label_colors(ok), compared_attributes(ok)
    cards = []
    for n, row in enumerate(rows):
        image = draw_row(row, colors) if row["status"] == "ok" else None
        name = f"{n:05d}.jpg"
        if image is not None:
            image.save(preview_dir / name, quality=90)
        cards.append(_card(row, name if image is not None else None, colors, compared))
    page = preview_dir / "index.html"
    page.write_text(_PAGE.format(title=html.escape(str(out)), count=len(rows), cards="\n".join(cards),
                                 display=DISPLAY_PX, card=DISPLAY_PX + CARD_CHROME_PX), encoding="utf-8")
    return page


# The page -----------------------------------------------------------------------------------------

def _conf(mean_logprob, min_logprob) -> str:
    from pipeline.review import confidence

    c = confidence(mean_logprob, min_logprob)
    return f" <span class='conf' title='confidence'>{c:.2f}</span>" if c is not None else ""


def _card(row: dict, image_name: str | None, colors: dict[str, str], compared: list[str]) -> str:
    e = html.escape
    head = f"<h3>{e(row['image_id'])} <span class='{e(row['status'])}'>{e(row['status'])}</span></h3>"
    if row["status"] != "ok":
        return f"<div class='card'>{head}<p class='error'>{e(row['error'] or '')}</p></div>"
    labels = {r["region_id"]: r["label"] or "" for r in row["regions"]}
    items = [_region_item(region, colors, compared) for region in row["regions"]]
    items += [_relation_item(rel, labels) for rel in _by_confidence(row["relations"])]
    img = f"<img src='{e(image_name)}' alt='{e(row['image_id'])}'>" if image_name else ""
    return (f"<div class='card' data-image-id='{e(row['image_id'])}'>{head}<div class='frame'>{img}</div>"
            f"<ul>{''.join(items)}</ul></div>")


def compared_attributes(rows: list[dict]) -> list[str]:
    """The attributes compared with the box label over these rows (``pipeline.review``; the
    Label Studio push applies the same rule to the rows it pushes)."""
    from pipeline.review import label_attributes

    classes = {r["label"]: None for row in rows for r in row["regions"] if r["label"]}
    names = {a["name"]: None for row in rows for r in row["regions"] for a in r["answers"]
             if a["name"] not in CAPTION_ANSWERS}
    return label_attributes(classes, names)


def _region_item(region: dict, colors: dict[str, str], compared: list[str]) -> str:
    from pipeline.review import label_disagreements

    e = html.escape
    label = region["label"] or ""
    attrs = " · ".join(f"<span class='answer'>{e(a['name'])}: {e(a['value'] or '?')}"
                       f"{_conf(a['mean_logprob'], a['min_logprob'])}</span>"
                       for a in region["answers"] if a["name"] not in CAPTION_ANSWERS)
    said = {a["name"]: a["value"] for a in region["answers"]}
    flags = "".join(f" <span class='flag'>⚠ label ≠ {e(a)} ({e(said[a])})</span>"
                    for a in label_disagreements(label, said, compared))
    score = (f" <span class='score' title='detector score'>box {region['score']:.2f}</span>"
             if region["score"] is not None else "")
    caption = (f"<span class='caption'>{e(region['caption'])}</span>"
               f"{_conf(region['caption_mean_logprob'], region['caption_min_logprob'])}") if region["caption"] else ""
    swatch = f"<b class='num' style='background:{colors.get(label, '#888888')}'>{region['region_id'] + 1}</b>"
    name = f" {e(label)}" if label else ""
    return (f"<li class='region' data-region='{region['region_id'] + 1}'>{swatch}{name}{score}{flags} — "
            f"{caption}<br><small>{attrs}</small></li>")


def _by_confidence(relations: list[dict]) -> list[dict]:
    from pipeline.review import confidence, top_relations

    return top_relations(relations, [confidence(r["mean_logprob"], r["min_logprob"]) for r in relations], None)


def _relation_item(rel: dict, labels: dict[int, str]) -> str:
    """A relation with the numbers shown on the image: "1 circle left of 3 star"; an answer that
    named no predicate shows its text, its region words renumbered the same way."""
    e = html.escape
    s, o = rel["subject"], rel["object"]
    def named(k: int) -> str:
        return f"<b>{k + 1}</b>" + (f" {e(labels[k])}" if labels.get(k) else "")

    pair = f"{named(s)} <i>{e(rel['predicate'] or '?')}</i> {named(o)}"
    raw = ""
    if not rel["predicate"]:  # unparsed: region1/region2 are the question's subject and object
        shown = re.sub(r"region\s?([12])\b", lambda m: str((s if m.group(1) == "1" else o) + 1), rel["raw"] or "")
        raw = f" <small>answer: “{e(shown)}”</small>"
    return f"<li class='rel'>{pair}{_conf(rel['mean_logprob'], rel['min_logprob'])}{raw}</li>"


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>roiscribe: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.card {{ display: inline-block; vertical-align: top; width: {card}px; max-width: 100%; box-sizing: border-box;
         margin: 8px; padding: 10px; background: #fff; border: 1px solid #ddd; }}
.frame {{ width: 100%; max-width: {display}px; margin: 0 auto; text-align: center; }}
.frame img {{ max-width: 100%; max-height: {display}px; height: auto; }}
.ok {{ color: #2a2; }} .error {{ color: #c22; }} .rel {{ color: #333; }}
.num {{ display: inline-block; min-width: 1.4em; text-align: center; color: #fff; border-radius: 3px;
        text-shadow: 0 0 2px #000; }}
.conf, .score {{ color: #777; font-size: 11px; }} .flag {{ color: #b35900; font-weight: bold; }}
h3 {{ font-size: 14px; margin: 0 0 6px; overflow-wrap: anywhere; }} li {{ font-size: 13px; margin: 2px 0; }}
</style></head>
<body><h1>roiscribe: {title}</h1><p>{count} images</p>
{cards}
</body></html>
"""
