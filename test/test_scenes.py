"""Tests of the synthetic scene generator, answer normalisation and `vlsi data scenes`.

The central checks do not trust the generator's bookkeeping: objects are decoded back from
the rendered pixels (connected components of each palette colour, shape from how much of
its bounding box a component fills), and every question is re-answered from those decoded
objects by parsing the question text. A wrong mask, a swapped axis, a miscount or an
ambiguous referent shows up as a disagreement with the pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlsi_model import cli
from vlsi_model.answers import exact_match, normalize_answer
from vlsi_model.data.question_families import (
    CAPTION_QUESTION,
    DESCRIBE_QUESTION,
    FAMILIES,
    POSITIONS_QUESTION,
    QA,
    TOKENIZER_FAMILIES,
    caption_objects,
    corpus_texts,
    describe_scene,
    locate_phrase,
    locate_questions,
    make_questions,
    positions_caption,
)
from vlsi_model.data.render import render_scene
from vlsi_model.data.scene_dataset import scene_from_ground_truth, scene_ground_truth, write_dataset
from vlsi_model.data.scenes import (
    ALL_SHAPES,
    COLOR_RGB,
    COLORS,
    MAX_RUN_SEED,
    SEED_STRIDE,
    SHAPES,
    SIZES,
    TEST_SEED_OFFSET,
    VAL_SEED_OFFSET,
    Scene,
    SceneConfig,
    SceneObject,
    generate_scene,
    scene_seed,
)

BIG = SceneConfig(width=640, height=480)
GRID = SceneConfig(layout="grid")  # the nano family's data: 4x4 cells of 28 px at 112x112
GRID_BIG = SceneConfig(width=640, height=480, layout="grid", grid=(4, 3))  # the synthetic camera's default


# ------------------------------------------------------------------------------------------
# Independent oracle: objects decoded from pixels, questions answered from them
# ------------------------------------------------------------------------------------------


@dataclass
class Decoded:
    color: str
    shape: str
    size: str
    cx: float
    cy: float
    half: float  # half of the larger bounding-box side
    box: tuple[int, int, int, int]  # left, top, right, bottom pixel edges


def decode_objects(img: np.ndarray, config: SceneConfig | None = None) -> list[Decoded]:
    """Objects as the pixels show them (noise-free renders only); `config` (default: the random
    layout at the image's size) sets the radius between the small and the large size."""
    config = config or SceneConfig(width=img.shape[1], height=img.shape[0])
    small, large = config.radius_ranges()
    size_threshold = (small[1] + large[0]) / 2 * config.reference_length()
    out = []
    for color, rgb in COLOR_RGB.items():
        mask = np.all(img == np.asarray(rgb, dtype=np.uint8), axis=2).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for k in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[k])
            fill = area / (w * h)
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            half = max(w, h) / 2
            size = "large" if half > size_threshold else "small"
            out.append(Decoded(color, shape, size, x + w / 2, y + h / 2, half, (x, y, x + w, y + h)))
    return out


def _the(objs: list[Decoded], **attrs: str) -> Decoded:
    found = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
    assert len(found) == 1, f"referent {attrs} is not unique in the image: {found}"
    return found[0]


def _count(objs: list[Decoded], what: str) -> int:
    """Objects matching 'red objects', 'circles' or 'red circles'."""
    words = what.split()
    if words[-1] == "objects":
        return sum(o.color == words[0] for o in objs) if len(words) == 2 else len(objs)
    shape = words[-1][:-1]
    color = words[0] if len(words) == 2 else None
    return sum(o.shape == shape and (color is None or o.color == color) for o in objs)


def _order_matches(items: list[tuple[str, ...]], objs: list[Decoded], key) -> bool:
    """`items` lists `objs` left to right; objects whose centres are < 1 px apart may swap."""
    objs = sorted(objs, key=lambda o: o.cx)
    if len(items) != len(objs):
        return False
    i = 0
    while i < len(objs):
        j = i + 1
        while j < len(objs) and objs[j].cx - objs[j - 1].cx < 1.0:
            j += 1
        if sorted(items[i:j]) != sorted(key(o) for o in objs[i:j]):
            return False
        i = j
    return True


def _region(o: Decoded, frame: tuple[int, int]) -> str:
    """"<row> <column>" of the frame's thirds holding the decoded centre; asserts it is clear of
    the thirds' borders (the generator only names unambiguous regions)."""
    words = []
    for centre, extent, names in ((o.cy, frame[1], ("top", "middle", "bottom")),
                                  (o.cx, frame[0], ("left", "center", "right"))):
        third = centre / extent * 3
        assert min(abs(third - 1), abs(third - 2)) > 0.08, o
        words.append(names[int(third)])
    return " ".join(words)


def oracle_check(qa: QA, objs: list[Decoded], frame: tuple[int, int]) -> None:
    """Assert that `qa` is unambiguous and correctly answered for the objects decoded from a
    frame of `frame` (width, height) pixels."""
    q, a = qa.question, qa.answer
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        assert a == _the(objs, shape=m[1]).color
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        assert a == _the(objs, color=m[1]).shape
    elif m := re.fullmatch(r"What size is the (\w+) (\w+)\?", q):
        assert a == _the(objs, color=m[1], shape=m[2]).size
    elif m := re.fullmatch(r"How many ((?:\w+ )?\w+) are there\?", q):
        assert a == str(_count(objs, m[1]))
    elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        assert a == ("yes" if any(o.color == m[1] and o.shape == m[2] for o in objs) else "no")
    elif m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", q):
        p, r = _the(objs, color=m[1], shape=m[2]), _the(objs, color=m[4], shape=m[5])
        horizontal = m[3] in ("left of", "right of")
        delta = (r.cx - p.cx) if horizontal else (r.cy - p.cy)
        # Unambiguous: well separated along the asked axis (decoded extents are +-1 px).
        assert abs(delta) > 1.5 * max(p.half, r.half) - 2
        truth = delta > 0 if m[3] in ("left of", "above") else delta < 0
        assert a == ("yes" if truth else "no")
    elif m := re.fullmatch(r"Compared with (.+), are there more, fewer or the same number of (.+)\?", q):
        n2, n1 = _count(objs, m[1]), _count(objs, m[2])
        assert a == ("more" if n1 > n2 else "fewer" if n1 < n2 else "same")
    elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        assert a == _region(_the(objs, color=m[1], shape=m[2]), frame), (q, a)
    elif q == POSITIONS_QUESTION:
        items = [tuple(item.split()) for item in a.split(", ")]
        assert all(len(item) == 4 for item in items), a
        assert _order_matches(items, objs, lambda o: (o.color, o.shape, *_region(o, frame).split()))
    elif q == DESCRIBE_QUESTION:
        head = normalize_answer(a).split(" objects" if len(objs) != 1 else " object")[0]
        assert head == (f"there are {len(objs)}" if len(objs) != 1 else "there is 1")
        items = re.findall(r"\ban? (small|large) (\w+) (\w+)", a)
        assert _order_matches(items, objs, lambda o: (o.size, o.color, o.shape))
    elif q == CAPTION_QUESTION:
        words = a.split()
        assert len(words) % 2 == 0, a
        items = list(zip(words[::2], words[1::2], strict=True))
        assert _order_matches(items, objs, lambda o: (o.color, o.shape))
    else:
        raise AssertionError(f"question the oracle cannot parse: {q!r}")


def _scenes(n: int, config: SceneConfig | None = None, start: int = 0) -> list[Scene]:
    return [generate_scene(start + i, config) for i in range(n)]


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


# Run here and in fresh interpreters with other PYTHONHASHSEEDs; prints one JSON line.
FINGERPRINT = """
import hashlib, json
from vlsi_model.data.scenes import ALL_SHAPES, SceneConfig, generate_scene
from vlsi_model.data.render import render_scene
from vlsi_model.data.question_families import make_questions
out = []
for s in range(12):
    for config in (None, SceneConfig(width=160, height=96, noise=4.0, shapes=ALL_SHAPES)):
        scene = generate_scene(s, config)
        digest = hashlib.sha256(render_scene(scene).tobytes()).hexdigest()
        qas = [[q.question, q.answer, q.family] for q in make_questions(scene, s, per_family=2)]
        out.append([digest, qas])
print(json.dumps(out))
"""


def test_same_seed_same_pixels_and_questions_in_process() -> None:
    for s in (0, 7, 123456):
        a, b = generate_scene(s), generate_scene(s)
        assert a == b
        assert render_scene(a).tobytes() == render_scene(b).tobytes()
        assert make_questions(a, s, per_family=3) == make_questions(b, s, per_family=3)


def test_same_seed_same_output_across_processes(capsys: pytest.CaptureFixture) -> None:
    """Catches order that depends on Python's per-process string hashing (set iteration)."""
    exec(FINGERPRINT, {})
    expected = json.loads(capsys.readouterr().out)
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        cmd = [sys.executable, "-c", FINGERPRINT]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(done.stdout) == expected


def test_different_seeds_differ() -> None:
    scenes = _scenes(40)
    assert len({hashlib.sha256(render_scene(s).tobytes()).digest() for s in scenes}) == 40
    assert len({caption_objects(s) for s in scenes}) > 30
    q = [tuple(make_questions(s, s.seed)) for s in scenes]
    assert len(set(q)) == 40


# ------------------------------------------------------------------------------------------
# Rendering and layout, checked against the pixels
# ------------------------------------------------------------------------------------------


def _assert_pixels_match(scene: Scene, img: np.ndarray, config: SceneConfig | None = None) -> None:
    assert img.shape == (scene.height, scene.width, 3) and img.dtype == np.uint8
    assert img.flags["C_CONTIGUOUS"]
    for o in scene.objects:
        assert tuple(img[int(o.y), int(o.x)]) == COLOR_RGB[o.color], o
    decoded = decode_objects(img, config)
    assert len(decoded) == len(scene.objects)
    for o in scene.objects:
        d = min(decoded, key=lambda d: (d.cx - o.x) ** 2 + (d.cy - o.y) ** 2)
        assert (d.color, d.shape, d.size) == (o.color, o.shape, o.size), (d, o)
        # Pixels whose centres lie inside the shape: each edge of the blob is within half a
        # pixel of the true extent; a triangle's rows are sampled where it is narrower (its
        # base row up to 1 px in from each corner, its apex row up to 1.5 px below the apex).
        left, top, right, bottom = d.box
        side_slack, top_slack = (1.05, 2.05) if o.shape == "triangle" else (0.55, 0.55)
        assert abs(left - (o.x - o.radius)) <= side_slack, (d, o)
        assert abs(right - (o.x + o.radius)) <= side_slack, (d, o)
        assert abs(top - (o.y - o.radius)) <= top_slack, (d, o)
        assert abs(bottom - (o.y + o.radius)) <= 0.55, (d, o)


@pytest.mark.parametrize("config", [None, BIG], ids=["112", "640x480"])
def test_pixels_show_exactly_the_scene_objects(config: SceneConfig | None) -> None:
    for scene in _scenes(60 if config is None else 12, config):
        _assert_pixels_match(scene, render_scene(scene))


def _assert_layout(scene: Scene, config: SceneConfig) -> None:
    gap = config.gap_px()
    side = config.reference_length()
    small, large = config.radius_ranges()
    assert config.min_objects <= len(scene.objects) <= config.max_objects
    for o in scene.objects:
        assert gap <= o.x - o.radius and o.x + o.radius <= scene.width - gap, o
        assert gap <= o.y - o.radius and o.y + o.radius <= scene.height - gap, o
        lo, hi = small if o.size == "small" else large
        assert lo * side - 0.01 <= o.radius <= hi * side + 0.01, o
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            reach = a.radius + b.radius + gap
            assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach, (a, b)


def test_no_overlap_and_inside_even_when_crowded() -> None:
    for config in (SceneConfig(), SceneConfig(min_objects=6, max_objects=12), BIG, GRID, GRID_BIG,
                   SceneConfig(layout="grid", min_objects=16, max_objects=16)):
        for scene in _scenes(40, config):
            _assert_layout(scene, config)


@pytest.mark.parametrize("config", [GRID, GRID_BIG], ids=["112", "640x480"])
def test_grid_layout_puts_one_object_on_each_chosen_cell(config: SceneConfig) -> None:
    """Each object is centred on its own cell and stays inside it, so at 112x112 it is exactly one
    28-px image token; sizes stay distinguishable; every cell is used over many scenes."""
    cell_w, cell_h = config.cell_size()
    used = Counter()
    sizes = {"small": [], "large": []}
    for scene in _scenes(120, config):
        cells = []
        for o in scene.objects:
            col, row = (o.x / cell_w) - 0.5, (o.y / cell_h) - 0.5
            assert abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6, o
            assert o.radius + config.gap_px() <= min(cell_w, cell_h) / 2, o
            cells.append((round(col), round(row)))
            sizes[o.size].append(o.radius)
        assert len(set(cells)) == len(cells)
        used.update(cells)
        _assert_pixels_match(scene, render_scene(scene), config)
    assert len(used) == config.grid[0] * config.grid[1]
    assert max(sizes["small"]) * 1.3 <= min(sizes["large"])


def test_grid_layout_questions_agree_with_the_pixels() -> None:
    for scene in _scenes(60, GRID, start=500):
        objs = decode_objects(render_scene(scene), GRID)
        for qa in make_questions(scene, scene.seed, per_family=3):
            oracle_check(qa, objs, (scene.width, scene.height))


def test_grid_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="layout"):
        SceneConfig(layout="hexagonal").validate()
    with pytest.raises(ValueError, match="exceeds the 2x2 grid"):
        SceneConfig(layout="grid", grid=(2, 2), max_objects=5).validate()
    with pytest.raises(ValueError, match="too large for the grid cells"):
        SceneConfig(layout="grid", grid_large_radius=(0.45, 0.5)).validate()
    with pytest.raises(ValueError, match="grid_large_radius must be at least 1.3x"):
        SceneConfig(layout="grid", grid_small_radius=(0.3, 0.33)).validate()


@settings(max_examples=30, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**63),
    width=st.integers(48, 360),
    height=st.integers(48, 360),
    max_objects=st.integers(0, 6),
    background=st.sampled_from(["plain", "gradient"]),
)
def test_layout_and_pixels_for_any_size(
    seed: int, width: int, height: int, max_objects: int, background: str
) -> None:
    config = SceneConfig(width, height, min_objects=0, max_objects=max_objects, background=background)
    scene = generate_scene(seed, config)
    _assert_layout(scene, config)
    img = render_scene(scene)
    assert img.shape == (height, width, 3)
    for o in scene.objects:
        assert tuple(img[int(o.y), int(o.x)]) == COLOR_RGB[o.color], o
    for color in COLORS:  # one separate blob per object: nothing touches, nothing is cut
        mask = np.all(img == np.asarray(COLOR_RGB[color], dtype=np.uint8), axis=2).astype(np.uint8)
        n = cv2.connectedComponentsWithStats(mask, connectivity=8)[0] - 1
        assert n == sum(o.color == color for o in scene.objects)
    for qa in make_questions(scene, seed):
        assert qa.answer


def test_extra_shapes_render_as_separate_solid_objects() -> None:
    config = SceneConfig(shapes=ALL_SHAPES)
    seen = Counter()
    for scene in _scenes(30, config):
        img = render_scene(scene)
        for o in scene.objects:
            assert tuple(img[int(o.y), int(o.x)]) == COLOR_RGB[o.color]
            seen[o.shape] += 1
        for color in COLORS:
            mask = np.all(img == np.asarray(COLOR_RGB[color], dtype=np.uint8), axis=2).astype(np.uint8)
            blobs = cv2.connectedComponentsWithStats(mask)[0] - 1
            assert blobs == sum(o.color == color for o in scene.objects)
        for qa in make_questions(scene, scene.seed):
            assert qa.answer
    assert set(seen) == set(ALL_SHAPES)
    fills = {}
    for shape in ALL_SHAPES:  # filled fraction of the bounding box tells every shape apart
        scene = Scene(112, 112, [SceneObject(shape, "red", "large", 56, 56, 15.0)], seed=0)
        fills[shape] = float(np.all(render_scene(scene) == COLOR_RGB["red"], axis=2).sum()) / 900
    assert fills["square"] > 0.95 and 0.72 < fills["circle"] < 0.85
    assert 0.4 < fills["triangle"] < 0.6 and 0.4 < fills["diamond"] < 0.6 and fills["star"] < 0.4


def test_noise_knob_is_seeded_and_light() -> None:
    clean = generate_scene(5)
    noisy = generate_scene(5, SceneConfig(noise=4.0))
    assert noisy.objects == clean.objects
    a, b = render_scene(noisy), render_scene(noisy)
    assert a.tobytes() == b.tobytes()
    diff = np.abs(a.astype(int) - render_scene(clean).astype(int))
    assert 0 < diff.mean() < 6


def test_sizes_are_clearly_different() -> None:
    radii = {size: [] for size in SIZES}
    for scene in _scenes(100):
        for o in scene.objects:
            radii[o.size].append(o.radius)
    assert min(radii["large"]) > 1.4 * max(radii["small"])


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="min_objects"):
        generate_scene(0, SceneConfig(min_objects=3, max_objects=2))
    with pytest.raises(ValueError, match="unknown shapes"):
        generate_scene(0, SceneConfig(shapes=("hexagon",)))
    with pytest.raises(ValueError, match="cannot place"):
        generate_scene(0, SceneConfig(min_objects=30, max_objects=30, sizes=("large",)))
    with pytest.raises(ValueError, match="seed"):
        generate_scene(-1)


# ------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, BIG], ids=["112", "640x480"])
def test_every_answer_agrees_with_the_pixels(config: SceneConfig | None) -> None:
    for scene in _scenes(80 if config is None else 10, config, start=1000):
        objs = decode_objects(render_scene(scene))
        for qa in make_questions(scene, scene.seed, per_family=3):
            oracle_check(qa, objs, (scene.width, scene.height))


def test_every_family_is_produced() -> None:
    families = Counter(qa.family for s in _scenes(10) for qa in make_questions(s, s.seed))
    assert set(families) == set(FAMILIES)


def test_answer_balance_over_300_scenes() -> None:
    answers: dict[str, Counter] = {f: Counter() for f in FAMILIES}
    for s in _scenes(300, start=5000):
        for qa in make_questions(s, s.seed):
            answers[qa.family][qa.answer] += 1
    for family in ("exist", "spatial"):
        c = answers[family]
        assert set(c) == {"yes", "no"}
        assert 0.4 <= c["yes"] / (c["yes"] + c["no"]) <= 0.6, (family, c)
    assert sum(answers["spatial"].values()) > 150  # askable in most scenes, not skipped
    assert set(answers["compare"]) == {"more", "fewer", "same"}
    assert min(answers["compare"].values()) > 30
    counts = answers["count"]
    assert "0" in counts and counts["0"] < 0.4 * sum(counts.values())
    assert set(answers["attribute"]) >= set(COLORS) | set(SHAPES) | set(SIZES)
    # All nine regions are answers, none dominates, and most scenes can be asked.
    locate = answers["locate"]
    assert set(locate) == {f"{r} {c}" for r in ("top", "middle", "bottom") for c in ("left", "center", "right")}
    assert max(locate.values()) < 0.25 * sum(locate.values()) and sum(locate.values()) > 250, locate


def test_answers_are_already_normalised() -> None:
    for s in _scenes(60):
        for qa in make_questions(s, s.seed, per_family=2):
            if qa.family not in ("describe", "positions"):  # sentences with punctuation
                assert normalize_answer(qa.answer) == qa.answer, qa
            assert qa.answer == qa.answer.strip() and qa.answer
            assert qa.question.endswith("?") or qa.question == DESCRIBE_QUESTION


def test_locate_names_the_third_of_the_frame_and_skips_borderline_objects() -> None:
    def scene_with(x: float, y: float, width: int = 300, height: int = 150) -> Scene:
        objs = [SceneObject("circle", "red", "small", x, y, 5.0), SceneObject("square", "blue", "small", 5.0, 5.0, 3.0)]
        return Scene(seed=0, width=width, height=height, objects=objs)

    assert locate_phrase(scene_with(20, 20), scene_with(20, 20).objects[0]) == "top left"
    assert locate_phrase(scene_with(150, 75), scene_with(150, 75).objects[0]) == "middle center"
    assert locate_phrase(scene_with(290, 140), scene_with(290, 140).objects[0]) == "bottom right"
    assert locate_phrase(scene_with(220, 30), scene_with(220, 30).objects[0]) == "top right"  # x 0.73 > 2/3
    border = scene_with(101, 75)  # x 0.337: on the left/center border
    assert locate_phrase(border, border.objects[0]) is None
    assert [qa.question for qa in locate_questions(border)] == ["Where is the blue square?"]
    # The nano grids: 4 columns are left/center/center/right, 4 rows top/middle/middle/bottom, the
    # camera's 3 rows top/middle/bottom; every object is named.
    square = SceneConfig(layout="grid", min_objects=5, max_objects=5)
    camera = SceneConfig(width=640, height=480, layout="grid", grid=(4, 3), min_objects=5, max_objects=5)
    for config, rows in ((square, ["top", "middle", "middle", "bottom"]), (camera, ["top", "middle", "bottom"])):
        cell_w, cell_h = config.cell_size()
        for seed in range(20):
            grid = generate_scene(seed, config)
            for o in grid.objects:
                col, row = int(o.x // cell_w), int(o.y // cell_h)
                assert locate_phrase(grid, o) == f"{rows[row]} {['left', 'center', 'center', 'right'][col]}"
    # A 5x5 grid centres its second column at 0.30 of the width, too close to the border to name.
    fine = SceneConfig(width=140, height=140, layout="grid", grid=(5, 5))
    assert locate_phrase(Scene(140, 140, [SceneObject("circle", "red", "small", 42.0, 70.0, 5.0)], seed=0),
                         SceneObject("circle", "red", "small", 42.0, 70.0, 5.0)) is None
    assert fine.cell_size()[0] * 1.5 == 42.0


def test_tokenizer_corpus_leaves_out_families_added_after_the_shipped_tokenizer() -> None:
    # The shipped students' tokenizer was trained on TOKENIZER_FAMILIES' text; a corpus with
    # "Where is ...?" would train other merges and the reproduction script another tokenizer.
    assert "locate" in FAMILIES and "locate" not in TOKENIZER_FAMILIES
    assert not any(t.startswith("Where is") for t in corpus_texts(50))


def test_families_selection_per_family_and_independent_streams() -> None:
    scene = generate_scene(11, SceneConfig(min_objects=4, max_objects=5))
    everything = make_questions(scene, 3, per_family=3)
    only = make_questions(scene, 3, families=["count", "exist"], per_family=3)
    assert only == [q for q in everything if q.family in ("count", "exist")]
    assert [q.family for q in only] == ["count"] * 3 + ["exist"] * 3
    assert len({q.question for q in only}) == 6
    assert len([q for q in everything if q.family == "describe"]) == 1  # only one such question exists
    assert make_questions(scene, 3, per_family=0) == []
    with pytest.raises(ValueError, match="unknown question families"):
        make_questions(scene, 3, families=["colour"])


def test_family_skipped_when_it_cannot_be_asked() -> None:
    same = [SceneObject("circle", "red", "small", 20.0 + 30 * i, 50.0, 8.0) for i in range(3)]
    scene = Scene(112, 112, same, seed=0)
    qas = make_questions(scene, 0, per_family=2)
    families = {q.family for q in qas}
    assert "spatial" not in families and "locate" not in families  # three identical red circles: no unique referent
    assert "attribute" not in families
    assert {q.answer for q in qas if q.family == "exist"} <= {"yes", "no"}
    empty = Scene(112, 112, [], seed=0)
    for qa in make_questions(empty, 0, per_family=2):
        assert qa.family in ("count", "exist", "describe", "caption", "positions")
        assert qa.answer in ("0", "no", "There are no objects.", "nothing")


def test_description_and_caption_text() -> None:
    objs = [
        SceneObject("square", "blue", "small", 80.0, 30.0, 8.0),
        SceneObject("circle", "red", "large", 30.0, 60.0, 15.0),
        SceneObject("triangle", "green", "small", 60.0, 90.0, 8.0),
    ]
    scene = Scene(112, 112, objs, seed=0)
    assert caption_objects(scene) == "red circle green triangle blue square"
    assert describe_scene(scene) == (
        "There are three objects: a large red circle, a small green triangle and a small blue square."
    )
    one = Scene(112, 112, objs[:1], seed=0)
    assert describe_scene(one) == "There is one object: a small blue square."
    assert positions_caption(scene) == "red circle middle left, green triangle bottom center, blue square top right"
    assert positions_caption(Scene(112, 112, [], seed=0)) == "nothing"
    border = Scene(112, 112, [*objs, SceneObject("circle", "blue", "small", 38.0, 15.0, 5.0)], seed=0)
    assert positions_caption(border) is None  # x 0.34: no one region to name
    assert [qa.family for qa in make_questions(border, 0, ["positions", "caption"])] == ["caption"]


# ------------------------------------------------------------------------------------------
# Ground truth, corpus, datasets and the CLI
# ------------------------------------------------------------------------------------------


def test_ground_truth_is_json_and_round_trips() -> None:
    scene = generate_scene(42, SceneConfig(noise=2.0))
    qas = make_questions(scene, 42)
    record = json.loads(json.dumps(scene_ground_truth(scene, qas)))
    assert record["size"] == [112, 112] and record["seed"] == 42
    assert len(record["objects"]) == len(scene.objects)
    assert set(record["objects"][0]) == {"shape", "color", "size", "x", "y", "radius"}
    assert record["description"] == describe_scene(scene)
    assert record["qas"] == [{"question": q.question, "answer": q.answer, "family": q.family} for q in qas]
    again = scene_from_ground_truth(record)
    assert again == scene
    assert render_scene(again).tobytes() == render_scene(scene).tobytes()


def test_corpus_texts_cover_all_templates() -> None:
    texts = corpus_texts(30, seed=0)
    assert texts == corpus_texts(30, seed=0)
    joined = "\n".join(texts)
    for needle in ("What color is the", "How many", "Is there a", "left of", "Compared with",
                   DESCRIBE_QUESTION, CAPTION_QUESTION, "There are", "purple", "triangle", "yes", "no"):
        assert needle in joined, needle


def test_split_seeds_are_disjoint() -> None:
    assert scene_seed("test", 0, 5) == TEST_SEED_OFFSET + 5
    assert scene_seed("train", 2, 5) == 2 * SEED_STRIDE + 5
    assert scene_seed("train", MAX_RUN_SEED, SEED_STRIDE - 1) < TEST_SEED_OFFSET
    assert scene_seed("test", MAX_RUN_SEED, SEED_STRIDE - 1) < VAL_SEED_OFFSET
    for bad in (("train", MAX_RUN_SEED + 1, 0), ("train", 0, SEED_STRIDE), ("dev", 0, 0), ("test", -1, 0)):
        with pytest.raises(ValueError):
            scene_seed(*bad)


def _load(json_path: Path) -> list[dict]:
    records = json.loads(json_path.read_text())
    assert isinstance(records, list) and records
    for r in records:
        assert set(r) == {"id", "image", "conversations", "family", "seed"}
        assert isinstance(r["id"], str) and isinstance(r["seed"], int) and r["family"] in FAMILIES
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert (json_path.parent / r["image"]).is_file()
    assert len({r["id"] for r in records}) == len(records)
    return records


def test_write_dataset_format_and_pixels(tmp_path: Path) -> None:
    json_path = write_dataset(tmp_path, 5, seed=3, split="train", per_family=2)
    assert json_path == tmp_path / "train.json"
    records = _load(json_path)
    assert {r["image"] for r in records} == {f"images/train_{i:06d}.png" for i in range(5)}
    for r in records:  # PNG is lossless: the file is the render of the recorded seed
        scene = generate_scene(r["seed"])
        png = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"))
        assert png.tobytes() == render_scene(scene).tobytes()
        qas = make_questions(scene, r["seed"], per_family=2)
        question = r["conversations"][0]["value"].split("\n", 1)[1]
        assert QA(question, r["conversations"][1]["value"], r["family"]) in qas
    truth = [json.loads(line) for line in (tmp_path / "train_scenes.jsonl").read_text().splitlines()]
    assert [t["image"] for t in truth] == [f"images/train_{i:06d}.png" for i in range(5)]
    assert sum(len(t["qas"]) for t in truth) == len(records)


def test_train_and_test_splits_share_no_scene(tmp_path: Path) -> None:
    train = _load(write_dataset(tmp_path, 4, seed=0, split="train", families=["caption"]))
    test = _load(write_dataset(tmp_path, 4, seed=0, split="test", families=["caption"]))
    assert not {r["seed"] for r in train} & {r["seed"] for r in test}
    assert {r["seed"] for r in test} == {TEST_SEED_OFFSET + i for i in range(4)}


@pytest.fixture
def data_cli(monkeypatch: pytest.MonkeyPatch):
    """`vlsi` with only the data command, so these tests do not depend on other commands' imports."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("data",))
    return cli.main


def test_cli_data_scenes(tmp_path: Path, data_cli, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    rc = data_cli(["data", "scenes", "--out", str(out), "--num", "3", "--seed", "1", "--split", "test",
                   "--size", "96x64", "--min-objects", "2", "--max-objects", "3",
                   "--families", "count,exist,caption", "--per-family", "2"])  # fmt: skip
    assert rc == 0
    records = _load(out / "test.json")
    assert Counter(r["family"] for r in records) == {"count": 6, "exist": 6, "caption": 3}
    assert {r["seed"] for r in records} == {scene_seed("test", 1, i) for i in range(3)}
    img = np.asarray(Image.open(out / records[0]["image"]))
    assert img.shape == (64, 96, 3)
    printed = capsys.readouterr().out
    assert str(out / "test.json") in printed and "count" in printed and "15 questions" in printed


def test_cli_data_scenes_grid_layout(tmp_path: Path, data_cli) -> None:
    out = tmp_path / "grid"
    rc = data_cli(["data", "scenes", "--out", str(out), "--num", "4", "--layout", "grid", "--grid", "4x3",
                   "--size", "112x84", "--families", "caption"])  # fmt: skip
    assert rc == 0
    for line in (out / "train_scenes.jsonl").read_text().splitlines():
        for o in json.loads(line)["objects"]:
            assert (o["x"] - 14) % 28 == 0 and (o["y"] - 14) % 28 == 0, o


def test_cli_data_scenes_rejects_bad_settings(
    tmp_path: Path, data_cli, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        data_cli(["data", "scenes", "--out", str(tmp_path), "--num", "2", "--families", "count,colour"])
    assert exc.value.code == 2
    args = ["data", "scenes", "--out", str(tmp_path), "--num", "2", "--min-objects", "4", "--max-objects=2"]
    rc = data_cli(args)
    assert rc == 2 and "min_objects" in capsys.readouterr().err
    assert not (tmp_path / "train.json").exists()


# ------------------------------------------------------------------------------------------
# Answer normalisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("Two.", "2"),
        ("  The   Red  ", "red"),
        ("a circle", "circle"),
        ("An apple", "apple"),
        ("Yes!", "yes"),
        ("no", "no"),
        ("ZERO", "0"),
        ("twenty", "20"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("the", "the"),
        ("Red circle, blue square.", "red circle blue square"),
        ("Don't know", "dont know"),
        ("There are three objects: a large red circle.", "there are 3 objects a large red circle"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal
    assert normalize_answer(normal) == normal


def test_exact_match() -> None:
    assert exact_match("Two", "2")
    assert exact_match("The circle.", "circle")
    assert exact_match(" YES ", "yes")
    assert not exact_match("red", "blue")
    assert not exact_match("2", "12")
    assert not exact_match("no", "0")
