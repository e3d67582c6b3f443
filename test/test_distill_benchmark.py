"""benchmarks/distill_step_cost.py runs end to end at tiny sizes (every row, ratio and memory figure
is reported; no timing assertion), and the faster interaction-step paths it motivated compute
the same loss, matches and gradients as the reference algorithm (matrix, then every matched
pair recomputed with checkpointing)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from benchmark_scripts import load_benchmark
from distill_helpers import build_pair, make_batch, random_verbalizers
from torch import nn

from vlsi_model.distill.adapters import get_adapter
from vlsi_model.distill.interaction import InteractionObjective
from vlsi_model.distill.losses import (
    DenseTeacher,
    FullDistributions,
    LossConfig,
    divergence_matrix,
    gather_positions,
    last_layer_loss,
    mean_divergence,
    pair_loss,
    response_positions,
)
from vlsi_model.distill.matching import LayerMatcher, MatchConfig
from vlsi_model.distill.teacher_cache import cached_from_dense
from vlsi_model.distill.verbalizer import VerbalizedHead

STUDENT_TARGETS = [1, 2, 3]
TEACHER_TARGETS = [1, 3, 5, 7]
TINY = [
    "--student-hidden", "32", "--student-intermediate", "64", "--student-vision-width", "32",
    "--teacher-hidden", "64", "--teacher-intermediate", "128", "--teacher-vision-width", "32",
    "--teacher-vision-depth", "2", "--batch-size", "2", "--num-batches", "2", "--warmup", "1", "--reps", "2",
    "--threads", "1", "--memory-warmup", "1", "--memory-steps", "1",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# The benchmark script
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_reports_every_row_ratio_and_memory(tmp_path, capsys):
    """Run in this process (one interpreter start saved); memory of one row in its subprocess."""
    out = tmp_path / "cost.json"
    script = load_benchmark("distill_step_cost")
    script.main([*TINY, "--finetune", "both", "--chunk-tokens", "8", "--memory-rows", "cached_lora",
                 "--json", str(out)])
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = ["sft", "floor", "online_lora", "cached_lora", "online_full", "cached_full"]
    ratios = ["online_lora/floor", "cached_lora/sft", "online_full/floor", "cached_full/sft"]
    assert list(result["rows"]) == rows and list(result["ratios"]) == ratios
    for name in rows:
        row = result["rows"][name]
        assert row["repetitions"] == 2 and len(result["step_seconds"][name]) == 2
        assert 0 < row["ms_per_sample_median"] <= row["ms_per_sample_p90"]
        assert f"| {name} |" in stdout
    assert list(result["memory"]) == ["cached_lora"]  # the row that needs the parent's cache
    memory = result["memory"]["cached_lora"]
    assert memory["peak_rss_mib"] > 0 and memory["tensor_peak_mib"] > 0
    for name in ratios:
        r = result["ratios"][name]
        assert r["ratio"] > 0 and r["goal"] in (1.25, 1.3) and isinstance(r["met"], bool)
        assert f"| {name} |" in stdout
    assert result["shapes"]["student_targets"] == [1, 2, 3] and result["shapes"]["teacher_targets"] == [1, 3, 5, 7]
    assert result["cache_build_ms_per_sample"] > 0 and result["command"].startswith("python benchmarks/")


# ---------------------------------------------------------------------------------------------
# The fast paths compute the reference loss
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tiny_tokenizer, torch_threads):
    return build_pair(tiny_tokenizer)


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    from vlsi_model.models import make_image_processor

    return make_batch(tiny_tokenizer, make_image_processor(min_pixels=56 * 56, max_pixels=112 * 112), n=3)


def _reference_step(student, s_verbs, teacher, t_verbs, batch, cfg: LossConfig, match: MatchConfig, cached_k=None):
    """The interaction loss as first implemented: matrix, then each matched pair recomputed (checkpointed)."""
    adapter = get_adapter(student)
    mask = response_positions(batch["labels"])
    hs = adapter.forward_with_hidden_states(student, batch, STUDENT_TARGETS)
    norm, head = adapter.final_norm(student), adapter.lm_head(student)
    heads = [VerbalizedHead(s_verbs[t], norm, head) for t in STUDENT_TARGETS]
    s_hidden = [gather_positions(hs.layers[t], mask) for t in STUDENT_TARGETS]
    with torch.no_grad():
        ths = adapter.forward_with_hidden_states(teacher, batch, TEACHER_TARGETS)
    t_norm, t_head = adapter.final_norm(teacher), adapter.lm_head(teacher)
    teachers = [DenseTeacher(gather_positions(ths.layers[t], mask), VerbalizedHead(t_verbs[t], t_norm, t_head))
                for t in TEACHER_TARGETS]
    final = DenseTeacher(gather_positions(ths.final, mask), t_head)
    if cached_k is not None:
        vocab = min(head.out_features, t_head.out_features)
        teachers = [cached_from_dense(t, cached_k, vocab, cfg.temperature) for t in teachers]
        final = cached_from_dense(final, cached_k, vocab, cfg.temperature)
    matcher = LayerMatcher(match)
    d = None
    if matcher.needs_divergences:
        d = divergence_matrix(s_hidden, heads, teachers, cfg.intermediate_op, cfg.direction, cfg.temperature,
                              cfg.chunk_tokens, needed=matcher.needed_pairs(3, 4))
    matches = matcher.match(d, 3, 4)
    inter, _ = pair_loss(s_hidden, heads, teachers, list(enumerate(matches)), cfg)  # no values: recomputed
    loss = cfg.intermediate_weight * inter
    last = last_layer_loss(gather_positions(hs.final, mask), head, final, cfg)
    if last is not None:
        loss = loss + cfg.last_weight * last
    return loss, matches


def _grads(*modules: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for i, m in enumerate(modules):
        for name, p in m.named_parameters():
            if p.grad is not None:
                out[f"{i}.{name}"] = p.grad.clone()
    return out


CASES = [
    ("kld", "forward", "kld", "full"),
    ("kld", "reverse", "ce", "full"),
    ("kld", "symmetric", "kld", "bottom3"),
    ("l2", "forward", "none", "window"),
    ("ce", "forward", "kld", "uniform"),
]


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cached"])
@pytest.mark.parametrize("op,direction,last_op,variant", CASES)
def test_fast_paths_equal_the_reference(pair, batch, op, direction, last_op, variant, cached):
    """Materialized (default at this size) and chunked-with-deferred-backward give the reference loss and grads."""
    student0, teacher = pair
    s_verbs0, t_verbs = random_verbalizers(32, STUDENT_TARGETS, 1), random_verbalizers(64, TEACHER_TARGETS, 2)
    match = MatchConfig(variant=variant, seed=5)
    results = {}
    for mode in ("reference", "materialized", "chunked"):
        student, s_verbs = copy.deepcopy(student0), copy.deepcopy(s_verbs0)
        cfg = LossConfig(intermediate_op=op, direction=direction, last_op=last_op, chunk_tokens=5,
                         materialize_mib=0.0 if mode == "chunked" else 256.0, intermediate_weight=0.7)
        if mode == "reference":
            for p in (*get_adapter(student).final_norm(student).parameters(), student.lm_head.weight):
                p.requires_grad_(False)
            loss, matches = _reference_step(student, s_verbs, teacher, t_verbs, batch, cfg, match,
                                            cached_k=7 if cached else None)
        else:
            if cached:
                objective = _cached_objective(student, s_verbs, teacher, t_verbs, batch, cfg, match)
            else:
                objective = InteractionObjective(student, s_verbs, teacher, t_verbs, LayerMatcher(match), None, cfg)
            objective.train()
            out = objective(batch)
            loss = out["loss"]
            matches = [TEACHER_TARGETS.index(int(out[f"match_s{s}"])) for s in STUDENT_TARGETS]
        loss.backward()
        results[mode] = (float(loss.detach()), matches, _grads(student, s_verbs))
    ref_loss, ref_matches, ref_grads = results["reference"]
    assert math.isfinite(ref_loss) and len(ref_grads) > 0
    for mode in ("materialized", "chunked"):
        loss, matches, grads = results[mode]
        assert matches == ref_matches, mode
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), mode
        assert grads.keys() == ref_grads.keys(), mode
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")


def _cached_objective(student, s_verbs, teacher, t_verbs, batch, cfg, match) -> InteractionObjective:
    """An objective reading an in-memory top-7 cache built from the same teacher (no disk)."""
    objective = InteractionObjective(student, s_verbs, teacher, t_verbs, LayerMatcher(match), None, cfg)
    dense_targets = objective._teacher_targets

    def cached_targets(b, mask, device):
        targets, final = dense_targets(b, mask, device)
        vocab = min(student.lm_head.out_features, teacher.lm_head.out_features)
        return ([cached_from_dense(t, 7, vocab, cfg.temperature) for t in targets],
                cached_from_dense(final, 7, vocab, cfg.temperature))

    objective._teacher_targets = cached_targets  # type: ignore[method-assign]
    return objective


def test_value_from_the_matrix_skips_the_forward_and_recomputes_in_backward():
    """`mean_divergence(value=...)` returns the given value and the checkpointed path's gradients."""
    g = torch.Generator().manual_seed(3)
    verb = random_verbalizers(16, [0], 4)[0]
    head = VerbalizedHead(verb, nn.RMSNorm(16), nn.Linear(16, 60, bias=False))
    head.lm_head.weight.requires_grad_(False)
    teacher = DenseTeacher(torch.randn(23, 24, generator=g), nn.Linear(24, 64, bias=False))
    base = torch.randn(23, 16, generator=g)
    got = []
    for value in (None, "matrix"):
        h = base.clone().requires_grad_(True)
        verb.zero_grad()
        v = None
        if value == "matrix":
            v = divergence_matrix([base], [head], [teacher], "kld", "reverse", 1.3, chunk_tokens=4)[0, 0]
        loss = mean_divergence(h, head, teacher, "kld", "reverse", 1.3, chunk_tokens=4, value=v)
        (loss * 2.5).backward()
        got.append((float(loss.detach()), h.grad.clone(), verb.up_proj.weight.grad.clone()))
    assert got[1][0] == pytest.approx(got[0][0], rel=1e-6)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1][2], got[0][2], rtol=1e-5, atol=1e-7)
    # Without gradients the value is returned as is; a NaN value (a skipped entry) is computed instead.
    with torch.no_grad():
        assert float(mean_divergence(base, head, teacher, value=torch.tensor(1.25))) == 1.25
        assert math.isfinite(float(mean_divergence(base, head, teacher, value=float("nan"))))


def test_full_distributions_matrix_equals_the_chunked_matrix():
    g = torch.Generator().manual_seed(0)
    heads = [VerbalizedHead(random_verbalizers(8, [0], i)[0], None, nn.Linear(8, 40, bias=False)) for i in range(3)]
    hidden = [torch.randn(11, 8, generator=g) for _ in range(3)]
    teachers = [DenseTeacher(torch.randn(11, 12, generator=g), nn.Linear(12, 48, bias=False)) for _ in range(4)]
    needed = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    for op, direction in (("kld", "forward"), ("kld", "symmetric"), ("l2", "forward"), ("ce", "forward")):
        chunked = divergence_matrix(hidden, heads, teachers, op, direction, 0.8, chunk_tokens=3, needed=needed)
        full = FullDistributions(hidden, heads, teachers, 0.8).divergences(op, direction, needed)
        assert torch.isnan(full[~needed]).all() and torch.isnan(chunked[~needed]).all()
        torch.testing.assert_close(full[needed], chunked[needed], rtol=1e-5, atol=1e-6)
