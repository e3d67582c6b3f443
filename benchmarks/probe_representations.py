"""Where a nano model loses an attribute: linear probes on its hidden states, layer by layer.

    python benchmarks/probe_representations.py --model runs/nano/student/final \
        --scenes 400 --out runs/probes/student

Why: the shipped student answers "small" to every size question, yet answers shape questions
perfectly. This tells apart the two places the failure can sit:

* object probe: at each object's own image token (grid layout: one object per token), from the
  vision tower's output (layer 0, what the language model receives) through every decoder
  layer, can the object's shape, colour and size be read by a linear classifier? And its column
  and row in the token grid, which the spatial questions need?
* question probe: at the last prompt token (the newline after `assistant`, where the answer's
  first token is predicted) of "What size is the <colour> <shape>?",
  "What shape is the <colour> object?" and "What color is the <shape>?", can the asked
  attribute of the named object be read?

The last layer's states are taken after the final norm (as transformers returns them), the
others from the residual stream.

An attribute readable at the object but not at the question means the model sees it and does
not fetch it (a lookup not learned); unreadable already at layer 0 means the vision tower
loses it. Scenes come from the test split's seeds (never trained on); each probe is fitted on
70% of the scenes and scored on the other 30%, so objects of one scene never sit on both sides.

The probe is a multinomial logistic regression fitted by full-batch L-BFGS in torch, written
here because scikit-learn is not a dependency of the project and the fit is ten lines.
Output: probes.json and probes.md (held-out accuracy per layer, with the majority-class prior,
and the share of the features' variance between the classes: readable is not the same as loud).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vlsi_model.checkpoint import load_model_dir
from vlsi_model.data.question_families import attribute_questions
from vlsi_model.data.render import render_scene
from vlsi_model.data.scenes import Scene, SceneConfig, generate_scene, scene_seed
from vlsi_model.prompting import IMAGE_TOKEN, build_inputs

OBJECT_ATTRIBUTES = ("shape", "color", "size")
# Where the object is: the column and row of its image token in the merged token grid. The spatial
# questions ("Is the red circle left of the blue square?") need them, and nothing in Qwen2-VL adds an
# absolute position to a token's features (2D RoPE in the vision tower, M-RoPE in the LM rotate
# queries and keys only), so whether they are readable is an open question per model.
OBJECT_POSITIONS = ("column", "row")
QUESTION_ATTRIBUTES = ("size", "shape", "color")  # question_families.attribute_questions


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                     num_classes: int, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of an L2-regularised logistic regression on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x_train.shape[1], num_classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x_train), y_train)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((probe(x_test).argmax(1) == y_test).float().mean())


def object_token(scene: Scene, grid_thw: torch.Tensor, merge_size: int = 2) -> list[int]:
    """Index among the merged image tokens (row-major) of the token holding each object's centre.

    The token grid comes from the processor (`image_grid_thw`), so a resize is accounted for."""
    rows, cols = int(grid_thw[0, 1]) // merge_size, int(grid_thw[0, 2]) // merge_size
    return [min(int(o.y / scene.height * rows), rows - 1) * cols + min(int(o.x / scene.width * cols), cols - 1)
            for o in scene.objects]


def hidden_states(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[layer 0 (the decoder's input embeddings), layer 1, ..., layer L], each [seq, hidden]."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    return [h[0].float() for h in out.hidden_states]


def collect(model_dir: Path, num_scenes: int, seed: int) -> dict:
    """Per-layer features and labels for both probes, and the scene each row came from."""
    model, tokenizer, processor = load_model_dir(model_dir)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = SceneConfig(layout="grid")
    rows: dict[str, dict[str, list]] = {f"object/{a}": {"x": [], "y": [], "scene": []}
                                        for a in OBJECT_ATTRIBUTES + OBJECT_POSITIONS}
    rows.update({f"question/{a}": {"x": [], "y": [], "scene": []} for a in QUESTION_ATTRIBUTES})
    for i in range(num_scenes):
        scene = generate_scene(scene_seed("test", seed, i), config)
        image = render_scene(scene)
        # Object probe: any question works (causal attention: image tokens never see it).
        inputs = build_inputs(tokenizer, processor, image, "What objects are there?")
        image_positions = (inputs["input_ids"][0] == image_token_id).nonzero().flatten()
        layers = hidden_states(model, inputs)
        merge_size = int(getattr(processor, "merge_size", 2))
        cols = int(inputs["image_grid_thw"][0, 2]) // merge_size
        for obj, token in zip(scene.objects, object_token(scene, inputs["image_grid_thw"], merge_size), strict=True):
            features = torch.stack([h[image_positions[token]] for h in layers])
            labels = {a: getattr(obj, a) for a in OBJECT_ATTRIBUTES} | {"column": token % cols, "row": token // cols}
            for attribute, label in labels.items():
                row = rows[f"object/{attribute}"]
                row["x"].append(features)
                row["y"].append(label)
                row["scene"].append(i)
        questions = attribute_questions(scene)
        for attribute in QUESTION_ATTRIBUTES:
            for qa in questions[attribute]:
                layers = hidden_states(model, build_inputs(tokenizer, processor, image, qa.question))
                row = rows[f"question/{attribute}"]
                row["x"].append(torch.stack([h[-1] for h in layers]))
                row["y"].append(qa.answer)
                row["scene"].append(i)
    return rows


def between_class_variance_share(x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the features' total variance that lies between the classes' means.

    Linear readability ignores scale (the probe standardises each feature); this says how loud
    the attribute is next to everything else the model carries at that point."""
    mean = x.mean(0)
    between = sum(float((y == c).float().mean()) * float((x[y == c].mean(0) - mean).pow(2).sum())
                  for c in y.unique())
    total = float(x.var(0, unbiased=False).sum())
    return between / total if total > 0 else 0.0  # identical features (e.g. a fixed prompt token's embedding)


def probe_all(rows: dict, num_scenes: int, test_fraction: float = 0.3) -> dict[str, dict]:
    """Held-out accuracy and between-class variance share per probe and layer, split by scene."""
    first_test_scene = int(round(num_scenes * (1 - test_fraction)))
    results = {}
    for name, row in rows.items():
        test = torch.tensor(row["scene"]) >= first_test_scene
        if not row["x"] or test.all() or not test.any():
            continue  # too few scenes for this probe (a question that no held-out scene allows)
        x = torch.stack(row["x"])  # [n, layers, hidden]
        classes = sorted(set(row["y"]))
        y = torch.tensor([classes.index(v) for v in row["y"]])
        # What always answering the training set's most frequent class scores on the held-out part.
        prior = float((y[test] == int(np.bincount(y[~test].numpy()).argmax())).float().mean())
        accuracy = [fit_linear_probe(x[~test, layer], y[~test], x[test, layer], y[test], len(classes))
                    for layer in range(x.shape[1])]
        share = [between_class_variance_share(x[:, layer], y) for layer in range(x.shape[1])]
        results[name] = {"accuracy": accuracy, "variance_share": share, "prior": prior, "n_train": int((~test).sum()),
                         "n_test": int(test.sum()), "classes": classes}
    return results


def markdown_table(model_dir: Path, results: dict[str, dict]) -> str:
    layers = len(next(iter(results.values()))["accuracy"])
    head = "| probe | prior | " + " | ".join(["vision (L0)"] + [f"L{i}" for i in range(1, layers)]) + " | n test |"
    lines = [f"Linear-probe held-out accuracy, `{model_dir}`", "", head, "|" + "---|" * (layers + 3)]
    for name, r in results.items():
        cells = " | ".join(_cells(name, r["accuracy"]))
        lines.append(f"| {name} | {r['prior']:.3f} | {cells} | {r['n_test']} |")
    lines += ["", "Share of the features' variance between the classes (how loud the attribute is)", "",
              head.replace(" prior |", "").replace(" n test |", ""), "|" + "---|" * (layers + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_cells(name, r["variance_share"])) + " |")
    lines += ["", f"L{layers - 1} is after the model's final norm (what the LM head reads). For the question "
              "probes the vision column is empty: there, layer 0 is the embedding of the prompt's last token, "
              "the same for every question."]
    return "\n".join(lines) + "\n"


def _cells(name: str, values: list[float]) -> list[str]:
    return ["-" if name.startswith("question/") and layer == 0 else f"{v:.3f}" for layer, v in enumerate(values)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face-layout model directory")
    parser.add_argument("--scenes", type=int, default=400, help="test-split scenes (grid layout, 112x112)")
    parser.add_argument("--seed", type=int, default=0, help="test-split seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="directory for probes.json / probes.md")
    args = parser.parse_args(argv)
    if args.scenes < 4:
        parser.error("--scenes must be at least 4 (30% of the scenes are held out)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = probe_all(collect(args.model, args.scenes, args.seed), args.scenes)
    table = markdown_table(args.model, results)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probes.json").write_text(json.dumps({"model": str(args.model), "scenes": args.scenes,
                                                         "probes": results}, indent=2))
        (args.out / "probes.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
