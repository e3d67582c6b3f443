"""Synthetic scenes written as data: ground-truth records and LLaVA-format datasets.

The ground-truth record of a frame (`scene_ground_truth`) is what the synthetic camera publishes
beside each frame and what `write_dataset` writes beside each image, so any answer can be traced
to the scene it describes and the frame re-rendered byte for byte (`scene_from_ground_truth`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlsi_model.data.question_families import (
    FAMILIES,
    QA,
    caption_objects,
    describe_scene,
    make_questions,
    parse_families,
)
from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import COLORS, SHAPES, Scene, SceneConfig, SceneObject, generate_scene, scene_seed


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
    "image_name",
    "scene_from_ground_truth",
    "scene_ground_truth",
    "write_dataset",
]
