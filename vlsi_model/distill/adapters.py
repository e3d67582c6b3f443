"""Where a decoder VLM keeps its decoder layers, final norm and LM head, and how to read them.

VLsI compares *intermediate* decoder layers of two models, so the distillation code must
know, for each architecture, which modules are the decoder layers, which is the final
norm and which the LM head. That knowledge lives here and nowhere else: everything in
`vlsi_model.distill` talks to a model through a `BackboneAdapter`.

Extension point: `ADAPTERS`, a registry keyed by the config's `model_type`. To support
another decoder VLM, subclass `BackboneAdapter`, implement the four module accessors and
(if its forward differs) `backbone_forward`, and decorate the class with
`@register_adapter("that_model_type")`.

Hidden states are collected with hooks, in the same forward pass that produces the final
hidden state, so "layer i" means exactly *the residual stream after decoder layer i*
(0-based, before the final norm): what decoder layer i + 1 (or, after the last layer, the
final norm) receives. Where that is captured is the adapter's `capture_point`:

- "layer_output" (Qwen2-VL, Qwen2.5-VL): a forward hook on decoder layer i, its output;
- "next_layer_input" (Qwen3-VL): a forward pre-hook on decoder layer i + 1, its input (and
  on the final norm for the last layer). Qwen3-VL's text model adds the DeepStack visual
  features to the first layers' outputs at the image tokens *after* each layer returns
  (`Qwen3VLTextModel._deepstack_process`, on a clone), so layer i's own output misses
  them; the next layer's input is the stream the model really carries on.

The Hugging Face `output_hidden_states` tuple is not used: its element 0 is the embedding
output, so layer i is element i + 1, whether the last element is before or after the
final norm has changed between transformers versions, and for Qwen3-VL it holds the layer
outputs before the DeepStack addition. A hook cannot be off by one.

Transformers 5 checkpoints a layer's `forward`, not its `__call__`, so the hooks stay
outside gradient checkpointing: they fire once per forward (never again during the
backward recomputation) and see the checkpoint's output, which is part of the autograd
graph. The hooks are removed before `forward_with_hidden_states` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

# Keys of a batch that are model inputs; others (labels, sample ids, ...) are the loss's business.
MODEL_INPUT_KEYS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_token_type_ids",
)


class HiddenStates(NamedTuple):
    """Result of `forward_with_hidden_states`.

    final: [B, L, d] hidden state after the final norm (what the LM head consumes), or the
        full-vocabulary logits [B, L, V] when `return_logits=True` was asked for.
    layers: {layer_index: [B, L, d]} residual stream after each requested decoder layer
        (before any norm; see the module docstring).
    """

    final: torch.Tensor
    layers: dict[int, torch.Tensor]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying Hugging Face model of a PEFT wrapper (LoRA layers stay injected), else `model`.

    `PeftModel.get_base_model()` returns the original model object whose Linear layers were
    replaced in place by LoRA layers, so its decoder layers are the ones that run.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class BackboneAdapter:
    """Access to one decoder VLM architecture's text backbone (see the module docstring)."""

    model_type: str = ""
    # Where "layer i" is read (see the module docstring): decoder layer i's output, or the
    # input of decoder layer i + 1 / the final norm (for models that change the residual
    # stream between layers, like Qwen3-VL's DeepStack).
    capture_point: ClassVar[Literal["layer_output", "next_layer_input"]] = "layer_output"

    # --- module accessors (override for other architectures) -------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def text_config(self, model: nn.Module) -> Any:
        return unwrap_model(model).config.get_text_config()

    def backbone_forward(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, L, d] final hidden state after the final norm, without running the LM head."""
        raise NotImplementedError

    # --- derived properties -----------------------------------------------------------------
    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def hidden_size(self, model: nn.Module) -> int:
        return int(self.text_config(model).hidden_size)

    def vocab_size(self, model: nn.Module) -> int:
        """The padded vocabulary size: rows of the LM head (e.g. 151936 for Qwen2-VL-2B)."""
        return int(self.lm_head(model).out_features)

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The entries of `batch` the model's forward takes (labels etc. are dropped)."""
        return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}

    def forward_with_hidden_states(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        layer_indices: Iterable[int],
        return_logits: bool = False,
    ) -> HiddenStates:
        """One forward pass returning the final hidden state and the outputs of `layer_indices`.

        The final hidden state is returned after the final norm and *before* the LM head, so
        a loss that projects to the vocabulary chunk by chunk never materialises [B, L, V]
        logits; `self.lm_head(model)` is the head to apply. `return_logits=True` applies it
        here instead (convenient for small models and tests).
        Gradients flow (or not) as the caller's grad mode says.
        """
        layers = self.decoder_layers(model)
        wanted = sorted(set(int(i) for i in layer_indices))
        for i in wanted:
            if not 0 <= i < len(layers):
                raise IndexError(f"layer index {i} out of range for a model with {len(layers)} decoder layers")
        captured: dict[int, torch.Tensor] = {}
        handles = self._register_capture_hooks(model, wanted, captured)
        try:
            final = self.backbone_forward(model, self.model_inputs(batch))
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in wanted if i not in captured]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run in the forward pass")
        if return_logits:
            final = self.lm_head(model)(final)
        return HiddenStates(final=final, layers={i: captured[i] for i in wanted})


    def _register_capture_hooks(
        self, model: nn.Module, wanted: list[int], captured: dict[int, torch.Tensor]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that store layer i's hidden state in `captured[i]` for every i in `wanted`, as
        `capture_point` says; the caller removes them."""
        layers = self.decoder_layers(model)

        def store(index: int, value: Any, what: str) -> None:
            hidden = value[0] if isinstance(value, (tuple, list)) else value
            if not isinstance(hidden, torch.Tensor):
                raise TypeError(f"{what} is {type(value).__name__}, expected a tensor")
            # The first call of the pass wins: nothing runs a module twice in one forward, but a
            # module reused later (the final norm by a verbalizer) must not overwrite the state.
            captured.setdefault(index, hidden)

        if self.capture_point == "layer_output":
            def output_hook(index: int) -> Callable[..., None]:
                def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                    store(index, output, f"the output of decoder layer {index}")

                return hook

            return [layers[i].register_forward_hook(output_hook(i)) for i in wanted]
        if self.capture_point != "next_layer_input":
            raise ValueError(f"unknown capture_point {self.capture_point!r}")

        def input_hook(index: int, what: str) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                value = args[0] if args else kwargs.get("hidden_states")
                store(index, value, what)

            return hook

        handles = []
        for i in wanted:
            if i + 1 < len(layers):
                module, what = layers[i + 1], f"the input of decoder layer {i + 1}"
            else:
                module, what = self.final_norm(model), "the input of the final norm"
            handles.append(module.register_forward_pre_hook(input_hook(i, what), with_kwargs=True))
        return handles


ADAPTERS: dict[str, type[BackboneAdapter]] = {}


def register_adapter(model_type: str) -> Callable[[type[BackboneAdapter]], type[BackboneAdapter]]:
    """Class decorator: make `cls` the adapter for configs with this `model_type`."""

    def decorate(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
        cls.model_type = model_type
        ADAPTERS[model_type] = cls
        return cls

    return decorate


def get_adapter(model_or_type: nn.Module | str) -> BackboneAdapter:
    """The adapter for a model (or a `model_type` string); ValueError if the architecture is unknown."""
    if isinstance(model_or_type, str):
        model_type: str | None = model_or_type
    else:
        model_type = getattr(unwrap_model(model_or_type).config, "model_type", None)
    try:
        return ADAPTERS[str(model_type)]()
    except KeyError:
        raise ValueError(
            f"no distillation adapter for model_type {model_type!r} (registered: {', '.join(sorted(ADAPTERS))}); "
            "add one with @register_adapter in vlsi_model/distill/adapters.py"
        ) from None


class _QwenVLAdapter(BackboneAdapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: `model.model.language_model.{layers,norm}`, `model.lm_head`.

    `backbone_forward` calls the inner `Qwen2VLModel` (vision tower, image-feature scatter,
    M-RoPE positions, text decoder, final norm), i.e. everything `...ForConditionalGeneration`
    does except the LM head.
    """

    def _text_model(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model).model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._text_model(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self._text_model(model).norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return unwrap_model(model).lm_head

    def backbone_forward(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = unwrap_model(model).model(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state


@register_adapter("qwen2_vl")
class Qwen2VLAdapter(_QwenVLAdapter):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`)."""


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(_QwenVLAdapter):
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): same text-side layout as Qwen2-VL."""


@register_adapter("qwen3_vl")
class Qwen3VLAdapter(_QwenVLAdapter):
    """Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2-VL's layout, plus DeepStack.

    The text model adds the merged features of some vision blocks to the outputs of decoder
    layers 0 .. k-1 at the image tokens (k = len(deepstack_visual_indexes)), after each
    layer returns, so layer i is read at the input of layer i + 1 (the final norm for the
    last layer): the residual stream with the DeepStack addition, as the model carries on.
    `backbone_forward` (the inner `Qwen3VLModel`) runs the vision tower, DeepStack and
    interleaved M-RoPE itself.
    """

    capture_point = "next_layer_input"


def forward_with_hidden_states(
    model: nn.Module, batch: Mapping[str, Any], layer_indices: Iterable[int], return_logits: bool = False
) -> HiddenStates:
    """`get_adapter(model).forward_with_hidden_states(...)`: final hidden (or logits) + the layers' outputs."""
    return get_adapter(model).forward_with_hidden_states(model, batch, layer_indices, return_logits)
