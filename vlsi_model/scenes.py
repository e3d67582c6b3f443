"""Seeded synthetic scenes: the synthetic camera's frames and the small VLMs' VQA data.

One generator serves two users. The ROS `image_source` node renders frames from it (e.g.
640x480) and publishes each frame's ground truth beside it, so an answer on the robot can be
checked against what the frame really shows. The ML side trains and evaluates the project's
small students on 112x112 renders of the same scenes. Both need the same three properties:

* Deterministic: a seed fixes the scene, its pixels (byte for byte) and its questions, on any
  run and any machine. Only PCG64 streams and exact integer/float arithmetic are used (no
  anti-aliasing library, no iteration over Python sets, whose order changes per process).
* Fast: a 640x480 frame renders in a few milliseconds (numpy masks over each object's
  bounding box only; the background is one broadcast).
* Exactly right: objects never overlap and stay inside the frame, every object is drawn in
  its exact palette colour (noise is opt-in), and questions are only asked when their answer
  is unambiguous (unique referents, well separated centres). Tests re-derive the answers
  from the pixels, not from this module's bookkeeping.

Coordinates are continuous pixel units: pixel (row i, column j) covers [j, j+1) x [i, i+1)
and is inside a shape when its centre (j + 0.5, i + 0.5) is. An object's `radius` is the
half-extent of its axis-aligned bounding box, for every shape.

Seeds of dataset splits (see `scene_seed`): train image i of run seed s uses
``s * SEED_STRIDE + i``; validation and test add `VAL_SEED_OFFSET` / `TEST_SEED_OFFSET`, so
with the default seed 0 test image i uses ``TEST_SEED_OFFSET + i``. The three ranges are
disjoint, so no test scene is ever a training scene.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Opt-in shapes (SceneConfig.shapes): distinguishable at 112 px, but the default data keeps the
# three shapes the small-model study was measured on.
EXTRA_SHAPES: tuple[str, ...] = ("diamond", "star")
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SIZES: tuple[str, ...] = ("small", "large")
# New families go at the end: a family's question stream is seeded by its index here, so appending
# one leaves the questions of the other families unchanged (a caller that asks for every family, the
# default, also gets the new one's).
FAMILIES: tuple[str, ...] = (
    "attribute", "count", "exist", "spatial", "compare", "describe", "caption", "locate", "positions",
)
# The families of the tokenizer corpus (`corpus_texts`): those the shipped tokenizers were trained
# on. A family added later is encoded with the existing merges (byte-level BPE covers any text);
# adding it here would change every merge and stop the reproduction scripts reproducing them.
TOKENIZER_FAMILIES: tuple[str, ...] = FAMILIES[:7]
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Saturated palette: every pair differs by >= 100 levels in some channel, and none is grey,
# so objects never look like the (grey) background.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 200),
}

# Split seeds: index i < SEED_STRIDE of run seed s; train in [0, 2**40), test and val above.
SEED_STRIDE = 1_000_003
TEST_SEED_OFFSET = 1 << 40
VAL_SEED_OFFSET = 1 << 41
MAX_RUN_SEED = (1 << 40) // SEED_STRIDE - 1
_SPLIT_OFFSETS = {"train": 0, "val": VAL_SEED_OFFSET, "test": TEST_SEED_OFFSET}

# Independent random streams derived from one seed (SeedSequence([seed, tag])), so adding a
# question family or a noise draw never shifts the scene layout of an existing seed.
_STREAM_LAYOUT = 0
_STREAM_NOISE = 1
_STREAM_QUESTIONS = 2

_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip

DESCRIBE_QUESTION = "Describe the image in one sentence."
CAPTION_QUESTION = "What objects are there?"
POSITIONS_QUESTION = "Where is each object?"
EMPTY_CAPTION = "nothing"

# Spatial questions need centres this many times the larger radius apart along the axis.
SPATIAL_MIN_SEPARATION = 1.5
# "Where is the red circle?" answers "<row> <column>" by thirds of the frame: row in ROWS_THIRDS,
# column in COLUMNS_THIRDS ("top left", "middle center", "bottom right").
ROWS_THIRDS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS_THIRDS: tuple[str, ...] = ("left", "center", "right")
# An object whose centre lies closer than this fraction of the frame to a third's border has no
# unambiguous answer and is never asked about. The nano data's 4x4 and 4x3 grids (and 3x3) put no
# cell centre that close; finer grids do (a 5x5 grid's second column is centred at 0.30).
LOCATE_MARGIN = 0.04


@dataclass(frozen=True)
class SceneObject:
    """One object; (x, y) is the centre of its bounding box, `radius` its half-extent, in pixels."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float


@dataclass
class Scene:
    """Everything `render_scene` needs, so rendering is a pure function of this value.

    `shapes` and `colors` are the vocabularies the scene was drawn from; questions about
    absent things ("How many stars?") only use words from them.
    """

    width: int
    height: int
    objects: list[SceneObject]
    seed: int
    background: tuple[int, int, int] = (160, 160, 160)
    gradient: tuple[float, float] = (0.0, 0.0)  # grey levels added across x and across y
    noise: float = 0.0  # std of Gaussian pixel noise in grey levels; 0 = exact palette colours
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS


@dataclass(frozen=True)
class QA:
    """A question with its exact short answer and the family it belongs to."""

    question: str
    answer: str
    family: str


@dataclass
class SceneConfig:
    """Knobs of `generate_scene`. Radii are fractions of `reference_length()` (see `layout`)."""

    width: int = 112
    height: int = 112
    min_objects: int = 1
    max_objects: int = 5
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    sizes: tuple[str, ...] = SIZES
    small_radius: tuple[float, float] = (0.07, 0.08)
    large_radius: tuple[float, float] = (0.125, 0.14)
    # "random": centres anywhere (radii as fractions of the image's smaller side). "grid": one
    # object per cell of a cols x rows grid, centred on the cell, radii as fractions of the cell's
    # smaller side (grid_*_radius). Why grid exists: a Qwen2-VL image token covers 28x28 px; with
    # a 4x4 grid on 112x112 each object is exactly one token at a fixed offset, so its shape is
    # linearly readable from that token (probe: 0.97 vs 0.43 with random placement), which is
    # what lets the small models learn shape on a CPU (shared/NANO_NOTES.md: with random
    # placement they never do). The camera can render the same grid at any size.
    layout: str = "random"
    grid: tuple[int, int] = (4, 4)  # columns, rows
    grid_small_radius: tuple[float, float] = (0.22, 0.25)
    grid_large_radius: tuple[float, float] = (0.34, 0.38)
    background: str = "gradient"  # "plain" or "gradient" (a light seeded linear ramp)
    background_levels: tuple[int, int] = (110, 190)  # grey level range of the background
    gradient_amplitude: float = 12.0  # max grey levels of the ramp along each axis
    noise: float = 0.0
    # Min gap between bounding boxes and to the border (fraction of min side). At least 2 px, so
    # at least one background pixel always separates two objects: they never look merged.
    gap: float = 0.02
    max_tries: int = 200  # placement tries per object per attempt

    def validate(self) -> None:
        """Raise ValueError with a user-facing message for a config that cannot work."""
        if self.width < 16 or self.height < 16:
            raise ValueError(f"image size must be at least 16x16, got {self.width}x{self.height}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        for name, values, allowed in (
            ("shapes", self.shapes, ALL_SHAPES),
            ("colors", self.colors, tuple(COLOR_RGB)),
            ("sizes", self.sizes, SIZES),
        ):
            if not values:
                raise ValueError(f"{name} must not be empty")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {list(allowed)}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {list(values)}")
        if self.layout not in ("random", "grid"):
            raise ValueError(f"layout must be 'random' or 'grid', got {self.layout!r}")
        small, large = self.radius_ranges()
        prefix = "grid_" if self.layout == "grid" else ""
        for name, (lo, hi) in ((f"{prefix}small_radius", small), (f"{prefix}large_radius", large)):
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be 0 < low <= high, got {(lo, hi)}")
        if small[1] * 1.3 > large[0]:
            raise ValueError(
                f"{prefix}large_radius must be at least 1.3x {prefix}small_radius so sizes are distinguishable"
            )
        if self.background not in ("plain", "gradient"):
            raise ValueError(f"background must be 'plain' or 'gradient', got {self.background!r}")
        lo, hi = self.background_levels
        if not 0 <= lo <= hi <= 255 or not 0 <= self.gradient_amplitude <= min(lo, 255 - hi):
            raise ValueError("background_levels +- gradient_amplitude must stay within 0..255")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.max_tries < 1:
            raise ValueError("max_tries must be >= 1")
        if self.layout == "grid":
            cols, rows = self.grid
            if cols < 1 or rows < 1:
                raise ValueError(f"grid must be at least 1x1, got {cols}x{rows}")
            if self.max_objects > cols * rows:
                raise ValueError(f"max_objects {self.max_objects} exceeds the {cols}x{rows} grid's {cols * rows} cells")
        side = self.reference_length()
        largest = max(large[1] if "large" in self.sizes else 0.0, small[1])
        if 2 * largest * side + 2 * self.gap_px() > side:
            raise ValueError("objects are too large for the " + ("grid cells" if self.layout == "grid" else "image"))

    def radius_ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(small, large) radius ranges as fractions of `reference_length()`."""
        if self.layout == "grid":
            return self.grid_small_radius, self.grid_large_radius
        return self.small_radius, self.large_radius

    def cell_size(self) -> tuple[float, float]:
        """Width and height of a grid cell in pixels (the whole image for the random layout)."""
        if self.layout != "grid":
            return float(self.width), float(self.height)
        return self.width / self.grid[0], self.height / self.grid[1]

    def reference_length(self) -> float:
        """What radii are fractions of: the image's smaller side, or the grid cell's."""
        return min(self.cell_size())

    def gap_px(self) -> float:
        """The gap in pixels: what placement enforces between boxes and to the border.

        On the grid it is the margin between an object and its cell's border, so neighbours
        are twice that apart: half the random layout's gap (at least 1 px) gives the same
        separation and lets small frames (e.g. 64x48) keep the default grid."""
        if self.layout == "grid":
            return max(1.0, self.gap * min(self.width, self.height) / 2)
        return max(2.0, self.gap * min(self.width, self.height))


# ---------------------------------------------------------------------------------------------
# Scene generation
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream])))


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(rng.random())


def _boxes_clear(x: float, y: float, r: float, placed: Sequence[SceneObject], gap: float) -> bool:
    """True when the box of (x, y, r) is at least `gap` away from every placed box on some axis."""
    return all(abs(x - o.x) >= r + o.radius + gap or abs(y - o.y) >= r + o.radius + gap for o in placed)


def _radius(rng: np.random.Generator, config: SceneConfig, size: str) -> float:
    small, large = config.radius_ranges()
    lo, hi = small if size == "small" else large
    return round(_uniform(rng, lo, hi) * config.reference_length(), 2)


def _place_on_grid(
    rng: np.random.Generator, specs: Sequence[tuple[str, str, str, float]], config: SceneConfig
) -> list[SceneObject]:
    """One object per distinct random cell, centred on it (validate() ensures they fit)."""
    cols = config.grid[0]
    cell_w, cell_h = config.cell_size()
    cells = rng.permutation(cols * config.grid[1])[: len(specs)]
    placed = []
    for (shape, color, size, r), cell in zip(specs, cells.tolist(), strict=True):
        x, y = round((cell % cols + 0.5) * cell_w, 2), round((cell // cols + 0.5) * cell_h, 2)
        placed.append(SceneObject(shape, color, size, x, y, r))
    return placed


def _place(
    rng: np.random.Generator, specs: Sequence[tuple[str, str, str, float]], config: SceneConfig
) -> list[SceneObject] | None:
    """Rejection-sample positions for all `specs`; None when one of them finds no free spot."""
    gap = config.gap_px()
    placed: list[SceneObject] = []
    for shape, color, size, r in specs:
        for _ in range(config.max_tries):
            # Rounded to 1/100 px (exact in JSON); the checks below run on the rounded values.
            x = round(_uniform(rng, r + gap, config.width - r - gap), 2)
            y = round(_uniform(rng, r + gap, config.height - r - gap), 2)
            if (
                r + gap <= x <= config.width - r - gap
                and r + gap <= y <= config.height - r - gap
                and _boxes_clear(x, y, r, placed, gap)
            ):
                placed.append(SceneObject(shape, color, size, x, y, r))
                break
        else:
            return None
    return placed


def generate_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """The scene of `seed`: object attributes, non-overlapping positions and background.

    Attributes are drawn first and kept; positions are rejection-sampled (`max_tries` per
    object, up to 8 fresh attempts for the whole layout). Only when a layout is that crowded
    do large objects shrink to small, and as a last resort trailing objects are dropped
    (never below `min_objects`; a config that cannot reach it raises ValueError).
    """
    config = config or SceneConfig()
    config.validate()
    rng = _rng(seed, _STREAM_LAYOUT)
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    specs = []
    for _ in range(n):
        shape, color, size = _pick(rng, config.shapes), _pick(rng, config.colors), _pick(rng, config.sizes)
        specs.append((shape, color, size, _radius(rng, config, size)))

    objects = _place_on_grid(rng, specs, config) if config.layout == "grid" else None
    for _ in range(8 if objects is None else 0):
        objects = _place(rng, specs, config)
        if objects is not None:
            break
    if objects is None and "small" in config.sizes:
        specs = [
            (s, c, "small", _radius(rng, config, "small")) if z == "large" else (s, c, z, r)
            for s, c, z, r in specs
        ]
        objects = _place(rng, specs, config)
    while objects is None and len(specs) > config.min_objects:
        specs = specs[:-1]
        objects = _place(rng, specs, config)
    if objects is None:
        raise ValueError(
            f"cannot place {config.min_objects} objects in {config.width}x{config.height}; lower min_objects"
        )

    level = int(rng.integers(config.background_levels[0], config.background_levels[1] + 1))
    gradient = (0.0, 0.0)
    if config.background == "gradient":
        a = config.gradient_amplitude
        gradient = (round(_uniform(rng, -a, a), 2), round(_uniform(rng, -a, a), 2))
    return Scene(
        width=config.width,
        height=config.height,
        objects=objects,
        seed=int(seed),
        background=(level, level, level),
        gradient=gradient,
        noise=float(config.noise),
        shapes=tuple(config.shapes),
        colors=tuple(config.colors),
    )


def scene_seed(split: str, seed: int, index: int) -> int:
    """Seed of image `index` of `split` for run seed `seed` (module docstring: disjoint ranges)."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= seed <= MAX_RUN_SEED:
        raise ValueError(f"seed must be in 0..{MAX_RUN_SEED}, got {seed}")
    if not 0 <= index < SEED_STRIDE:
        raise ValueError(f"index must be in 0..{SEED_STRIDE - 1}, got {index}")
    return _SPLIT_OFFSETS[split] + seed * SEED_STRIDE + index


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _star_vertices() -> tuple[tuple[float, float], ...]:
    """Unit five-pointed star, one point up, vertices rounded so every platform agrees."""
    verts = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.45
        angle = math.pi * k / 5
        verts.append((round(radius * math.sin(angle), 9), round(-radius * math.cos(angle), 9)))
    return tuple(verts)


_STAR = _star_vertices()


def _polygon_mask(dx: np.ndarray, dy: np.ndarray, verts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the pixel-centre offsets."""
    inside = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
    for k in range(len(verts)):
        x1, y1 = verts[k]
        x2, y2 = verts[k - 1]
        if y1 == y2:
            continue  # horizontal edges never cross a horizontal ray
        crosses = (y1 > dy) != (y2 > dy)
        x_cross = x1 + (dy - y1) * ((x2 - x1) / (y2 - y1))
        inside ^= crosses & (dx < x_cross)
    return inside


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels (offsets of their centres from the object centre) covered by `shape` of half-extent r."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex (0, -r), base from (-r, r) to (r, r)
        return (dy <= r) & (2 * np.abs(dx) <= dy + r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "star":
        return _polygon_mask(dx / r, dy / r, _STAR)
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene) -> np.ndarray:
    """Background as an (H, W*3) interleaved plane: one row pattern broadcast down the image,
    which is ~50x faster than broadcasting a 3-vector into H x W x 3."""
    h, w = scene.height, scene.width
    gx, gy = scene.gradient
    bg = np.asarray(scene.background, dtype=np.float32)
    if gx == 0 and gy == 0:
        img = np.empty((h, w * 3), dtype=np.uint8)
        img[:] = np.tile(np.clip(np.rint(bg), 0, 255).astype(np.uint8), w)
        return img.reshape(h, w, 3)
    half = np.float32(0.5)
    u = ((np.arange(w, dtype=np.float32) + half) / np.float32(w) - half) * np.float32(gx)
    v = ((np.arange(h, dtype=np.float32) + half) / np.float32(h) - half) * np.float32(gy)
    row = np.repeat(u, 3) + np.tile(bg, w)
    plane = np.empty((h, w * 3), dtype=np.float32)
    np.add(v[:, None], row[None, :], out=plane)
    np.rint(plane, out=plane)
    np.clip(plane, 0, 255, out=plane)
    return plane.astype(np.uint8).reshape(h, w, 3)


def render_scene(scene: Scene) -> np.ndarray:
    """H x W x 3 uint8 RGB, C-contiguous: background, then each object in its exact colour.

    A pure function of `scene` (noise, when enabled, comes from the scene's own seed), so
    rendering a ground-truth message again reproduces the frame byte for byte.
    """
    img = _background(scene)
    for obj in scene.objects:
        x0 = max(0, math.floor(obj.x - obj.radius))
        x1 = min(scene.width, math.ceil(obj.x + obj.radius) + 1)
        y0 = max(0, math.floor(obj.y - obj.radius))
        y1 = min(scene.height, math.ceil(obj.y + obj.radius) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - obj.x)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - obj.y)[:, None]
        mask = _shape_mask(obj.shape, dx, dy, obj.radius)
        img[y0:y1, x0:x1][mask] = COLOR_RGB[obj.color]
    if scene.noise > 0:
        rng = _rng(scene.seed, _STREAM_NOISE)
        noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(scene.noise)
        img = np.clip(img.astype(np.float32) + np.rint(noise), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


# ---------------------------------------------------------------------------------------------
# Text: descriptions, captions and questions
# ---------------------------------------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def _left_to_right(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.x, o.y, o.shape, o.color))


def describe_scene(scene: Scene) -> str:
    """One sentence listing every object left to right with size, colour and shape."""
    objs = _left_to_right(scene)
    if not objs:
        return "There are no objects."
    items = [f"{_article(o.size)} {o.size} {o.color} {o.shape}" for o in objs]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    if len(objs) == 1:
        return f"There is one object: {listing}."
    return f"There are {_number_word(len(objs))} objects: {listing}."


def caption_objects(scene: Scene) -> str:
    """Dense caption "red circle blue square": objects left to right by x centre.

    The small-model study found this caption task is what gets VQA training off chance, so
    it is its own question family (`caption`).
    """
    objs = _left_to_right(scene)
    return " ".join(f"{o.color} {o.shape}" for o in objs) if objs else EMPTY_CAPTION


def _vocab(scene: Scene) -> tuple[list[str], list[str]]:
    """Shape and colour words questions may use: the scene's vocabularies plus anything present."""
    shapes = list(scene.shapes) + [o.shape for o in scene.objects if o.shape not in scene.shapes]
    colors = list(scene.colors) + [o.color for o in scene.objects if o.color not in scene.colors]
    return list(dict.fromkeys(shapes)), list(dict.fromkeys(colors))


def _unique_pairs(scene: Scene) -> list[SceneObject]:
    """Objects that "the <colour> <shape>" names unambiguously."""
    pairs = Counter((o.shape, o.color) for o in scene.objects)
    return [o for o in scene.objects if pairs[(o.shape, o.color)] == 1]


def attribute_questions(scene: Scene) -> dict[str, list[QA]]:
    """Every attribute question the scene allows, by the attribute asked ("color", "shape",
    "size"), each naming its object unambiguously. The data generator draws from these; the
    representation probe (benchmarks/probe_representations.py) asks all of them."""
    shape_n = Counter(o.shape for o in scene.objects)
    color_n = Counter(o.color for o in scene.objects)
    objs = scene.objects
    return {
        "color": [QA(f"What color is the {o.shape}?", o.color, "attribute") for o in objs if shape_n[o.shape] == 1],
        "shape": [QA(f"What shape is the {o.color} object?", o.shape, "attribute") for o in objs
                  if color_n[o.color] == 1],
        "size": [QA(f"What size is the {o.color} {o.shape}?", o.size, "attribute") for o in _unique_pairs(scene)],
    }


def _ask_attribute(scene: Scene, rng: np.random.Generator) -> QA | None:
    kinds = [k for k in attribute_questions(scene).values() if k]
    return _pick(rng, _pick(rng, kinds)) if kinds else None


def _ask_count(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes, colors = _vocab(scene)
    objs = scene.objects
    present_shapes = list(dict.fromkeys(o.shape for o in objs))
    present_colors = list(dict.fromkeys(o.color for o in objs))
    present_pairs = list(dict.fromkeys((o.color, o.shape) for o in objs))

    def choose(present: list[Any], everything: list[Any]) -> Any:
        # Mostly present things, so "0" is a real but not dominant answer.
        return _pick(rng, present) if present and rng.random() < 0.75 else _pick(rng, everything)

    kind = int(rng.integers(4))
    if kind == 0:
        shape = choose(present_shapes, shapes)
        n = sum(o.shape == shape for o in objs)
        return QA(f"How many {_plural(shape)} are there?", str(n), "count")
    if kind == 1:
        color = choose(present_colors, colors)
        n = sum(o.color == color for o in objs)
        return QA(f"How many {color} objects are there?", str(n), "count")
    if kind == 2:
        color, shape = choose(present_pairs, [(c, s) for c in colors for s in shapes])
        n = sum(o.color == color and o.shape == shape for o in objs)
        return QA(f"How many {color} {_plural(shape)} are there?", str(n), "count")
    return QA("How many objects are there?", str(len(objs)), "count")


def _ask_exist(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes, colors = _vocab(scene)
    present = list(dict.fromkeys((o.color, o.shape) for o in scene.objects))
    absent = [(c, s) for c in colors for s in shapes if (c, s) not in present]
    # Half of the "no" questions reuse a present colour or shape, so colour-shape binding matters.
    hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    want_yes = bool(rng.random() < 0.5)
    if (want_yes and present) or not absent:
        if not present:
            return None
        (color, shape), answer = _pick(rng, present), "yes"
    else:
        pool = hard if hard and rng.random() < 0.5 else absent
        (color, shape), answer = _pick(rng, pool), "no"
    return QA(f"Is there {_article(color)} {color} {shape}?", answer, "exist")


_RELATIONS: tuple[tuple[str, int, int], ...] = (
    # (phrase, axis 0 = x / 1 = y, sign: +1 when "A rel B" means A's coordinate is smaller)
    ("left of", 0, 1),
    ("right of", 0, -1),
    ("above", 1, 1),
    ("below", 1, -1),
)


def _ask_spatial(scene: Scene, rng: np.random.Generator) -> QA | None:
    named = _unique_pairs(scene)
    by_answer: dict[str, list[QA]] = {"yes": [], "no": []}
    for a in named:
        for b in named:
            if a is b:
                continue
            for phrase, axis, sign in _RELATIONS:
                delta = (b.x - a.x) if axis == 0 else (b.y - a.y)  # > 0: A has the smaller coordinate
                if abs(delta) <= SPATIAL_MIN_SEPARATION * max(a.radius, b.radius):
                    continue
                answer = "yes" if delta * sign > 0 else "no"
                question = f"Is the {a.color} {a.shape} {phrase} the {b.color} {b.shape}?"
                by_answer[answer].append(QA(question, answer, "spatial"))
    want = "yes" if rng.random() < 0.5 else "no"
    pool = by_answer[want] or by_answer["no" if want == "yes" else "yes"]
    return _pick(rng, pool) if pool else None


def _third(coord: float, extent: float) -> int | None:
    """Index (0, 1, 2) of the third of [0, extent] holding coord; None within LOCATE_MARGIN of a border."""
    frac = coord / extent
    if any(abs(frac - border) < LOCATE_MARGIN for border in (1 / 3, 2 / 3)):
        return None
    return min(int(frac * 3), 2)


def locate_phrase(scene: Scene, obj: SceneObject) -> str | None:
    """Where `obj` is in the frame, "<row> <column>" by thirds ("top left", "middle center"), or
    None when its centre is too close to a third's border for one answer to be right.

    Why thirds: a robot's user asks "where is the red cup?" to turn or reach towards it; nine
    coarse regions are what a person answers, and they mean the same on every frame size.
    """
    row, col = _third(obj.y, scene.height), _third(obj.x, scene.width)
    if row is None or col is None:
        return None
    return f"{ROWS_THIRDS[row]} {COLUMNS_THIRDS[col]}"


def locate_questions(scene: Scene) -> list[QA]:
    """Every "Where is the <colour> <shape>?" the scene answers unambiguously (unique referent,
    centre clear of the thirds' borders)."""
    out = []
    for o in _unique_pairs(scene):
        phrase = locate_phrase(scene, o)
        if phrase is not None:
            out.append(QA(f"Where is the {o.color} {o.shape}?", phrase, "locate"))
    return out


def positions_caption(scene: Scene) -> str | None:
    """Dense "where" caption: every object left to right as in `caption_objects`, each followed by
    its `locate_phrase` ("red circle top left, blue square middle right"); None when one object is
    too close to a third's border to name its region (never on the 4x4, 4x3 and 3x3 grids).

    Why: a dense task is what taught the nano models captions where VQA alone stayed at chance
    (shared/NANO_NOTES.md); this one asks for every object's position, which no other task does.
    """
    objs = _left_to_right(scene)
    if not objs:
        return EMPTY_CAPTION
    phrases = [locate_phrase(scene, o) for o in objs]
    if any(p is None for p in phrases):
        return None
    return ", ".join(f"{o.color} {o.shape} {p}" for o, p in zip(objs, phrases, strict=True))


def _ask_positions(scene: Scene, rng: np.random.Generator) -> QA | None:
    answer = positions_caption(scene)
    return None if answer is None else QA(POSITIONS_QUESTION, answer, "positions")


def _ask_locate(scene: Scene, rng: np.random.Generator) -> QA | None:
    candidates = locate_questions(scene)
    return _pick(rng, candidates) if candidates else None


def _ask_compare(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes, colors = _vocab(scene)
    shape_n = Counter(o.shape for o in scene.objects)
    color_n = Counter(o.color for o in scene.objects)
    by_answer: dict[str, list[QA]] = {"more": [], "fewer": [], "same": []}

    def add(n1: int, n2: int, what1: str, what2: str) -> None:
        if n1 == 0 and n2 == 0:
            return  # "same" about two absent things teaches nothing about the image
        answer = "more" if n1 > n2 else "fewer" if n1 < n2 else "same"
        question = f"Compared with {what2}, are there more, fewer or the same number of {what1}?"
        by_answer[answer].append(QA(question, answer, "compare"))

    for s1 in shapes:
        for s2 in shapes:
            if s1 != s2:
                add(shape_n[s1], shape_n[s2], _plural(s1), _plural(s2))
    for c1 in colors:
        for c2 in colors:
            if c1 != c2:
                add(color_n[c1], color_n[c2], f"{c1} objects", f"{c2} objects")
    answers = [a for a in ("more", "fewer", "same") if by_answer[a]]
    return _pick(rng, by_answer[_pick(rng, answers)]) if answers else None


def _ask_describe(scene: Scene, rng: np.random.Generator) -> QA | None:
    return QA(DESCRIBE_QUESTION, describe_scene(scene), "describe")


def _ask_caption(scene: Scene, rng: np.random.Generator) -> QA | None:
    return QA(CAPTION_QUESTION, caption_objects(scene), "caption")


_ASKERS: dict[str, Callable[[Scene, np.random.Generator], QA | None]] = {
    "attribute": _ask_attribute,
    "count": _ask_count,
    "exist": _ask_exist,
    "spatial": _ask_spatial,
    "compare": _ask_compare,
    "describe": _ask_describe,
    "caption": _ask_caption,
    "locate": _ask_locate,
    "positions": _ask_positions,
}


def question_type(question: str) -> str | None:
    """The template a generated question comes from ("attribute/shape", "count/color", ...), or
    None for any other text.

    Why: a family's accuracy hides a constant answer in one of its templates (a student that
    always says "circle" to every "What shape ...?" scores the prior there while the colour
    template is learned); evaluation reports every template separately with its top answers.
    """
    q = question.strip()
    if q == CAPTION_QUESTION:
        return "caption"
    if q == DESCRIBE_QUESTION:
        return "describe"
    if q == POSITIONS_QUESTION:
        return "positions"
    for prefix, kind in (("What color is the ", "attribute/color"), ("What shape is the ", "attribute/shape"),
                         ("What size is the ", "attribute/size")):
        if q.startswith(prefix):
            return kind
    if q.startswith("How many ") and q.endswith(" are there?"):
        what = q[len("How many "):-len(" are there?")].split()
        if what == ["objects"]:
            return "count/objects"
        if len(what) == 2 and what[1] == "objects":
            return "count/color"
        return "count/shape" if len(what) == 1 else "count/shape+color"
    if q.startswith("Is there "):
        return "exist"
    if q.startswith("Is the "):
        return "spatial/above-below" if (" above the " in q or " below the " in q) else "spatial/left-right"
    if q.startswith("Compared with "):
        return "compare"
    if q.startswith("Where is the "):
        return "locate"
    return None


def parse_families(families: str | Iterable[str]) -> tuple[str, ...]:
    """Validated, de-duplicated families from a list or a comma-separated string."""
    items = families.split(",") if isinstance(families, str) else list(families)
    out = tuple(dict.fromkeys(f.strip() for f in items if f.strip()))
    unknown = [f for f in out if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown question families {unknown}; choose from {list(FAMILIES)}")
    if not out:
        raise ValueError("no question families given")
    return out


def make_questions(
    scene: Scene, seed: int, families: Sequence[str] = FAMILIES, per_family: int = 1
) -> list[QA]:
    """Up to `per_family` distinct questions per family, in the order of `families`.

    Every candidate is built from the scene's objects with its answer computed alongside,
    and only unambiguous candidates exist (unique referents, separated centres), so a family
    that cannot be asked about this scene yields fewer questions (possibly none) instead of
    a wrong answer. Each family has its own random stream, so asking for fewer families does
    not change the questions of the others.
    """
    if per_family < 0:
        raise ValueError(f"per_family must be >= 0, got {per_family}")
    qas: list[QA] = []
    for family in parse_families(families) if per_family else ():
        rng = _rng(seed, _STREAM_QUESTIONS * 100 + FAMILIES.index(family))
        seen: set[str] = set()
        for _ in range(8 * per_family):
            qa = _ASKERS[family](scene, rng)
            if qa is None:
                break
            if qa.question not in seen:
                seen.add(qa.question)
                qas.append(qa)
                if len(seen) == per_family:
                    break
    return qas


# ---------------------------------------------------------------------------------------------
# Ground truth, corpora and datasets
# ---------------------------------------------------------------------------------------------


def scene_ground_truth(scene: Scene, qas: Sequence[QA]) -> dict[str, Any]:
    """JSON-serialisable record of a frame: what is in it and the exact answers about it.

    Published beside each synthetic camera frame and written beside each dataset image, so
    any answer can be traced to the image it describes. `scene_from_ground_truth` inverts it.
    """
    return {
        "width": scene.width,
        "height": scene.height,
        "size": [scene.width, scene.height],
        "seed": scene.seed,
        "background": list(scene.background),
        "gradient": list(scene.gradient),
        "noise": scene.noise,
        "shapes": list(scene.shapes),
        "colors": list(scene.colors),
        "objects": [asdict(o) for o in scene.objects],
        "description": describe_scene(scene),
        "caption": caption_objects(scene),
        "qas": [{"question": q.question, "answer": q.answer, "family": q.family} for q in qas],
    }


def scene_from_ground_truth(record: dict[str, Any]) -> Scene:
    """The Scene of a `scene_ground_truth` record (render it again to get the same pixels)."""
    return Scene(
        width=int(record["width"]),
        height=int(record["height"]),
        objects=[SceneObject(**o) for o in record["objects"]],
        seed=int(record["seed"]),
        background=tuple(record.get("background", (160, 160, 160))),
        gradient=tuple(record.get("gradient", (0.0, 0.0))),
        noise=float(record.get("noise", 0.0)),
        shapes=tuple(record.get("shapes", SHAPES)),
        colors=tuple(record.get("colors", COLORS)),
    )


def vocabulary_words() -> list[str]:
    """Every word questions and answers can use, so a tokenizer corpus covers rare ones too."""
    words = list(ALL_SHAPES) + [_plural(s) for s in ALL_SHAPES] + list(COLOR_RGB) + list(SIZES)
    words += [str(i) for i in range(21)] + list(_NUMBER_WORDS)
    words += ["yes", "no", "more", "fewer", "same", "object", "objects", EMPTY_CAPTION]
    words += [phrase for phrase, _, _ in _RELATIONS]
    return words


def corpus_texts(num_scenes: int, seed: int = 0) -> list[str]:
    """Questions, answers, descriptions and captions of `num_scenes` train scenes.

    Training text for the small models' BPE tokenizer; starts with one line of the whole
    vocabulary so words too rare to appear in a small sample still get merges.
    """
    texts = [" ".join(vocabulary_words())]
    for i in range(num_scenes):
        s = scene_seed("train", seed, i)
        scene = generate_scene(s)
        for qa in make_questions(scene, s, TOKENIZER_FAMILIES, per_family=2):
            texts.append(qa.question)
            texts.append(qa.answer)
    return texts


def image_name(split: str, index: int) -> str:
    """File name of dataset image `index` (zero-padded so names sort in index order)."""
    return f"{split}_{index:06d}.png"


def write_dataset(
    out_dir: str | Path,
    num_images: int,
    seed: int,
    split: str = "train",
    config: SceneConfig | None = None,
    families: Sequence[str] = FAMILIES,
    per_family: int = 1,
    progress: bool = False,
    open_forms: bool = False,
) -> Path:
    """Render `num_images` scenes to out_dir/images/ and write out_dir/<split>.json.

    The JSON is LLaVA conversation format, one record per question (records of one image
    share its file): {"id", "image" (relative to the JSON's folder), "conversations":
    [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": <answer>}],
    "family", "seed"}. out_dir/<split>_scenes.jsonl holds each image's full ground truth.
    Image i uses scene seed `scene_seed(split, seed, i)`; its questions use the same seed.
    `open_forms`: each answer rewritten in one random valid form, the generator's answer kept as
    "canonical_answer" (`vlsi_model.data.open_answers`). Both files are written to a temporary
    name first, so a crash never leaves a truncated JSON that looks complete. Returns the JSON path.
    """
    from PIL import Image  # only datasets need PIL; the camera path stays numpy-only

    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    scene_seed(split, seed, max(num_images - 1, 0))  # validates split, seed and range up front
    config = config or SceneConfig()
    config.validate()
    families = parse_families(families)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    json_path = out / f"{split}.json"
    scenes_path = out / f"{split}_scenes.jsonl"

    indices: Iterable[int] = range(num_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"scenes {split}", unit="img")

    records: list[dict[str, Any]] = []
    tmp_scenes = scenes_path.with_name(scenes_path.name + ".tmp")
    with tmp_scenes.open("w") as gt_file:
        for i in indices:
            s = scene_seed(split, seed, i)
            scene = generate_scene(s, config)
            rel = f"images/{image_name(split, i)}"
            Image.fromarray(render_scene(scene)).save(out / rel, format="PNG", compress_level=3)
            qas = make_questions(scene, s, families, per_family)
            for k, qa in enumerate(qas):
                records.append(
                    {
                        "id": f"{split}_{i:06d}_{k}",
                        "image": rel,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{qa.question}"},
                            {"from": "gpt", "value": qa.answer},
                        ],
                        "family": qa.family,
                        "seed": s,
                    }
                )
            gt_file.write(json.dumps({"image": rel, **scene_ground_truth(scene, qas)}) + "\n")
    if open_forms:
        from vlsi_model.data.open_answers import open_records

        records = open_records(records, seed=f"{split}:{seed}")
    tmp_json = json_path.with_name(json_path.name + ".tmp")
    with tmp_json.open("w") as f:  # one record per line: greppable, and half the size of indent=2
        f.write("[\n" + ",\n".join(json.dumps(r) for r in records) + ("\n]\n" if records else "]\n"))
    os.replace(tmp_scenes, scenes_path)
    os.replace(tmp_json, json_path)
    return json_path


__all__ = [
    "ALL_SHAPES",
    "question_type",
    "CAPTION_QUESTION",
    "COLORS",
    "COLOR_RGB",
    "DESCRIBE_QUESTION",
    "EXTRA_SHAPES",
    "FAMILIES",
    "MAX_RUN_SEED",
    "QA",
    "SEED_STRIDE",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TOKENIZER_FAMILIES",
    "TEST_SEED_OFFSET",
    "VAL_SEED_OFFSET",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "caption_objects",
    "corpus_texts",
    "describe_scene",
    "locate_phrase",
    "positions_caption",
    "POSITIONS_QUESTION",
    "locate_questions",
    "generate_scene",
    "image_name",
    "make_questions",
    "parse_families",
    "render_scene",
    "scene_from_ground_truth",
    "scene_ground_truth",
    "scene_seed",
    "vocabulary_words",
    "write_dataset",
]
