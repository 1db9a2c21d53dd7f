"""Previews of a caption output: each image with its boxes, labels and captions drawn, and a
static HTML page to browse them (no server, no scripts: open ``index.html`` in a browser)."""

from __future__ import annotations

import html
from pathlib import Path

from .parquet import read_rows

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def draw_row(row: dict, max_side: int = 640):
    """The row's image with its regions drawn (a PIL image), or None if the image is unreadable."""
    from PIL import Image, ImageDraw, ImageOps

    try:
        with Image.open(row["uri"]) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError):
        return None
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)))
    draw = ImageDraw.Draw(image)
    for region in row["regions"]:
        colour = PALETTE[region["region_id"] % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in region["box"])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{region['region_id'] + 1} {region['label']}".strip()
        tw = draw.textlength(text)
        draw.rectangle([x1, max(y1 - 12, 0), x1 + tw + 4, max(y1 - 12, 0) + 12], fill=colour)
        draw.text((x1 + 2, max(y1 - 12, 0)), text, fill=(255, 255, 255))
    return image


def render_previews(out: str | Path, preview_dir: str | Path, limit: int = 100) -> Path:
    preview_dir = Path(preview_dir)
    preview_dir.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out).slice(0, limit).to_pylist()
    cards = []
    for n, row in enumerate(rows):
        image = draw_row(row) if row["status"] == "ok" else None
        name = f"{n:05d}.jpg"
        if image is not None:
            image.save(preview_dir / name, quality=88)
        cards.append(_card(row, name if image is not None else None))
    page = preview_dir / "index.html"
    page.write_text(_PAGE.format(title=html.escape(str(out)), count=len(rows), cards="\n".join(cards)))
    return page


def _card(row: dict, image_name: str | None) -> str:
    e = html.escape
    head = f"<h3>{e(row['image_id'])} <span class='{e(row['status'])}'>{e(row['status'])}</span></h3>"
    if row["status"] != "ok":
        return f"<div class='card'>{head}<p class='error'>{e(row['error'] or '')}</p></div>"
    items = []
    for region in row["regions"]:
        attrs = ", ".join(f"{e(a['name'])}: {e(a['value'] or '?')}" for a in region["answers"] if a["name"] != "caption")
        items.append(f"<li><b>{region['region_id'] + 1}</b> {e(region['label'])} ({region['score']:.2f}) — "
                     f"{e(region['caption'] or '')} <small>{attrs}</small></li>")
    for rel in row["relations"]:
        items.append(f"<li class='rel'>{rel['subject'] + 1} {e(rel['predicate'] or '?')} {rel['object'] + 1}"
                     f" <small>{e(rel['raw'])}</small></li>")
    img = f"<img src='{e(image_name)}' alt='{e(row['image_id'])}'>" if image_name else ""
    return f"<div class='card'>{head}{img}<ul>{''.join(items)}</ul></div>"


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>roiscribe: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.card {{ display: inline-block; vertical-align: top; width: 660px; margin: 8px; padding: 8px; background: #fff;
         border: 1px solid #ddd; }}
.card img {{ max-width: 640px; }} .ok {{ color: #2a2; }} .error {{ color: #c22; }} .rel {{ color: #555; }}
h3 {{ font-size: 14px; margin: 0 0 6px; }} li {{ font-size: 13px; }}
</style></head>
<body><h1>roiscribe: {title}</h1><p>{count} images</p>
{cards}
</body></html>
"""
