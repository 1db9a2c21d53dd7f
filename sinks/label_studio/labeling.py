"""The labeling config roiscribe writes, and reads back: pure XML, no server.

A config is generated from a ``ConfigSpec`` (box labels, attribute choices, relation labels, the
attributes compared with the box label) and only ever extended: ``spec_from_config`` reads the
spec back from a config roiscribe wrote, and returns None for a config of another shape
(roiscribe then refuses the project).

The layout, for an annotator who reviews pre-annotations:

- the image on the left; each box label in its own colour, with a hotkey only for the first ten
  (``1``..``9``, ``0``) and none for anything else (Label Studio would otherwise hand out letters to
  every label and choice, ``red[6]`` ``wood[m]``, until it runs out of keys);
- beside it, the selected region's fields: a titled dropdown per attribute, and "Flags" (the box
  label disagrees with the model's answer about the same property: ``pipeline.review``);
- below those, the image's relations in words, with the region numbers Label Studio shows and the
  model's confidence (Label Studio's own relation list names only the two regions);
- each region's caption in the region list, editable in place.

The relation list is a read-only text written into each prediction (so it belongs to the model
version that made it); the relations themselves are Label Studio relations between regions. The
flags are per-region choices, which an annotator clears once the region is resolved.
"""

from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterable, Sequence

IMAGE_FIELD = "image"  # task data: the image the task shows ($image in the config)
KEY_FIELD = "roiscribe_key"  # task data: the row's image_id, the stable key a task is found by
SHA_FIELD = "roiscribe_sha256"  # task data: sha256 of the image bytes at push time (a changed image is warned)
REGION, CAPTION, IMAGE = "region", "caption", "image"  # control / object tag names in the config
FLAGS = "flags"  # per-region choices: the box label disagrees with an answer (``flag_value``)
RELATION_LIST = "relation_list"  # the image's relations in words (read-only text of each prediction)
RESERVED = (REGION, CAPTION, IMAGE, FLAGS, RELATION_LIST)  # no attribute may be called so
CAPTION_ANSWERS = ("caption", "caption_detailed")  # answers shown as the region's text, not as choices
LAYOUT = "roiscribe-layout-2"  # className of the config's outer View: configs of older layouts are rewritten
SIDE_WIDTH_PX = 300  # the column beside the image that holds the selected region's fields
IMAGE_COLUMN, SIDE_COLUMN, REGION_FIELDS = "roiscribe-image", "roiscribe-side", "roiscribe-region"  # element ids
# A hotkey no key press matches: Label Studio assigns a letter to every Label and Choice without
# one, and 1.23 reduces a blank hotkey to no key at all (tests/sinks/test_browser.py presses them)
NO_HOTKEY = " "
FLAG_PREFIX = "label ≠ "  # a flag choice is "label ≠ shape": the box label and the shape answer disagree

# Distinct colours that read on photos and on flat backgrounds (saturated first); further labels
# get evenly spread hues.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#469990", "#9a6324", "#800000", "#808000", "#000075", "#ffe119", "#e6beff", "#aaffc3")


@dataclass
class ConfigSpec:
    """What the labeling config must offer: box labels, attribute choices, relation labels, the
    attributes compared with the box label (each gets a flag choice), and whether it has the
    image's read-only relation list: a prediction may only hold results for controls its
    project's config has."""

    classes: list[str] = field(default_factory=list)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    predicates: list[str] = field(default_factory=list)
    label_attributes: list[str] = field(default_factory=list)
    relation_list: bool = False

    def union(self, other: "ConfigSpec") -> "ConfigSpec":
        def merge(a: Sequence[str], b: Sequence[str]) -> list[str]:
            return list(dict.fromkeys([*a, *b]))

        names = merge(list(self.attributes), list(other.attributes))
        return ConfigSpec(merge(self.classes, other.classes),
                          {n: merge(self.attributes.get(n, []), other.attributes.get(n, [])) for n in names},
                          merge(self.predicates, other.predicates),
                          merge(self.label_attributes, other.label_attributes), self.relation_list or other.relation_list)

    def covers(self, other: "ConfigSpec") -> bool:
        return self.union(other) == self


def flag_value(attribute: str) -> str:
    """The flag choice saying that the box label and the ``attribute`` answer disagree."""
    return FLAG_PREFIX + attribute


def spec_from_rows(rows: Iterable[dict]) -> ConfigSpec:
    """Classes, attribute values and predicates a run produced, plus the parser's vocabularies
    (so that an annotator can pick a value the model did not), and the attributes compared with
    the box label (``pipeline.review.label_attributes``)."""
    from pipeline.parse import PREDICATES, VOCABULARIES
    from pipeline.review import label_attributes

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
    return ConfigSpec(list(classes), {k: list(v) for k, v in attributes.items()}, list(predicates),
                      label_attributes(classes, attributes), relation_list=True)


def label_color(index: int) -> str:
    """The colour of the ``index``-th box label: the palette, then evenly spread hues."""
    if index < len(PALETTE):
        return PALETTE[index]
    r, g, b = colorsys.hls_to_rgb((index * 0.618034) % 1.0, 0.45, 0.8)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def label_hotkey(index: int) -> str:
    """``1``..``9`` then ``0`` for the first ten labels; no hotkey for the others."""
    return str((index + 1) % 10) if index < 10 else NO_HOTKEY


def title(name: str) -> str:
    return name.replace("_", " ").strip().capitalize() or name


def labeling_config(spec: ConfigSpec) -> str:
    """The config's XML (see the module docstring for the layout)."""
    clash = [n for n in spec.attributes if n in RESERVED]
    if clash:
        raise ValueError(f"attribute {clash[0]!r} has a name the labeling config reserves "
                         f"({', '.join(RESERVED)}); ask it under another name")
    q = quote_xml
    lines = [f'<View className="{LAYOUT}" style="display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start">',
             # the top padding holds the relation labels Label Studio routes above the image
             f'  <View idAttr="{IMAGE_COLUMN}" style="flex: 1 1 420px; min-width: 0; padding-top: 36px">',
             f'    <Image name="{IMAGE}" value="${IMAGE_FIELD}" zoom="true" zoomControl="true"/>',
             f'    <RectangleLabels name="{REGION}" toName="{IMAGE}" strokeWidth="3" fillOpacity="0.1">']
    lines += [f'      <Label value="{q(c)}" background="{label_color(i)}" hotkey="{label_hotkey(i)}"/>'
              for i, c in enumerate(spec.classes)]
    lines += ['    </RectangleLabels>', '  </View>',
              f'  <View idAttr="{SIDE_COLUMN}" style="flex: 0 0 {SIDE_WIDTH_PX}px; max-width: 100%">',
              '    <View visibleWhen="no-region-selected">',
              '      <Header value="Select a region to review its fields" size="6"/>',
              '    </View>',
              f'    <View idAttr="{REGION_FIELDS}" visibleWhen="region-selected">']
    for name, values in spec.attributes.items():
        lines += [f'      <Header value="{q(title(name))}" size="6"/>',
                  f'      <Choices name="{q(name)}" toName="{IMAGE}" perRegion="true" choice="single" layout="select">']
        lines += [f'        <Choice value="{q(v)}" hotkey="{NO_HOTKEY}"/>' for v in values]
        lines.append('      </Choices>')
    if spec.label_attributes:
        lines += ['      <Header value="Flags" size="6"/>',
                  f'      <Choices name="{FLAGS}" toName="{IMAGE}" perRegion="true" choice="multiple" layout="select">']
        lines += [f'        <Choice value="{q(flag_value(a))}" hotkey="{NO_HOTKEY}" '
                  f'hint="{q(f"the box label and the {a} answer disagree")}"/>' for a in spec.label_attributes]
        lines.append('      </Choices>')
    lines.append('    </View>')
    if spec.relation_list:
        lines += ['    <Header value="Relations" size="6"/>',
                  f'    <TextArea name="{RELATION_LIST}" toName="{IMAGE}" maxSubmissions="0"/>']
    lines += ['  </View>',
              f'  <TextArea name="{CAPTION}" toName="{IMAGE}" perRegion="true" editable="true" '
              'displayMode="region-list" placeholder="caption"/>',
              '  <Relations>']
    lines += [f'    <Relation value="{q(p)}"/>' for p in spec.predicates]
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
    attributes = {c.get("name"): [x.get("value") for x in c.findall("Choice")]
                  for c in root.iter("Choices") if c.get("name") != FLAGS}
    flags = root.find(f".//Choices[@name='{FLAGS}']")
    compared = [v[len(FLAG_PREFIX):] for v in (x.get("value") or "" for x in flags.findall("Choice"))
                if v.startswith(FLAG_PREFIX)] if flags is not None else []
    return ConfigSpec([x.get("value") for x in rect.findall("Label")], attributes,
                      [x.get("value") for x in root.iter("Relation")], compared,
                      root.find(f".//TextArea[@name='{RELATION_LIST}']") is not None)


def is_current_layout(xml: str) -> bool:
    """Whether a config roiscribe wrote has the current layout (else a push rewrites it, keeping
    every label, value and predicate it offers)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return False
    return root.get("className") == LAYOUT
