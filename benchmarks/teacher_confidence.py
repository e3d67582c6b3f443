"""How much a teacher's output distribution says beyond its top answer, on the response tokens of a data file.

    python benchmarks/teacher_confidence.py --model runs/nano/student4_grown \
        --data runs/nano/data/train_mix.json --samples 512 --out runs/teacher_confidence.json

Final-layer distillation hands the student the teacher's whole next-token distribution instead of
the one-hot label. What that adds is the teacher's uncertainty: a teacher that puts 0.99 on one
token teaches what the label does. This prints, over the response tokens (the tokens the
distillation losses and SFT train on):

* mean entropy of the teacher's distribution (nats; ln V for a uniform one, 0 for one-hot);
* mean cross-entropy of the teacher against the data's own tokens (its SFT loss);
* mean probability of its top token, and the share of tokens where that is below 0.9;
* how often its top token is the data's token;
* on data with open-form answers (`vlsi data open-forms`: records keep "canonical_answer"), the
  most entropy per token the forms themselves carry (`open_answers.choice_entropy` summed over the
  records, divided by their response tokens): a teacher that learned the forms is near it, one
  that answers in a single form is near 0.

`--seed S` measures a random sample of N records instead of the first N (a file whose families
come in blocks, as `nano data`'s caption half, needs it).

`--verbalizers DIR` (a distillation run's `teacher_verbalizers/`, trained by VLsI step 1) adds the
same figures for each verbalized intermediate layer (`verbalized_layers`, by layer index): the
distributions the interaction step matches the student's layers to. A wide final layer with
near-one-hot intermediate ones, or the reverse, changes what layer-wise matching can pass on.

Why by hand: a few lines of tensor arithmetic over one model's logits; no library computes these
on a Qwen2-VL's response tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vlsi_model.distill.losses import next_token_targets, response_positions  # noqa: E402

CONFIDENT = 0.9  # "confident" token: the teacher's top token has at least this probability


def confidence_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Sums over the response tokens of one batch ([B, L, V] logits, [B, L] labels, -100 = not a response).

    The logits at position i predict token i + 1, as in the LM loss. Sums, so that batches add up.
    """
    mask = response_positions(labels)
    log_p = logits[mask].float().log_softmax(-1)
    gold = next_token_targets(labels, mask)
    top_p, top_token = log_p.max(-1)
    top_p = top_p.exp()
    return {
        "tokens": float(mask.sum()),
        "entropy": float(-(log_p.exp() * log_p).sum(-1).sum()),
        "cross_entropy": float(-log_p.gather(1, gold[:, None]).sum()),
        "top_probability": float(top_p.sum()),
        "below_confident": float((top_p < CONFIDENT).sum()),
        "top_is_label": float((top_token == gold).sum()),
    }


def summarise(sums: dict[str, float]) -> dict[str, float]:
    """Per-token means from summed `confidence_sums`."""
    n = sums["tokens"]
    if n == 0:
        raise ValueError("no response tokens: nothing to measure")
    return {
        "response_tokens": int(n),
        "mean_entropy_nats": sums["entropy"] / n,
        "mean_cross_entropy_nats": sums["cross_entropy"] / n,
        "mean_top_probability": sums["top_probability"] / n,
        f"share_top_probability_below_{CONFIDENT}": sums["below_confident"] / n,
        "top_token_accuracy": sums["top_is_label"] / n,
    }


def add_sums(totals: dict[str, float], sums: dict[str, float]) -> None:
    """Accumulate one batch's `confidence_sums` into `totals` (sums, so batches of any size add up)."""
    for key, value in sums.items():
        totals[key] = totals.get(key, 0.0) + value


def measure(model_dir: Path, data: Path, samples: int, batch_size: int = 32, max_length: int = 128,
            seed: int | None = None, verbalizers: Path | None = None) -> dict[str, Any]:
    """The teacher-confidence figures of `model_dir` on the first `samples` records of `data`
    (a random sample of them with `seed`); with `verbalizers`, also of each verbalized layer."""
    import random

    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.data.llava import read_records
    from vlsi_model.data.open_answers import choice_entropy
    from vlsi_model.distill.adapters import get_adapter
    from vlsi_model.distill.steps_common import check_targets, verbalized_heads
    from vlsi_model.distill.verbalizer import load_verbalizers
    from vlsi_model.training.dataset import ConversationDataset, make_collate_fn

    model, tokenizer, processor = load_model_dir(model_dir)
    model.eval()
    heads, adapter = {}, None
    if verbalizers is not None:
        adapter = get_adapter(model)
        verbs = load_verbalizers(verbalizers, expect_hidden_size=adapter.hidden_size(model),
                                 expect_model_type=getattr(model.config, "model_type", None)).eval()
        check_targets(model, adapter, verbs, "teacher")
        heads = verbalized_heads(model, adapter, verbs)
    dataset = ConversationDataset(data, tokenizer, processor, max_length=max_length)
    n = min(samples, len(dataset))
    indices = sorted(random.Random(seed).sample(range(len(dataset)), n)) if seed is not None else list(range(n))
    subset = Subset(dataset, indices)
    records = read_records(data)
    choices = sum(choice_entropy(records[i]["canonical_answer"], str(records[i].get("family", "")))
                  for i in indices if "canonical_answer" in records[i])
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=make_collate_fn(int(tokenizer.pad_token_id)))
    totals: dict[str, float] = {}
    layer_totals: dict[int, dict[str, float]] = {t: {} for t in heads}
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            if adapter is None:
                add_sums(totals, confidence_sums(model(**batch).logits, labels))
                continue
            hs = adapter.forward_with_hidden_states(model, batch, list(heads), return_logits=True)
            add_sums(totals, confidence_sums(hs.final, labels))
            for t, head in heads.items():
                add_sums(layer_totals[t], confidence_sums(head(hs.layers[t]), labels))
    out = {"model": str(model_dir), "data": str(data), "samples": len(subset), "seed": seed, **summarise(totals)}
    if heads:
        out["verbalizers"] = str(verbalizers)
        out["verbalized_layers"] = {str(t): summarise(layer_totals[t]) for t in sorted(heads)}
    if any("canonical_answer" in records[i] for i in indices):
        out["open_forms_entropy_nats_at_most"] = choices / totals["tokens"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face-layout model directory (the teacher)")
    p.add_argument("--data", type=Path, required=True, help="LLaVA-format JSON (the distillation data)")
    p.add_argument("--samples", type=int, default=512, help="first N records")
    p.add_argument("--seed", type=int, default=None, help="a random sample of N records, seeded (default: the first N)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    p.add_argument("--verbalizers", type=Path, default=None,
                   help="the teacher's verbalizers (a distillation run's teacher_verbalizers/): also measure each "
                        "verbalized intermediate layer")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for path, what in ((args.model, "model directory"), (args.data, "data file"), (args.verbalizers, "verbalizers")):
        if path is not None and not path.exists():
            p.error(f"{what} not found: {path}")
    result = measure(args.model, args.data, args.samples, args.batch_size, args.max_length, args.seed,
                     args.verbalizers)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
