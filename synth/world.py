"""The synthetic world: shapes with a known shape, colour, material and size, placed with
overlaps and clutter on varied backgrounds, with exact boxes and exact relations.

Deterministic per seed: ``generate_scene(seed)`` always draws the same picture. Everything is
drawn with Pillow and numpy; nothing is downloaded.

Materials are drawn as surface patterns in a darker or lighter shade of the object's colour:
metal (a specular highlight), wood (3.5 parallel grain stripes across the object), fabric (a 4x4
woven check) and stone (irregular blotches), so colour and material are independent
attributes. The patterns scale with the object and are coarse enough to survive the demo model's
112-px input on the smallest objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COLORS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
MATERIALS = ("metal", "wood", "fabric", "stone")
SIZES = ("small", "medium", "large")
# relative side length of the object's box: small < 0.21 <= medium < 0.29 <= large
SIZE_RANGES = {"small": (0.15, 0.21), "medium": (0.21, 0.29), "large": (0.29, 0.38)}
POSITION_PREDICATES = ("left of", "right of", "above", "below", "overlapping")


@dataclass(frozen=True)
class WorldConfig:
    min_size: int = 160  # image side range in pixels
    max_size: int = 320
    min_objects: int = 2
    max_objects: int = 5
    max_overlap: float = 0.35  # the largest fraction of an object another may cover
    clutter: int = 12  # background specks and lines (not objects)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    material: str
    size: str
    box: tuple[float, float, float, float]  # xyxy pixels

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return (x2 - x1) * (y2 - y1)


@dataclass
class Scene:
    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def relation(a: SceneObject, b: SceneObject) -> str:
    """The position of ``a`` relative to ``b``: overlapping when their boxes intersect, else the
    axis with the larger gap decides (left of / right of / above / below)."""
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    if min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1):
        return "overlapping"
    dx = (ax1 + ax2 - bx1 - bx2) / 2
    dy = (ay1 + ay2 - by1 - by2) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def size_relation(a: SceneObject, b: SceneObject) -> str:
    return "larger than" if a.area >= b.area else "smaller than"


def generate_scene(seed: int, config: WorldConfig = WorldConfig()) -> Scene:
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(config.min_size, config.max_size + 1, size=2))
    image = _background(rng, w, h)
    _clutter(rng, image, config.clutter)
    objects: list[SceneObject] = []
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(n * 20):  # rejection sampling for placements with bounded overlap
        if len(objects) == n:
            break
        obj = _sample_object(rng, w, h, objects)
        if obj is not None and _acceptable(obj, objects, config.max_overlap):
            objects.append(obj)
    for obj in objects:  # later objects are drawn on top
        _draw(image, obj, rng)
    return Scene(seed, image, objects)


def _sample_object(rng, w: int, h: int, existing: list[SceneObject]) -> SceneObject | None:
    size = SIZES[int(rng.integers(len(SIZES)))]
    lo, hi = SIZE_RANGES[size]
    side = rng.uniform(lo, hi) * min(w, h)
    x1 = rng.uniform(0, w - side)
    y1 = rng.uniform(0, h - side)
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    return SceneObject(
        shape=SHAPES[int(rng.integers(len(SHAPES)))], color=color,
        material=MATERIALS[int(rng.integers(len(MATERIALS)))], size=size,
        box=(round(x1, 1), round(y1, 1), round(x1 + side, 1), round(y1 + side, 1)),
    )


def _acceptable(obj: SceneObject, existing: list[SceneObject], max_overlap: float) -> bool:
    for other in existing:
        ix = min(obj.box[2], other.box[2]) - max(obj.box[0], other.box[0])
        iy = min(obj.box[3], other.box[3]) - max(obj.box[1], other.box[1])
        inter = max(ix, 0) * max(iy, 0)
        if inter > max_overlap * min(obj.area, other.area):
            return False
    return True


def _background(rng, w: int, h: int) -> np.ndarray:
    """A smooth two-colour gradient in muted tones, so no object colour is the background's."""
    c1, c2 = rng.uniform(90, 190, size=(2, 3))
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / (w * abs(math.cos(angle)) + h * abs(math.sin(angle)) + 1e-6)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    img += rng.normal(0, 4, size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _clutter(rng, image: np.ndarray, count: int) -> None:
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for _ in range(count):
        tone = tuple(int(v) for v in rng.uniform(70, 200, 3))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.5:
            draw.line([(x, y), (x + rng.uniform(-40, 40), y + rng.uniform(-40, 40))], fill=tone, width=1)
        else:
            r = rng.uniform(1, 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tone)
    image[:] = np.asarray(pil)


def _polygon(shape: str, box) -> list[tuple[float, float]] | None:
    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k)) for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi / 5 * k
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    return None


def _mask(shape: str, box, w: int, h: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    poly = _polygon(shape, box)
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.rectangle(box, fill=255)
    else:
        d.polygon(poly, fill=255)
    return np.asarray(m) > 127


def _draw(image: np.ndarray, obj: SceneObject, rng) -> None:
    h, w = image.shape[:2]
    mask = _mask(obj.shape, obj.box, w, h)
    base = np.array(COLORS[obj.color], np.float32)
    # a second shade: darker for light colours, lighter for dark ones
    shade = base * 0.55 if base.mean() > 90 else base + (255 - base) * 0.45
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x1, y1, x2, y2 = obj.box
    side = max(x2 - x1, 1.0)
    u, v = (xx - x1) / side, (yy - y1) / side  # object-relative coordinates
    if obj.material == "metal":  # specular highlight towards the top-left
        t = np.exp(-((u - 0.3) ** 2 + (v - 0.3) ** 2) / 0.05)[..., None]
        colour = base * (1 - 0.6 * t) + 255 * 0.6 * t
    elif obj.material == "wood":  # grain: stripes along a random direction
        angle = rng.uniform(0, math.pi)
        p = (u * math.cos(angle) + v * math.sin(angle)) * 3.5
        t = ((p % 1.0) < 0.5)[..., None]
        colour = np.where(t, shade, base)
    elif obj.material == "fabric":  # woven check
        t = ((np.floor(u * 4).astype(int) + np.floor(v * 4).astype(int)) % 2 == 0)[..., None]
        colour = np.where(t, shade, base)
    else:  # stone: irregular blotches (a smooth random field over the object, thresholded)
        field = rng.random((5, 5))
        gu, gv = np.clip(u, 0, 1) * 4, np.clip(v, 0, 1) * 4
        i0, j0 = np.minimum(gv.astype(int), 3), np.minimum(gu.astype(int), 3)
        fv, fu = gv - i0, gu - j0
        smooth = (field[i0, j0] * (1 - fv) * (1 - fu) + field[i0 + 1, j0] * fv * (1 - fu)
                  + field[i0, j0 + 1] * (1 - fv) * fu + field[i0 + 1, j0 + 1] * fv * fu)
        t = (smooth > 0.5)[..., None]
        colour = np.where(t, shade, base)
    image[mask] = np.broadcast_to(colour, image.shape)[mask].clip(0, 255).astype(np.uint8)
