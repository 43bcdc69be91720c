"""Which models context memory supports, and the facts about them it needs (ModelSpec).

Supported: decoders whose attention goes through transformers' AttentionInterface, with a rotary
embedding module (`rotary_emb`) and rotate_half-style RoPE: Llama, Qwen2, Mistral and kin. Anything
else is refused with UnsupportedModelError naming what is missing. Knows nothing of caches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from memllm.errors import UnsupportedModelError

ALLOWED_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and handles of a supported model. rotary: the model's own rotary embedding module."""

    name: str
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    trained_len: int
    rotary: torch.nn.Module
    device: torch.device
    dtype: torch.dtype


def _find_rotary(model: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if isinstance(rot, torch.nn.Module):
        return rot
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


def inspect_model(model: torch.nn.Module) -> ModelSpec:
    """Check `model` can run with context memory and describe it; raise UnsupportedModelError otherwise."""
    cls = type(model).__name__
    config = getattr(model, "config", None)

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{cls} cannot run with context memory: {what}. Supported: RoPE decoders whose attention goes "
            "through transformers' AttentionInterface (Llama, Qwen2, Mistral, ...)"
        )

    if config is None:
        raise refuse("it has no transformers config")
    if getattr(config, "is_encoder_decoder", False):
        raise refuse("it is an encoder-decoder model")
    rotary = _find_rotary(model)
    if rotary is None:
        raise refuse("no rotary position embedding module (rotary_emb); it does not use RoPE")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise refuse("its attention does not go through transformers' AttentionInterface")
    modeling = sys.modules.get(type(model).__module__)
    if modeling is None or not hasattr(modeling, "rotate_half"):
        raise refuse("its rotary embedding is not the rotate_half (non-interleaved) kind")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= ALLOWED_LAYER_TYPES:
        raise refuse(f"it has layers of type {sorted(layer_types - ALLOWED_LAYER_TYPES)}")
    for key in ("num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if getattr(config, key, None) is None:
            raise refuse(f"its config has no {key}")
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attn_layers = [
        m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
    ]
    if len(attn_layers) != config.num_hidden_layers:
        raise refuse("its attention modules do not all carry layer_idx and num_key_value_groups")
    param = next(model.parameters())
    return ModelSpec(
        name=getattr(config, "_name_or_path", "") or cls,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        trained_len=int(config.max_position_embeddings),
        rotary=rotary,
        device=param.device,
        dtype=param.dtype,
    )
