"""VLsI components: adapters/hooks, verbalizers, chunked losses (values, gradients, memory),
layer matching (property-tested), the match recorder, the teacher cache and the objectives."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import (
    STUDENT_LAYERS,
    STUDENT_VOCAB,
    TEACHER_LAYERS,
    TEACHER_VOCAB,
    build_pair,
    make_batch,
    random_verbalizers,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from vlsi_model.distill.adapters import ADAPTERS, BackboneAdapter, get_adapter, register_adapter
from vlsi_model.distill.interaction import InteractionObjective
from vlsi_model.distill.losses import (
    DenseTeacher,
    LossConfig,
    dense_divergence,
    divergence_matrix,
    gather_positions,
    last_layer_loss,
    log_probs,
    mean_divergence,
    mean_next_token_ce,
    next_token_targets,
    pair_loss,
    response_positions,
)
from vlsi_model.distill.matching import (
    VARIANTS,
    LayerMatcher,
    MatchConfig,
    MatchRecorder,
    adaptive_temperature,
    static_window,
    uniform_mapping,
)
from vlsi_model.distill.teacher_cache import (
    IndexedDataset,
    TeacherCache,
    bucket_divergence,
    build_teacher_cache,
    cached_from_dense,
    compare_cached_to_online,
    encode_topk,
    indexed_collate,
)
from vlsi_model.distill.verbalization import VerbalizationObjective
from vlsi_model.distill.verbalizer import (
    VerbalizedHead,
    Verbalizers,
    VerbFFN,
    load_verbalizers,
    save_verbalizers,
    select_target_layers,
    verbalizer_dir,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_memory import tensor_peak_bytes  # noqa: E402  (a measuring helper, not library code)

STUDENT_TARGETS = [1, 2, 3]
TEACHER_TARGETS = [1, 3, 5, 7]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_processor():
    from vlsi_model.models import make_image_processor

    return make_image_processor(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def pair(tiny_tokenizer, torch_threads):
    return build_pair(tiny_tokenizer)


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, image_processor):
    return make_batch(tiny_tokenizer, image_processor, n=3)


# ---------------------------------------------------------------------------------------------
# Adapters and hooks
# ---------------------------------------------------------------------------------------------


def test_adapter_registry_and_properties(pair):
    student, teacher = pair
    assert {"qwen2_vl", "qwen2_5_vl"} <= set(ADAPTERS)
    a = get_adapter(student)
    assert a.num_layers(student) == STUDENT_LAYERS and a.num_layers(teacher) == TEACHER_LAYERS
    assert a.hidden_size(student) == 32 and a.hidden_size(teacher) == 64
    assert a.vocab_size(student) == STUDENT_VOCAB and a.vocab_size(teacher) == TEACHER_VOCAB
    assert a.lm_head(student) is student.lm_head
    assert a.final_norm(student) is student.model.language_model.norm
    with pytest.raises(ValueError, match="no distillation adapter"):
        get_adapter("llama_vl_unknown")

    @register_adapter("my_test_vlm")
    class MyAdapter(BackboneAdapter):
        pass

    try:
        assert isinstance(get_adapter("my_test_vlm"), MyAdapter) and MyAdapter.model_type == "my_test_vlm"
    finally:
        ADAPTERS.pop("my_test_vlm")


def _truncated_output(model: nn.Module, batch, upto: int) -> torch.Tensor:
    """Manual reference: the same model cut after decoder layer `upto`, final norm removed."""
    m = copy.deepcopy(model)
    text = m.model.language_model
    text.layers = nn.ModuleList(list(text.layers)[: upto + 1])
    text.norm = nn.Identity()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return m.model(**inputs, use_cache=False).last_hidden_state


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_hooks_return_the_output_of_each_layer(model_type, tiny_tokenizer, batch, torch_threads):
    from distill_helpers import student_config

    from vlsi_model.models import build_model

    model = build_model(student_config(tiny_tokenizer, model_type), seed=3)
    adapter = get_adapter(model)
    assert adapter.model_type == model_type
    layers = list(range(STUDENT_LAYERS))
    with torch.no_grad():
        hs = adapter.forward_with_hidden_states(model, batch, layers)
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits = adapter.forward_with_hidden_states(model, batch, [1], return_logits=True).final
    for i in layers:
        torch.testing.assert_close(hs.layers[i], _truncated_output(model, batch, i), rtol=1e-5, atol=1e-5)
    # The final hidden state is the last layer's output after the final norm, and feeds the LM head.
    torch.testing.assert_close(hs.final, adapter.final_norm(model)(hs.layers[STUDENT_LAYERS - 1]))
    torch.testing.assert_close(logits, full)
    with pytest.raises(IndexError):
        adapter.forward_with_hidden_states(model, batch, [STUDENT_LAYERS])
    assert not any(layer._forward_hooks for layer in adapter.decoder_layers(model)), "hooks must be removed"


def test_hooks_under_gradient_checkpointing_and_peft(pair, batch):
    from peft import LoraConfig, get_peft_model

    student, _ = pair
    adapter = get_adapter(student)
    with torch.no_grad():
        ref = adapter.forward_with_hidden_states(student, batch, [1, 3])
    model = copy.deepcopy(student)
    model.activation_checkpointing_enable()
    model.train()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    calls = []
    handle = adapter.decoder_layers(peft_model)[1].register_forward_hook(lambda *a: calls.append(1))
    hs = adapter.forward_with_hidden_states(peft_model, batch, [1, 3])
    torch.testing.assert_close(hs.layers[1], ref.layers[1])  # LoRA B starts at zero
    hs.layers[1].sum().mul(0).add(hs.final.pow(2).mean()).backward()
    handle.remove()
    assert len(calls) == 1, "the layer hook must fire once: not again in the checkpoint recomputation"
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


# ---------------------------------------------------------------------------------------------
# Verbalizers
# ---------------------------------------------------------------------------------------------


def test_verb_ffn_structure_and_identity_init():
    ffn = VerbFFN(16)
    assert [tuple(m.weight.shape) for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)] == [(16, 16)] * 3
    x = torch.randn(5, 16)
    torch.testing.assert_close(ffn(x), x)  # residual + zero down projection: starts as the logit lens
    plain = VerbFFN(16, residual=False)
    with torch.no_grad():
        expected = plain.down_proj(torch.nn.functional.silu(plain.gate_proj(x)) * plain.up_proj(x))
    torch.testing.assert_close(plain(x), expected)


def test_select_target_layers():
    assert select_target_layers(28) == [2, 6, 10, 14, 18, 22, 26]  # the paper's 7 student targets
    assert len(select_target_layers(80)) == 20 and select_target_layers(80)[-1] == 78
    assert select_target_layers(8, stride=2, start=1) == [1, 3, 5, 7]
    assert select_target_layers(28, layers=[20, 3]) == [3, 20]  # an explicit list wins (sorted)
    for bad in ([], [28], [-1], [3, 3]):
        with pytest.raises(ValueError):
            select_target_layers(28, layers=bad)
    with pytest.raises(ValueError):
        select_target_layers(28, stride=0)
    with pytest.raises(ValueError):
        select_target_layers(4, start=4)


def test_verbalizers_saved_beside_a_checkpoint(tmp_path, pair, tiny_tokenizer, image_processor):
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.models import save_model_dir

    student, _ = pair
    ckpt = save_model_dir(student, tiny_tokenizer, image_processor, tmp_path / "ckpt")
    verbs = random_verbalizers(32, STUDENT_TARGETS, seed=0)
    where = save_verbalizers(verbs, verbalizer_dir(ckpt), model_type="qwen2_vl")
    assert where == ckpt / "verbalizers"
    meta = json.loads((where / "verbalizers.json").read_text())
    assert meta["target_layers"] == STUDENT_TARGETS and meta["hidden_size"] == 32 and meta["model_type"] == "qwen2_vl"
    loaded = load_verbalizers(where, expect_hidden_size=32, expect_model_type="qwen2_vl")
    assert loaded.target_layers == STUDENT_TARGETS
    for (n1, p1), (n2, p2) in zip(verbs.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    # The model's own weights hold no verbalizer tensor, and the checkpoint still loads as a plain model.
    assert not any("ffns" in k or "verb" in k for k in load_file(str(ckpt / "model.safetensors")))
    model, _, _ = load_model_dir(ckpt)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in student.parameters())
    with pytest.raises(ValueError, match="hidden size"):
        load_verbalizers(where, expect_hidden_size=64)
    with pytest.raises(FileNotFoundError):
        load_verbalizers(tmp_path)


# ---------------------------------------------------------------------------------------------
# Layer matching
# ---------------------------------------------------------------------------------------------


@st.composite
def matching_case(draw):
    """(S, T, d, seed, step): d uniform at some scale, all ties, or a few repeated values."""
    num_t = draw(st.integers(1, 24))
    num_s = draw(st.integers(1, num_t))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["uniform", "ties", "few"]))
    if kind == "uniform":
        d = torch.rand(num_s, num_t, generator=g, dtype=torch.float64)
    elif kind == "ties":
        d = torch.ones(num_s, num_t, dtype=torch.float64)
    else:
        d = torch.randint(3, (num_s, num_t), generator=g).double()
    d = d * draw(st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 1e3]))
    return num_s, num_t, d, draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 10_000))


@settings(max_examples=250, deadline=None)
@given(case=matching_case(), variant=st.sampled_from(["full", "window", "order"]))
def test_windowed_matches_respect_window_and_order(case, variant):
    num_s, num_t, d, seed, step = case
    matcher = LayerMatcher(MatchConfig(variant=variant, seed=seed))
    matcher.set_step(step)
    needed = matcher.needed_pairs(num_s, num_t)
    d_masked = torch.where(needed, d, torch.full_like(d, float("nan")))  # only the windows may be read
    for _ in range(2):
        m = matcher.match(d_masked, num_s, num_t)
        assert len(m) == num_s
        prev = -1
        for s, t in enumerate(m):
            lo, hi = static_window(s, num_s, num_t)
            assert lo <= t <= hi, (variant, s, t, lo, hi)
            if variant in ("order", "full"):
                assert prev + 1 <= t <= num_t - num_s + s  # the dynamic window: strictly deeper than before
            prev = t


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_returns_valid_indices(variant):
    g = torch.Generator().manual_seed(0)
    for num_s, num_t in ((1, 1), (3, 4), (7, 20), (4, 4)):
        d = torch.rand(num_s, num_t, generator=g)
        matcher = LayerMatcher(variant=variant, seed=1)
        assert matcher.needs_divergences == (variant not in ("random", "uniform"))
        m = matcher.match(d if matcher.needs_divergences else None, num_s, num_t)
        assert len(m) == num_s and all(0 <= t < num_t for t in m)
    if variant in ("window", "order", "full", "uniform"):
        with pytest.raises(ValueError, match="no more student targets"):
            LayerMatcher(variant=variant).match(torch.rand(5, 3), 5, 3)
    else:  # the unconstrained variants accept S > T
        assert len(LayerMatcher(variant=variant).match(torch.rand(5, 3), 5, 3)) == 5


def test_bottom_k_uniform_and_determinism():
    d = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.2], [0.2, 0.8, 0.05, 0.7, 0.6]])
    assert LayerMatcher(variant="bottom1").match(d, 2, 5) == [1, 2]
    picks = {tuple(LayerMatcher(variant="bottom3", seed=i).match(d, 2, 5)) for i in range(60)}
    assert {p[0] for p in picks} == {1, 4, 3} and {p[1] for p in picks} == {2, 0, 4}
    assert uniform_mapping(7, 20) == [0, 3, 6, 10, 13, 16, 19]
    assert uniform_mapping(1, 5) == [4] and uniform_mapping(4, 4) == [0, 1, 2, 3]
    a, b = LayerMatcher(seed=5), LayerMatcher(seed=5)
    d = torch.rand(3, 8)
    a.set_step(7)
    b.set_step(7)
    assert a.match(d, 3, 8) == b.match(d, 3, 8)  # same (seed, step, micro-batch): same draw (exact resume)


def _empirical(variant: str, d: torch.Tensor, n: int = 1500, **kw) -> torch.Tensor:
    matcher = LayerMatcher(variant=variant, seed=0, **kw)
    counts = torch.zeros(d.shape[0])
    for i in range(n):
        matcher.set_step(i)
        counts[matcher.match(d[None], 1, d.shape[0])[0]] += 1
    return counts / n


def test_adaptive_temperature_formula_and_sampling_distribution():
    d = torch.tensor([0.30, 0.10, 0.20, 0.70], dtype=torch.float64)
    tau = adaptive_temperature(d, scale=2.0, eps=1e-6)
    assert tau == pytest.approx(2.0 / (0.7 - 0.1 + 1e-6))
    expected = torch.softmax(-d / tau, 0).float()
    freq = _empirical("full", d)
    assert (freq - expected).abs().max() < 0.05, (freq, expected)
    # Adaptive: clearly separated candidates -> (almost) always the closest one; near-equal -> ~uniform...
    assert _empirical("full", d * 100)[1] == 1.0
    assert (_empirical("full", d / 100) - 0.25).abs().max() < 0.05
    # ...while the fixed temperature of the ablations does not adapt to the divergences' spread.
    fixed = torch.softmax(-d / 1.0, 0).float()
    assert (_empirical("multinomial", d, temperature=1.0) - fixed).abs().max() < 0.05
    assert (_empirical("multinomial", d / 100) - 0.25).abs().max() < 0.05
    # The distribution a run drew from, for inspecting it afterwards: the same formula.
    assert torch.allclose(LayerMatcher(variant="full").probabilities(d), torch.softmax(-d / tau, 0))
    assert torch.allclose(LayerMatcher(variant="order", temperature=0.5).probabilities(d), torch.softmax(-d / 0.5, 0))
    with pytest.raises(ValueError, match="softmax"):
        LayerMatcher(variant="bottom1").probabilities(d)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _logp(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, -1)


@pytest.mark.parametrize("op", ["kld", "l2", "ce"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_every_op_and_direction(op, direction):
    g = torch.Generator().manual_seed(0)
    s, t = _logp(torch.randn(6, 50, generator=g)), _logp(torch.randn(6, 50, generator=g))
    div = dense_divergence(s, t, op, direction)
    assert div.shape == (6,) and torch.isfinite(div).all() and (div >= 0).all()
    ps, pt = s.exp(), t.exp()
    if op == "kld":
        fwd, rev = (pt * (t - s)).sum(-1), (ps * (s - t)).sum(-1)
        torch.testing.assert_close(div, {"forward": fwd, "reverse": rev, "symmetric": (fwd + rev) / 2}[direction])
        assert dense_divergence(s, s, op, direction).abs().max() < 1e-6  # KL of identical inputs is 0
    elif op == "l2":
        torch.testing.assert_close(div, ((ps - pt) ** 2).sum(-1))
        assert dense_divergence(s, s, op, direction).abs().max() == 0
    else:
        torch.testing.assert_close(div, -s.gather(-1, t.argmax(-1, keepdim=True)).squeeze(-1))
    with pytest.raises(ValueError):
        LossConfig(intermediate_op="js")
    with pytest.raises(ValueError):
        LossConfig(direction="sideways")


def test_temperature_and_shared_vocabulary_prefix():
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(10, 8, generator=g), torch.randn(10, 12, generator=g)
    head_s, head_t = nn.Linear(8, 30, bias=False), nn.Linear(12, 40, bias=False)  # padded vocabs differ
    teacher = DenseTeacher(ht, head_t)
    got = mean_divergence(hs, head_s, teacher, "kld", "forward", temperature=2.0)
    zs, zt = head_s(hs)[:, :30] / 2.0, head_t(ht)[:, :30] / 2.0
    ref = (_logp(zt).exp() * (_logp(zt) - _logp(zs))).sum(-1).mean()
    torch.testing.assert_close(got, ref)
    with torch.no_grad():  # the teacher's rows past the shared prefix are padding: they cannot matter
        head_t.weight[30:] = 100.0
    torch.testing.assert_close(mean_divergence(hs, head_s, DenseTeacher(ht, head_t), "kld", "forward", 2.0), ref)
    same = DenseTeacher(hs, head_s)
    assert mean_divergence(hs, head_s, same).abs() < 1e-6


def test_response_positions_shift():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 2]])
    mask = response_positions(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert next_token_targets(labels, mask).tolist() == [5, 6, 7, 8, 9, 2]


@pytest.mark.parametrize("op,direction", [("kld", "forward"), ("kld", "reverse"), ("kld", "symmetric"),
                                          ("l2", "forward"), ("ce", "forward")])
def test_chunked_equals_unchunked_values_and_gradients(op, direction):
    g = torch.Generator().manual_seed(2)
    norm = nn.RMSNorm(16)
    head = nn.Linear(16, 70, bias=False)
    verb = random_verbalizers(16, [0], 3)[0]
    student_head = VerbalizedHead(verb, norm, head)
    teacher = DenseTeacher(torch.randn(37, 24, generator=g), VerbalizedHead(None, None, nn.Linear(24, 80)))
    base = torch.randn(37, 16, generator=g)
    results = []
    for chunk, recompute in ((1000, False), (5, True), (1, True), (8, False)):
        h = base.clone().requires_grad_(True)
        verb.zero_grad()
        loss = mean_divergence(h, student_head, teacher, op, direction, 1.5, chunk_tokens=chunk, recompute=recompute)
        loss.backward()
        results.append((loss.detach(), h.grad.clone(), verb.gate_proj.weight.grad.clone()))
    for loss, hg, vg in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hg, results[0][1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(vg, results[0][2], rtol=1e-5, atol=1e-7)
    # The no-grad matrix agrees with the loss, at any chunk size.
    mat = divergence_matrix([base], [student_head], [teacher], op, direction, 1.5, chunk_tokens=4)
    torch.testing.assert_close(mat[0, 0], results[0][0], rtol=1e-5, atol=1e-6)


def test_next_token_ce_chunked_matches_cross_entropy():
    g = torch.Generator().manual_seed(4)
    head = VerbalizedHead(random_verbalizers(16, [0], 5)[0], nn.RMSNorm(16), nn.Linear(16, 50, bias=False))
    h = torch.randn(23, 16, generator=g, requires_grad=True)
    y = torch.randint(50, (23,), generator=g)
    got = mean_next_token_ce(h, head, y, chunk_tokens=4)
    ref = torch.nn.functional.cross_entropy(head(h), y)
    torch.testing.assert_close(got, ref)
    (gh,) = torch.autograd.grad(got, h)
    (rh,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(gh, rh)
    empty = torch.zeros(0, 16, requires_grad=True)
    zero = mean_next_token_ce(empty, head, torch.zeros(0, dtype=torch.long))
    zero.backward()
    assert float(zero.detach()) == 0.0


def test_memory_does_not_grow_with_tokens_times_targets(capsys):
    """Measured: peak memory of forward + backward is flat in tokens x targets with chunking, linear without."""
    d, vocab, chunk = 16, 2048, 256
    g = torch.Generator().manual_seed(0)
    heads = [VerbalizedHead(random_verbalizers(d, [0], i)[0], None, nn.Linear(d, vocab, bias=False)) for i in range(4)]
    teacher_head = nn.Linear(d, vocab, bias=False)

    def run(n_tokens: int, n_pairs: int, chunk_tokens: int, recompute: bool = True) -> tuple[int, int]:
        hidden = [torch.randn(n_tokens, d, generator=g, requires_grad=True) for _ in range(n_pairs)]
        teachers = [DenseTeacher(torch.randn(n_tokens, d, generator=g), teacher_head) for _ in range(n_pairs)]
        cfg = LossConfig(chunk_tokens=chunk_tokens, recompute=recompute)
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        def fn() -> None:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = pair_loss(hidden, heads[:n_pairs], teachers, [(i, i) for i in range(n_pairs)], cfg)
            loss.backward()

        return tensor_peak_bytes(fn), max(saved, default=0)

    chunk_vocab_bytes = chunk * vocab * 4
    results = {}
    for n_tokens, n_pairs in ((256, 1), (1024, 1), (1024, 4)):
        results[(n_tokens, n_pairs)] = run(n_tokens, n_pairs, chunk)
    unchunked = run(1024, 4, 10**9, recompute=False)
    with capsys.disabled():
        mib = chunk_vocab_bytes / 2**20
        print(f"\n[memory] chunk={chunk} tokens, V={vocab} (one chunk x V float32 = {mib:.2f} MiB)")
        for (n, p), (peak, biggest) in results.items():
            print(f"[memory]   chunked   N={n:5d} pairs={p}: peak {peak / 2**20:6.2f} MiB, "
                  f"largest saved tensor {biggest / 2**10:7.1f} KiB")
        print(f"[memory]   unchunked N= 1024 pairs=4: peak {unchunked[0] / 2**20:6.2f} MiB, "
              f"largest saved tensor {unchunked[1] / 2**10:7.1f} KiB")
    base_peak = results[(256, 1)][0]
    for peak, biggest in results.values():
        # 16x the tokens x targets: the peak stays within ~a chunk's worth of vocabulary tensors...
        assert peak < base_peak + 2 * chunk_vocab_bytes, results
        assert peak < 12 * chunk_vocab_bytes, results
        # ...and the autograd graph never keeps a vocabulary-sized tensor (only [N, d] inputs).
        assert biggest < chunk * vocab * 4 / 4, results
    assert unchunked[0] > 4 * results[(1024, 4)][0]  # what chunking saves, measured the same way
    assert unchunked[1] >= 1024 * vocab * 4


# ---------------------------------------------------------------------------------------------
# Teacher cache
# ---------------------------------------------------------------------------------------------


def test_encode_topk_and_bucketed_kl_is_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    s, t = _logp(torch.randn(9, 40, generator=g) * 3), _logp(torch.randn(9, 40, generator=g) * 3)
    top, idx, tail = encode_topk(t, 5)
    torch.testing.assert_close(torch.logsumexp(torch.cat([top, tail[:, None]], -1), -1), torch.zeros(9))
    full = dense_divergence(s, t, "kld", "forward")
    approx = bucket_divergence(s, top, idx, tail, "kld", "forward")
    assert (approx <= full + 1e-6).all()
    torch.testing.assert_close(bucket_divergence(s, top, idx, tail, "ce"), dense_divergence(s, t, "ce"))
    top, idx, tail = encode_topk(t, 40)
    assert torch.isinf(tail).all()
    for op, direction in (("kld", "forward"), ("kld", "reverse"), ("kld", "symmetric"), ("l2", "forward")):
        torch.testing.assert_close(
            bucket_divergence(s, top, idx, tail, op, direction), dense_divergence(s, t, op, direction)
        )


def _student_teacher_targets(pair, batch, s_verbs, t_verbs):
    student, teacher = pair
    a = get_adapter(student)
    mask = response_positions(batch["labels"])
    with torch.no_grad():
        shs = a.forward_with_hidden_states(student, batch, s_verbs.target_layers)
        ths = a.forward_with_hidden_states(teacher, batch, t_verbs.target_layers)
    s_hidden = [gather_positions(shs.layers[t], mask) for t in s_verbs.target_layers]
    s_heads = [VerbalizedHead(s_verbs[t], a.final_norm(student), a.lm_head(student)) for t in s_verbs.target_layers]
    teachers = [
        DenseTeacher(gather_positions(ths.layers[t], mask), VerbalizedHead(t_verbs[t], a.final_norm(teacher),
                                                                           a.lm_head(teacher)))
        for t in t_verbs.target_layers
    ]
    return s_hidden, s_heads, teachers


@pytest.mark.parametrize("peaked", [False, True], ids=["random-init", "peaked"])
def test_cached_vs_online_divergences(pair, batch, capsys, peaked):
    """Gap between cached (top-k + tail) and online divergence matrices, for k = 8, 32 and the full vocabulary.

    Random-init tiny models predict near-uniform distributions, the worst case for a top-k
    cache; "peaked" scales both LM heads by 8 so the distributions concentrate like a
    trained model's do.
    """
    student, teacher = pair
    if peaked:
        student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        with torch.no_grad():
            student.lm_head.weight.mul_(8)
            teacher.lm_head.weight.mul_(8)
    s_verbs, t_verbs = random_verbalizers(32, STUDENT_TARGETS, 1), random_verbalizers(64, TEACHER_TARGETS, 2)
    s_hidden, s_heads, teachers = _student_teacher_targets((student, teacher), batch, s_verbs, t_verbs)
    report = {}
    for op, direction in (("kld", "forward"), ("kld", "reverse"), ("l2", "forward"), ("ce", "forward")):
        cfg = LossConfig(intermediate_op=op, direction=direction, chunk_tokens=7)
        report[(op, direction)] = compare_cached_to_online(s_hidden, s_heads, teachers, [8, 32, 10**6], cfg)
    with capsys.disabled():
        kind = "peaked (LM heads x 8)" if peaked else "random-init"
        print(f"\n[teacher cache] {kind}: shared vocabulary {STUDENT_VOCAB}, {s_hidden[0].shape[0]} tokens, 3x4 pairs")
        for (op, direction), per_k in report.items():
            for k, r in per_k.items():
                kk = "full" if k > STUDENT_VOCAB else str(k)
                print(f"[teacher cache]   {op}/{direction:8s} k={kk:>4s}: max |cached - online| = {r['max_abs']:.3e} "
                      f"(mean {r['mean_abs']:.3e}; online mean {r['mean_online']:.3e})")
    for per_k in report.values():
        assert per_k[10**6]["max_abs"] < 1e-5  # full vocabulary: exact
    fwd = report[("kld", "forward")]
    assert fwd[32]["max_abs"] <= fwd[8]["max_abs"] + 1e-7  # larger k, smaller gap
    assert report[("ce", "forward")][8]["max_abs"] < 1e-5  # CE only needs the argmax


def test_teacher_cache_on_disk(tmp_path, pair, tiny_tokenizer, image_processor):
    from distill_helpers import make_samples

    from vlsi_model.prompting import collate

    _, teacher = pair
    t_verbs = random_verbalizers(64, TEACHER_TARGETS, 2)
    dataset = IndexedDataset(make_samples(tiny_tokenizer, image_processor, 5, seed=3))
    collate_fn = indexed_collate(lambda items: collate(items, tiny_tokenizer.pad_token_id))
    batches = [collate_fn([dataset[i] for i in idx]) for idx in ([0, 1], [2, 3], [4])]
    out = build_teacher_cache(teacher, t_verbs, batches, tmp_path / "cache", k=16, vocab_size=STUDENT_VOCAB,
                              shard_tokens=3)
    index = json.loads((out / "index.json").read_text())
    assert index["k"] == 16 and index["vocab_size"] == STUDENT_VOCAB and set(index["samples"]) == set("01234")
    assert len(list(out.glob("shard-*.safetensors"))) >= 2
    cache = TeacherCache(out)
    probe = collate_fn([dataset[3], dataset[0]])  # any order, any batching
    targets, final = cache.targets(probe)
    a = get_adapter(teacher)
    mask = response_positions(probe["labels"])
    with torch.no_grad():
        hs = a.forward_with_hidden_states(teacher, probe, TEACHER_TARGETS)
    for layer, got in zip(TEACHER_TARGETS, targets, strict=True):
        head = VerbalizedHead(t_verbs[layer], a.final_norm(teacher), a.lm_head(teacher))
        ref = cached_from_dense(DenseTeacher(gather_positions(hs.layers[layer], mask), head), 16, STUDENT_VOCAB)
        torch.testing.assert_close(got.topk_logp, ref.topk_logp)
        assert torch.equal(got.topk_idx, ref.topk_idx.long())
        torch.testing.assert_close(got.tail_logmass, ref.tail_logmass)
    assert final.num_tokens == int(mask.sum())
    tampered = dict(probe)
    tampered["labels"] = probe["labels"].clone()
    tampered["labels"][0, -2] = -100
    with pytest.raises(ValueError, match="differs"):
        cache.targets(tampered)
    with pytest.raises(ValueError, match="rebuild the cache with vocab_size"):
        final.chunk(0, 1, STUDENT_VOCAB - 1, 1.0)


# ---------------------------------------------------------------------------------------------
# Recorder
# ---------------------------------------------------------------------------------------------


def test_recorder_statistics_json_png_and_resume(tmp_path):
    path = tmp_path / "matches.jsonl"
    rec = MatchRecorder([2, 6, 10], [2, 6, 10, 14, 18], path=path)
    for step in range(10):
        rec.set_progress(step, 10)
        rec.record([0, 1, 2] if step < 5 else [1, 3, 4])
    stats = rec.statistics()
    assert stats["early"]["counts"][0] == [5, 0, 0, 0, 0] and stats["late"]["counts"][2] == [0, 0, 0, 0, 5]
    assert stats["overall"]["frequency"][1] == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert stats["late"]["mean_teacher_layer"] == [6.0, 14.0, 18.0]
    json_path, png_path = rec.write(tmp_path / "out")
    assert json.loads(json_path.read_text())["teacher_layers"] == [2, 6, 10, 14, 18]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
    # A resumed run (checkpoint after step 6) reloads the file and redoes steps 7..9 without double counting.
    resumed = MatchRecorder([2, 6, 10], [2, 6, 10, 14, 18], path=path)
    assert len(resumed.records) == 30
    for step in range(7, 10):
        resumed.set_progress(step, 10)
        resumed.record([2, 3, 4])
    assert len(resumed.records) == 30 and resumed.statistics()["late"]["counts"][0] == [0, 2, 3, 0, 0]
    assert len(MatchRecorder([2, 6, 10], [2, 6, 10, 14, 18], path=path).records) == 30


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------


def test_verbalization_objective_trains_only_verbalizers(pair, batch):
    _, teacher = pair
    teacher = copy.deepcopy(teacher)
    verbs = Verbalizers(64, TEACHER_TARGETS)
    obj = VerbalizationObjective(teacher, verbs, chunk_tokens=5).train()
    assert not teacher.training, "the frozen backbone stays in eval mode"
    trainable = [p for p in obj.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in verbs.parameters()}
    opt = torch.optim.Adam(trainable, lr=3e-2)
    first = None
    for _ in range(8):
        out = obj(batch)
        assert set(f"ce_L{t}" for t in TEACHER_TARGETS) <= set(out)
        first = first if first is not None else float(out["ce_mean"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["ce_mean"]) < first - 0.1
    assert all(p.grad is None for p in teacher.parameters())
    # Each target layer's loss is independent: the sum's gradient on one FFN is that layer's own gradient.
    out = obj(batch)
    own = torch.autograd.grad(out["loss"], verbs[3].gate_proj.weight, retain_graph=True)[0]
    hs = get_adapter(teacher).forward_with_hidden_states(teacher, batch, [3])
    mask = response_positions(batch["labels"])
    ce3 = mean_next_token_ce(gather_positions(hs.layers[3].detach(), mask), obj._heads[3],
                             next_token_targets(batch["labels"], mask))
    torch.testing.assert_close(own, torch.autograd.grad(ce3, verbs[3].gate_proj.weight)[0])


def test_interaction_objective_loss_and_gradients(pair, batch, tmp_path):
    student, teacher = (copy.deepcopy(m) for m in pair)
    s_verbs, t_verbs = random_verbalizers(32, STUDENT_TARGETS, 1), random_verbalizers(64, TEACHER_TARGETS, 2)
    recorder = MatchRecorder(STUDENT_TARGETS, TEACHER_TARGETS, path=tmp_path / "m.jsonl")
    cfg = LossConfig(chunk_tokens=4)
    obj = InteractionObjective(student, s_verbs, teacher, t_verbs, LayerMatcher(seed=3), recorder, cfg).train()
    assert not teacher.training
    obj.set_progress(0, 4)
    out = obj(batch)
    out["loss"].backward()
    # loss = sum of the sampled pairs' divergences + the last-layer divergence, recomputed independently.
    s_hidden, s_heads, teachers = _student_teacher_targets((student, teacher), batch, s_verbs, t_verbs)
    matches = [TEACHER_TARGETS.index(int(out[f"match_s{s}"])) for s in STUDENT_TARGETS]
    d = divergence_matrix(s_hidden, s_heads, teachers, chunk_tokens=100)
    expected = sum(float(d[s, t]) for s, t in enumerate(matches))
    assert float(out["loss_intermediate"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss_intermediate"] + out["loss_last"]), rel=1e-6)
    assert all(b > a for a, b in zip(matches, matches[1:], strict=False))
    assert recorder.records == [(0, s, t) for s, t in enumerate(matches)]
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in t_verbs.parameters())
    assert student.lm_head.weight.grad is None and not student.lm_head.weight.requires_grad
    assert all(p.grad is not None for p in s_verbs.parameters())
    assert student.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None

    # The op switches: last_op "none" drops the final-layer term; the intermediate CE op runs.
    obj_none = InteractionObjective(student, s_verbs, teacher, t_verbs, LayerMatcher(variant="uniform"),
                                    loss_config=LossConfig(last_op="none", intermediate_op="ce"))
    out_none = obj_none(batch)
    assert "loss_last" not in out_none and math.isfinite(float(out_none["loss"].detach()))


def test_interaction_with_full_teacher_cache_equals_online(pair, tmp_path, tiny_tokenizer, image_processor):
    from distill_helpers import make_samples

    from vlsi_model.prompting import collate

    student, teacher = pair
    s_verbs, t_verbs = random_verbalizers(32, STUDENT_TARGETS, 1), random_verbalizers(64, TEACHER_TARGETS, 2)
    dataset = IndexedDataset(make_samples(tiny_tokenizer, image_processor, 2, seed=5))
    collate_fn = indexed_collate(lambda items: collate(items, tiny_tokenizer.pad_token_id))
    b = collate_fn([dataset[0], dataset[1]])
    cache_dir = build_teacher_cache(teacher, t_verbs, [b], tmp_path / "c", k=10**6, vocab_size=STUDENT_VOCAB)
    online = InteractionObjective(student, s_verbs, teacher, t_verbs, LayerMatcher(variant="bottom1"))
    cached = InteractionObjective(student, s_verbs, None, None, LayerMatcher(variant="bottom1"),
                                  teacher_cache=TeacherCache(cache_dir))
    with torch.no_grad():
        a, c = online(b), cached(b)
    for key in ("loss_intermediate", "loss_last", "match_mean_teacher_layer"):
        assert float(c[key]) == pytest.approx(float(a[key]), abs=1e-5), key


def test_last_layer_loss_ops(pair, batch):
    student, teacher = pair
    a = get_adapter(student)
    mask = response_positions(batch["labels"])
    with torch.no_grad():
        s = gather_positions(a.forward_with_hidden_states(student, batch, []).final, mask)
        t_final = a.forward_with_hidden_states(teacher, batch, []).final
        t = DenseTeacher(gather_positions(t_final, mask), teacher.lm_head)
    assert last_layer_loss(s, student.lm_head, t, LossConfig(last_op="none")) is None
    kld = last_layer_loss(s, student.lm_head, t, LossConfig())
    ce = last_layer_loss(s, student.lm_head, t, LossConfig(last_op="ce"))
    logits_s = student.lm_head(s)[:, :STUDENT_VOCAB]
    logits_t = teacher.lm_head(t.hidden)[:, :STUDENT_VOCAB]
    ref_ce = torch.nn.functional.cross_entropy(logits_s, logits_t.argmax(-1))
    torch.testing.assert_close(ce, ref_ce)
    ref_kld = (log_probs(logits_t, STUDENT_VOCAB).exp() * (log_probs(logits_t, STUDENT_VOCAB)
                                                          - log_probs(logits_s, STUDENT_VOCAB))).sum(-1).mean()
    torch.testing.assert_close(kld, ref_kld)
