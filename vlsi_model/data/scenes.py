"""Seeded synthetic scenes: the synthetic camera's frames and the small VLMs' VQA data.

This module is the scene model (objects, placement, seeds); pixels are `render.py`, questions
`question_families.py`, ground truth and datasets `scene_dataset.py`.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Opt-in shapes (SceneConfig.shapes): distinguishable at 112 px, but the default data keeps the
# three shapes the small-model study was measured on.
EXTRA_SHAPES: tuple[str, ...] = ("diamond", "star")
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SIZES: tuple[str, ...] = ("small", "large")
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
STREAM_LAYOUT = 0
STREAM_NOISE = 1
STREAM_QUESTIONS = 2


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


def scene_rng(seed: int, stream: int) -> np.random.Generator:
    """The random stream `stream` (STREAM_*) of scene seed `seed`: independent per stream."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream])))


def pick_one(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    """One of `items`, drawn from `rng` (one integer draw, so streams stay reproducible)."""
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
    rng = scene_rng(seed, STREAM_LAYOUT)
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    specs = []
    for _ in range(n):
        shape, color, size = pick_one(rng, config.shapes), pick_one(rng, config.colors), pick_one(rng, config.sizes)
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


__all__ = [
    "ALL_SHAPES",
    "COLORS",
    "COLOR_RGB",
    "EXTRA_SHAPES",
    "MAX_RUN_SEED",
    "SEED_STRIDE",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "STREAM_LAYOUT",
    "STREAM_NOISE",
    "STREAM_QUESTIONS",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "TEST_SEED_OFFSET",
    "VAL_SEED_OFFSET",
    "generate_scene",
    "pick_one",
    "scene_rng",
    "scene_seed",
]
