"""Export-friendly forward passes of Qwen2-VL / Qwen2.5-VL / Qwen3-VL built from the Hugging Face modules' weights.

Why not export the Hugging Face modules as they are: their forwards compute vision position
ids, `cu_seqlens` and the window index with `.tolist()` loops and `repeat_interleave`, split
attention into per-image chunks by Python lists, build causal masks through
`masking_utils` and keep the KV cache in a `DynamicCache` object; none of it traces into a
static ONNX graph (ENVIRONMENT.md: the vision tower exports only when those are computed
outside). The wrappers below run the *same* parameters through the same arithmetic, with
every data-dependent index computed outside the graph and fed in as an input:

- `VisionGraph`: pixel patches + rotary cos/sin + attention segment ids (+ Qwen2.5-VL's
  window permutation) -> merged image embeddings. Attention is one masked softmax over all
  patches; the mask comes from segment ids (`cu_seqlens` expressed per patch), so a
  dynamic patch count needs no loop.
- `Qwen3VisionGraph`: Qwen3-VL's tower: the same attention blocks, plus its learned position
  grid resampled to the image (the bilinear taps and weights are inputs) and DeepStack: the
  features of some intermediate blocks, each through its own merger, as a second output.
- `DecoderGraph`: one graph for prefill *and* decode (inputs_embeds, M-RoPE cos/sin, an
  additive attention bias, past KV of any length including 0 -> last-position logits +
  present KV). One graph means the weights exist once: in ONNX Runtime one session, in
  TensorRT one engine with prefill, decode and extend optimisation profiles. Two graphs would
  double the decoder's weights, which an 8 GB Jetson cannot afford for a 2B model.
  Qwen3-VL: per-head q/k RMSNorms, and the DeepStack features (already scattered to the
  image tokens' positions, zeros elsewhere) added to the outputs of the first layers.

Only plain tensor arithmetic is used (MatMul, Softmax, Concat, Split, Gather, ...)
so every op is in TensorRT 10's ONNX operator set (checked by `trt_ops`). Parity with the
Hugging Face forward is tested (`test/test_onnx_export.py`).
"""

from __future__ import annotations

import torch
from torch import nn

# Additive mask value for "may not attend". Finite (not -inf) so fp16 graphs never compute
# inf - inf; every query row keeps at least itself unmasked, so softmax stays well defined.
_MASK_VALUE_FP32 = -1e9
_MASK_VALUE_FP16 = -3e4


def mask_value(dtype: torch.dtype) -> float:
    """The additive "masked" bias for `dtype` (see _MASK_VALUE_*)."""
    return _MASK_VALUE_FP16 if dtype == torch.float16 else _MASK_VALUE_FP32


def _fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing `linears` side by side (their outputs concatenated): one MatMul (+ Add)
    in the graph instead of one per projection, its weight an initializer like any Linear's (which
    the weight-only quantizers find). The originals then hold views into the fused tensors, so the
    model (and its PyTorch forward, which the parity check runs) keeps one copy of the weights."""
    has_bias = linears[0].bias is not None
    fused = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears), bias=has_bias,
                      device="meta")  # no init, no memory: the parameters are set below
    fused.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]).detach(), requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]).detach(), requires_grad=False)
    start = 0
    for lin in linears:
        rows = slice(start, start + lin.out_features)
        lin.weight.data = fused.weight.data[rows]
        if has_bias:
            lin.bias.data = fused.bias.data[rows]
        start += lin.out_features
    return fused


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """HF's rotate_half with the half width as a Python int: a constant Slice in the graph
    (x.shape[-1] // 2 would trace into Shape -> Gather -> Div -> Slice per use)."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)`, computed in float32 when it is a LayerNorm (Qwen2-VL's vision blocks and merger):
    an fp16 LayerNorm's variance overflows / loses precision, and TensorRT's strongly typed fp16
    build computes exactly the graph's types. RMSNorms (Qwen2.5-VL, the text model) upcast
    inside their own forward already."""
    if isinstance(norm, nn.LayerNorm) and x.dtype != torch.float32:
        return nn.functional.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                                        norm.eps).to(x.dtype)
    return norm(x)


def _vision_attention(blk: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """A vision block's attention (Qwen2-VL, Qwen2.5-VL and Qwen3-VL share it): rotary in float32
    as Hugging Face applies it, one masked softmax over all patches (`bias` from segment ids)."""
    # Shapes use -1 for the one dynamic size, so each reshape exports as a single Reshape
    # with a constant shape (no Shape/Gather/Concat chains per layer).
    attn = blk.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(-1, 3, heads, head_dim).permute(1, 0, 2, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [N, heads, head_dim]
    dtype = q.dtype
    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    q = (qf * c + _rotate_half(qf, head_dim // 2) * s).to(dtype)
    k = (kf * c + _rotate_half(kf, head_dim // 2) * s).to(dtype)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, N, head_dim]
    scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling + bias
    probs = torch.softmax(scores.float(), dim=-1).to(dtype)
    out = torch.matmul(probs, v).transpose(0, 1).reshape(-1, heads * head_dim)
    return attn.proj(out)


def _segment_bias(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias [1, N, N]: 0 between patches of one segment, masked between segments."""
    same = segments.unsqueeze(1) == segments.unsqueeze(0)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(same, zero, torch.full((), mask_value(dtype), dtype=dtype)).unsqueeze(0)


class VisionGraph(nn.Module):
    """Vision tower of a Qwen2-VL or Qwen2.5-VL model with all index math fed in as inputs.

    Inputs (N patches, M = N / merge_size**2 merged tokens):
      pixel_values   [N, C*T*P*P]  the image processor's flattened patches (natural order)
      rotary_cos/sin [N, head_dim] vision rotary tables for the patches' (h, w) positions
      full_segments  [N] int32     image id of each patch: full-attention blocks attend
                                   within one image (`cu_seqlens` per patch)
    Qwen2.5-VL only:
      window_segments [N] int32    window id of each patch *in window order*
      window_index    [M] int32    merged-token permutation into window order
      reverse_index   [M] int32    its inverse (argsort), restoring natural order at the end
    Output: image_embeds [M, text_hidden] in natural order, as `get_image_features` returns.
    """

    def __init__(self, visual: nn.Module, model_type: str) -> None:
        super().__init__()
        self.visual = visual
        self.windowed = model_type == "qwen2_5_vl"
        cfg = visual.config
        self.merge_unit = cfg.spatial_merge_size**2
        pe = visual.patch_embed
        # Conv3d with stride == kernel over one patch is a dot product: a MatMul is exactly the
        # same sum, faster on CPU, and avoids 5-D convolution in TensorRT.
        self.register_buffer(
            "patch_weight", pe.proj.weight.detach().reshape(pe.proj.weight.shape[0], -1).t().contiguous(),
            persistent=False,
        )
        self.full_blocks = set(getattr(cfg, "fullatt_block_indexes", None) or []) if self.windowed else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        rotary_cos: torch.Tensor,
        rotary_sin: torch.Tensor,
        full_segments: torch.Tensor,
        window_segments: torch.Tensor | None = None,
        window_index: torch.Tensor | None = None,
        reverse_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.patch_weight.dtype
        x = torch.matmul(pixel_values.to(dtype), self.patch_weight)
        width = x.shape[1]
        cos, sin = rotary_cos, rotary_sin
        full_bias = _segment_bias(full_segments, dtype)
        window_bias = full_bias
        if self.windowed:
            assert window_segments is not None and window_index is not None and reverse_index is not None
            # Reorder merged-token groups into window order (HF: permute_input_for_window_attn).
            u = self.merge_unit
            hd = self.visual.blocks[0].attn.head_dim
            x = torch.index_select(x.reshape(-1, u * width), 0, window_index).reshape(-1, width)
            cos = torch.index_select(cos.reshape(-1, u * hd), 0, window_index).reshape(-1, hd)
            sin = torch.index_select(sin.reshape(-1, u * hd), 0, window_index).reshape(-1, hd)
            full_segments_w = torch.index_select(full_segments.reshape(-1, u), 0, window_index).reshape(-1)
            full_bias = _segment_bias(full_segments_w, dtype)
            window_bias = _segment_bias(window_segments, dtype)
        for i, blk in enumerate(self.visual.blocks):
            bias = full_bias if (not self.windowed or i in self.full_blocks) else window_bias
            x = x + _vision_attention(blk, _norm(blk.norm1, x), cos, sin, bias)
            x = x + blk.mlp(_norm(blk.norm2, x))
        merger = self.visual.merger  # its forward, with the norm upcast (see _norm)
        merged = merger.mlp(_norm(merger.ln_q, x).view(-1, merger.hidden_size))
        if self.windowed:
            merged = torch.index_select(merged, 0, reverse_index)
        return merged


class Qwen3VisionGraph(nn.Module):
    """Vision tower of a Qwen3-VL model with all index math fed in as inputs.

    Inputs (N patches, M = N / merge_size**2 merged tokens):
      pixel_values   [N, C*T*P*P]  the image processor's flattened patches (natural order)
      pos_indices    [N, 4] int32  the four taps of each patch into the learned position grid
      pos_weights    [N, 4]        their bilinear weights (float32)
      rotary_cos/sin [N, head_dim] vision rotary tables for the patches' (h, w) positions
      full_segments  [N] int32     image id of each patch (attention stays within one image)
    Outputs: image_embeds [M, text_hidden] (the final merger's, as `get_image_features`),
      deepstack_embeds [K, M, text_hidden]: the features after each vision block in
      `deepstack_visual_indexes`, through that block's DeepStack merger.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        cfg = visual.config
        self.deepstack = list(visual.deepstack_visual_indexes)
        pe = visual.patch_embed
        # The patch Conv3d (stride == kernel) as a MatMul + bias: the same sum (see VisionGraph).
        self.register_buffer(
            "patch_weight", pe.proj.weight.detach().reshape(pe.proj.weight.shape[0], -1).t().contiguous(),
            persistent=False,
        )
        self.register_buffer("patch_bias", pe.proj.bias.detach().clone(), persistent=False)
        self.hidden = int(cfg.hidden_size)

    @staticmethod
    def _merge(merger: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`merger(x)` with its LayerNorm upcast (see _norm): before the 2x2 shuffle for the final
        merger, after it for the DeepStack ones (`use_postshuffle_norm`)."""
        if merger.use_postshuffle_norm:
            x = _norm(merger.norm, x.reshape(-1, merger.hidden_size))
        else:
            x = _norm(merger.norm, x).reshape(-1, merger.hidden_size)
        return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))

    def forward(
        self,
        pixel_values: torch.Tensor,
        pos_indices: torch.Tensor,
        pos_weights: torch.Tensor,
        rotary_cos: torch.Tensor,
        rotary_sin: torch.Tensor,
        full_segments: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.patch_weight.dtype
        x = torch.matmul(pixel_values.to(dtype), self.patch_weight) + self.patch_bias
        # The position grid resampled to this image: a weighted sum of 4 learned rows per patch,
        # in float32 as Hugging Face computes it (float32 weights promote the product).
        table = self.visual.pos_embed.weight
        taps = torch.index_select(table, 0, pos_indices.reshape(-1)).reshape(-1, 4, self.hidden)
        x = x + (taps.float() * pos_weights.float().unsqueeze(-1)).sum(1).to(dtype)
        bias = _segment_bias(full_segments, dtype)
        features = []
        for i, blk in enumerate(self.visual.blocks):
            x = x + _vision_attention(blk, _norm(blk.norm1, x), rotary_cos, rotary_sin, bias)
            x = x + blk.mlp(_norm(blk.norm2, x))
            if i in self.deepstack:
                features.append(self._merge(self.visual.deepstack_merger_list[self.deepstack.index(i)], x))
        return self._merge(self.visual.merger, x), torch.stack(features)


class DecoderGraph(nn.Module):
    """Text decoder + lm_head of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model with an explicit KV cache.

    Inputs (S new tokens, P cached tokens, T = P + S):
      inputs_embeds  [1, S, hidden]   token embeddings, image embeddings already scattered in
      rotary_cos/sin [1, S, head_dim] M-RoPE tables of the new tokens' 3-D positions
      attention_bias [1, 1, S, T]     additive: 0 = may attend, large negative = masked
                                      (prefill: causal; decode: all zeros)
      deepstack_embeds [K, 1, S, hidden]  Qwen3-VL only: DeepStack features at the image
                                      tokens' positions (zeros elsewhere and when decoding),
                                      added to the output of layer k < K
      past_key_i / past_value_i [1, kv_heads, P, head_dim] for each layer i (P may be 0)
    Outputs: logits [1, vocab] (float32, last position only: all greedy decoding needs),
      present_key_i / present_value_i [1, kv_heads, T, head_dim].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        cfg = self.lm.config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        # Qwen3-VL gives head_dim explicitly (128 whatever the width); Qwen2-VL derives it.
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.deepstack_layers = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.vocab_size = self.lm_head.out_features
        # Fewer graph nodes per layer (each costs ~0.6 us in onnxruntime at nano size, and a kernel
        # launch in TensorRT): q, k and v come from one MatMul + Split of the concatenated weights
        # (the same dot products), and rotate_half is a Gather with the sign folded into sin once
        # per graph (exact) instead of Slice / Neg / Concat per use.
        self.qkv = nn.ModuleList(_fused_linear(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
                                 for layer in self.lm.layers)
        half, device = self.head_dim // 2, self.lm_head.weight.device
        self.register_buffer("rotate_index", torch.cat([torch.arange(half, self.head_dim, device=device),
                                                        torch.arange(half, device=device)]), persistent=False)
        self.register_buffer("rotate_sign", torch.cat([-torch.ones(half, device=device),
                                                       torch.ones(half, device=device)]), persistent=False)

    def _attention(
        self, i: int, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
        bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Batch is always 1 and every reshape has at most one unknown size (-1), so each is a
        # single Reshape with a constant shape in the graph. Grouped-query attention stacks the g
        # query heads of a K/V head along the sequence ([1, kv, g*S, d] x [1, kv, d, T]) instead of
        # materialising repeated K/V. cos / sin_signed: [1, S, 1, d]; bias: [1, 1, g*S, T] (forward).
        attn = layer.self_attn
        nh, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv[i](x).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
        q, k = q.reshape(1, -1, nh, hd), k.reshape(1, -1, kvh, hd)
        if hasattr(attn, "q_norm"):  # Qwen3-VL: RMSNorm over each head's vector, before the rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = x[..., rotate_index] * rotate_sign
        q = (q * cos + q.index_select(-1, self.rotate_index) * sin_signed).transpose(1, 2)
        k = (k * cos + k.index_select(-1, self.rotate_index) * sin_signed).transpose(1, 2)
        v = v.reshape(1, -1, kvh, hd).transpose(1, 2)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        qg = q.reshape(1, kvh, -1, hd)  # heads kv*g .. kv*g+g-1 share K/V head kv
        scores = torch.matmul(qg, k.transpose(2, 3)) * self.scaling + bias
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)  # [1, kv, g*S, d]
        out = out.reshape(1, nh, -1, hd).transpose(1, 2).reshape(1, -1, nh * hd)
        return attn.o_proj(out), k, v

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        rotary_cos: torch.Tensor,
        rotary_sin: torch.Tensor,
        attention_bias: torch.Tensor,
        *extra: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # Qwen3-VL: deepstack_embeds comes first in `extra`, then the past KV.
        deepstack, past = (extra[0], extra[1:]) if self.deepstack_layers else (None, extra)
        x = inputs_embeds
        presents: list[torch.Tensor] = []
        # shared by every layer, computed once: [1, S, 1, d] rotary tables (sin with rotate_half's
        # sign folded in) and the bias repeated for the g query heads of each K/V head [1, 1, g*S, T]
        cos = rotary_cos.unsqueeze(2)
        sin_signed = (rotary_sin * self.rotate_sign.to(rotary_sin.dtype)).unsqueeze(2)
        bias = attention_bias.repeat(1, 1, self.groups, 1) if self.groups > 1 else attention_bias
        for i, layer in enumerate(self.lm.layers):
            h, k, v = self._attention(i, layer, layer.input_layernorm(x), cos, sin_signed, bias, past[2 * i],
                                      past[2 * i + 1])
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if deepstack is not None and i < self.deepstack_layers:
                x = x + deepstack[i]
            presents += [k, v]
        last = self.lm.norm(x[:, -1, :])
        logits = self.lm_head(last).float().reshape(1, self.vocab_size)  # static [1, vocab] in the graph
        return (logits, *presents)
