"""The labeling config roiscribe writes, and reads back: pure XML, no server.

A config is generated from a ``ConfigSpec`` (box labels, attribute choices, relation labels) and
only ever extended: ``spec_from_config`` reads the spec back from a config roiscribe wrote, and
returns None for a config of another shape (roiscribe then refuses the project).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterable, Sequence

IMAGE_FIELD = "image"  # task data: the image the task shows ($image in the config)
KEY_FIELD = "roiscribe_key"  # task data: the row's image_id, the stable key a task is found by
SHA_FIELD = "roiscribe_sha256"  # task data: sha256 of the image bytes at push time (a changed image is warned)
REGION, CAPTION, IMAGE = "region", "caption", "image"  # control / object tag names in the config
CAPTION_ANSWERS = ("caption", "caption_detailed")  # answers shown as the region's text, not as choices


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
    attr = quote_xml
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

